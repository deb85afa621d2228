"""`loopform doctor` against recorded API-server responses, through the real Kubernetes client.

A small HTTP server on 127.0.0.1 answers each scenario's paths from the JSON recordings in
tests/fixtures/doctor (the shapes a real API server returns), and a 404 `Status` for
anything else; it records the paths asked for and the Authorization header sent. The
kubeconfig and the stack file are written per test. No live cluster is involved.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from loopform.cli import main
from loopform.prerequisites import prerequisites
from loopform.spec import WorkloadRoles, load_stack

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "doctor"
TOKEN = "doctor-test-token-3f9a"
CONTEXT = "loopform-doctor"
ENV = "doctor"

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
NODEPOOLS = f"{CRDS}/nodepools.karpenter.sh"
NODECLASSES = f"{CRDS}/ec2nodeclasses.karpenter.k8s.aws"
SERVICE_MONITORS = f"{CRDS}/servicemonitors.monitoring.coreos.com"
PROMETHEUS_RULES = f"{CRDS}/prometheusrules.monitoring.coreos.com"
ALERTMANAGER_CONFIGS = f"{CRDS}/alertmanagerconfigs.monitoring.coreos.com"
METRICS = "/apis/apiregistration.k8s.io/v1/apiservices/v1beta1.metrics.k8s.io"
STORAGE_CLASSES = "/apis/storage.k8s.io/v1/storageclasses"
EBS_DRIVER = "/apis/storage.k8s.io/v1/csidrivers/ebs.csi.aws.com"
GPU_NAMESPACE = "/api/v1/namespaces/nvidia-gpu"
AGENT = "/apis/apps/v1/namespaces/kube-system/daemonsets/eks-pod-identity-agent"

ROLES = {w: f"arn:aws:iam::123456789012:role/loopform-{w}" for w in WorkloadRoles.model_fields}
IRSA = {"kind": "irsa", "roles": ROLES}
POD_IDENTITY = {"kind": "pod-identity", "cluster_name": "loopform-dev", "roles": ROLES}


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def present() -> dict[str, tuple[int, Any]]:
    """Every object the test stack needs, as the API server answers it."""
    return {
        "/version": (200, fixture("version.json")),
        NODEPOOLS: (200, fixture("crd_nodepools.json")),
        NODECLASSES: (200, fixture("crd_ec2nodeclasses.json")),
        SERVICE_MONITORS: (200, fixture("crd_servicemonitors.json")),
        PROMETHEUS_RULES: (200, fixture("crd_prometheusrules.json")),
        ALERTMANAGER_CONFIGS: (200, fixture("crd_alertmanagerconfigs.json")),
        METRICS: (200, fixture("apiservice_metrics.json")),
        STORAGE_CLASSES: (200, fixture("storageclasses.json")),
        EBS_DRIVER: (200, fixture("csidriver_ebs.json")),
        GPU_NAMESPACE: (200, fixture("namespace_nvidia_gpu.json")),
        AGENT: (200, fixture("daemonset_pod_identity_agent.json")),
    }


class FakeApiServer:
    """Answers GETs from `routes` (path -> (status, body)); unknown paths get the recorded NotFound Status."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, Any]] = present()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                server.requests.append((path, self.headers.get("Authorization")))
                status, body = server.routes.get(path) or (404, server.not_found(path))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @staticmethod
    def not_found(path: str) -> dict[str, Any]:
        """The recorded 404 Status, naming the object at `path` as the API server would."""
        body = fixture("status_not_found.json")
        parts = path.strip("/").split("/")
        group = parts[1] if parts[0] == "apis" else ""
        resource = f"{parts[-2]}.{group}" if group else parts[-2]
        body["message"] = f'{resource} "{parts[-1]}" not found'
        body["details"] = {"name": parts[-1], "group": group, "kind": parts[-2]}
        return body

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client honours proxy variables; the fake server is local."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kubeconfig(tmp_path: Path, server: str) -> Path:
    """Context CONTEXT (token user) on `server`; the current context is another one, on a closed port."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "doctor", "cluster": {"server": server}},
            {"name": "gone", "cluster": {"server": f"http://127.0.0.1:{closed_port()}"}},
        ],
        "users": [{"name": "tester", "user": {"token": TOKEN}}],
        "contexts": [
            {"name": CONTEXT, "context": {"cluster": "doctor", "user": "tester"}},
            {"name": "elsewhere", "context": {"cluster": "gone", "user": "tester"}},
        ],
        "current-context": "elsewhere",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def stack(tmp_path: Path, identity: dict[str, Any] = IRSA, **cluster: Any) -> Path:
    """A stack with Karpenter GPUs, the Prometheus Operator, in-cluster databases and one model."""
    platform = {
        "environment": ENV,
        "cluster": {"kube_context": CONTEXT, "identity": identity, **cluster},
        "gpu": {
            "namespace": "nvidia-gpu",
            "pools": {
                "gpu": {
                    "kind": "karpenter",
                    "node_class": {"role": "KarpenterNodeRole-loopform", "discovery_tag": "loopform-dev"},
                }
            },
        },
        "monitoring": {"prometheus_operator": True},
        "models": {"fraud": {"path": "models/fraud", "training": {"gpu_pool": "gpu"}}},
    }
    path = tmp_path / f"Pulumi.{ENV}.yaml"
    path.write_text(yaml.safe_dump({"config": {"loopform:platform": platform}}))
    return path


def doctor(tmp_path: Path, api: FakeApiServer, *extra: str, stack_path: Path | None = None) -> int:
    path = stack_path or stack(tmp_path)
    config = kubeconfig(tmp_path, api.url)
    return main(
        ["--root", str(ROOT), "doctor", "--stack", ENV, "--file", str(path), "--kubeconfig", str(config), *extra]
    )


def line_of(out: str, name: str) -> str:
    found = [line for line in out.splitlines() if re.search(rf" {re.escape(name)}(?![\w/.-])", line)]
    assert len(found) == 1, f"{name} on {len(found)} lines of:\n{out}"
    return found[0]


def test_everything_present(tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    path = stack(tmp_path)
    assert doctor(tmp_path, api, stack_path=path) == 0
    out = capsys.readouterr().out
    items = prerequisites(load_stack(path, ROOT))
    cluster = [item for item in items if item.checked_in == "cluster"]
    assert sorted(item.kind for item in cluster) == ["api-service", *["crd"] * 5, "namespace", "storage-class"]
    for item in cluster:
        assert line_of(out, item.line().removesuffix(f": {item.why}")).split()[0] == "ok"
    elsewhere = [item for item in items if item.checked_in != "cluster"]
    assert {item.checked_in for item in elsewhere} == {"aws", "pulumi"}
    for item in elsewhere:
        line = line_of(out, item.line().removesuffix(f": {item.why}"))
        assert line.startswith(f"not checked ({item.checked_in})") and line.endswith(f"fix: {item.fix}")
    assert out.splitlines()[0] == f"Stack {ENV}: context {CONTEXT}, server {api.url} (Kubernetes v1.31.4-eks-2d5f260)"
    assert out.splitlines()[-1] == f"8 ok, 0 missing, {len(elsewhere)} not checked here"
    # The spec's kube_context won over the kubeconfig's current context, and every GET carried the token.
    assert sorted(api.paths) == sorted(
        [
            "/version",
            NODEPOOLS,
            NODECLASSES,
            SERVICE_MONITORS,
            PROMETHEUS_RULES,
            ALERTMANAGER_CONFIGS,
            METRICS,
            STORAGE_CLASSES,
            EBS_DRIVER,
            GPU_NAMESPACE,
        ]
    )
    assert {auth for _, auth in api.requests} == {f"Bearer {TOKEN}"}


def test_kubeconfig_from_the_environment(
    tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, api.url)))
    assert main(["--root", str(ROOT), "doctor", "--stack", ENV, "--file", str(stack(tmp_path))]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("8 ok, 0 missing")
    assert "/version" in api.paths


def test_missing_karpenter_and_metrics_server(
    tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    for path in (NODEPOOLS, NODECLASSES, METRICS):
        del api.routes[path]
    assert doctor(tmp_path, api) == 1
    out = capsys.readouterr().out
    for crd in ("nodepools.karpenter.sh", "ec2nodeclasses.karpenter.k8s.aws"):
        line = line_of(out, crd)
        assert line.startswith("MISSING") and "CustomResourceDefinition not found" in line
        assert line.endswith("fix: install Karpenter v1 with its CRDs: https://karpenter.sh/docs/getting-started/")
    metrics = line_of(out, "v1beta1.metrics.k8s.io")
    assert metrics.startswith("MISSING") and "APIService not found" in metrics
    assert "fix: aws eks create-addon --cluster-name <cluster> --addon-name metrics-server" in metrics
    assert line_of(out, "servicemonitors.monitoring.coreos.com").startswith("ok ")
    assert out.splitlines()[-1].startswith("5 ok, 3 missing, ")


def test_default_storage_class_without_its_csi_driver(
    tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    del api.routes[EBS_DRIVER]
    assert doctor(tmp_path, api) == 1
    line = line_of(capsys.readouterr().out, "(default)")
    assert line.startswith("MISSING ")
    assert "StorageClass gp3: provisioner ebs.csi.aws.com has no CSI driver installed" in line
    assert line.endswith("fix: aws eks create-addon --cluster-name <cluster> --addon-name aws-ebs-csi-driver")
    assert EBS_DRIVER in api.paths


def _default_class(api: FakeApiServer, provisioner: str | None, expandable: bool = True) -> None:
    """Make gp2 (or nothing, with None) the default class, with `provisioner`."""
    listed = copy.deepcopy(api.routes[STORAGE_CLASSES][1])
    gp2, gp3 = listed["items"]
    del gp3["metadata"]["annotations"]
    if provisioner:
        gp2["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] = "true"
        gp2["provisioner"] = provisioner
        if expandable:
            gp2["allowVolumeExpansion"] = True
    api.routes[STORAGE_CLASSES] = (200, listed)


def test_in_tree_ebs_class_needs_the_csi_driver_it_migrated_to(
    tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    _default_class(api, "kubernetes.io/aws-ebs")
    del api.routes[EBS_DRIVER]
    assert doctor(tmp_path, api) == 1
    line = line_of(capsys.readouterr().out, "(default)")
    assert "StorageClass gp2: provisioner kubernetes.io/aws-ebs (migrated to CSI driver ebs.csi.aws.com)" in line
    assert line.endswith("--addon-name aws-ebs-csi-driver")


def test_a_class_that_cannot_grow_volumes_is_reported(
    tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Volumes grow in place: EKS's stock gp2 class has no allowVolumeExpansion, so growth would be refused."""
    _default_class(api, "ebs.csi.aws.com", expandable=False)
    assert doctor(tmp_path, api) == 1
    line = line_of(capsys.readouterr().out, "(default)")
    assert "StorageClass gp2 does not allow volume expansion" in line
    assert """kubectl patch storageclass gp2 -p '{"allowVolumeExpansion": true}'""" in line


def test_in_tree_provisioner_without_csi_is_not_asked_for_a_driver(
    tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    _default_class(api, "kubernetes.io/no-provisioner")
    assert doctor(tmp_path, api) == 0
    assert line_of(capsys.readouterr().out, "(default)").startswith("ok ")
    assert not [path for path in api.paths if "/csidrivers/" in path]


def test_no_default_storage_class(tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    _default_class(api, None)
    assert doctor(tmp_path, api) == 1
    line = line_of(capsys.readouterr().out, "(default)")
    assert "no StorageClass is annotated storageclass.kubernetes.io/is-default-class" in line
    assert 'storageclass.kubernetes.io/is-default-class: "true"' in line and "aws-ebs-csi-driver" in line


def test_named_storage_class(tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    gp3 = fixture("storageclasses.json")["items"][1]
    api.routes[f"{STORAGE_CLASSES}/gp3"] = (200, {"kind": "StorageClass", "apiVersion": "storage.k8s.io/v1", **gp3})
    assert doctor(tmp_path, api, stack_path=stack(tmp_path, storage_class="gp3")) == 0
    assert line_of(capsys.readouterr().out, "storage-class gp3").startswith("ok ")
    assert f"{STORAGE_CLASSES}/gp3" in api.paths and STORAGE_CLASSES not in api.paths

    assert doctor(tmp_path, api, stack_path=stack(tmp_path, storage_class="io2")) == 1
    line = line_of(capsys.readouterr().out, "storage-class io2")
    assert "StorageClass io2 not found" in line and "fix: create StorageClass io2" in line


def test_crd_not_established_and_api_service_unavailable(
    tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    crd = fixture("crd_servicemonitors.json")
    crd["status"]["conditions"] = [c for c in crd["status"]["conditions"] if c["type"] != "Established"]
    service = fixture("apiservice_metrics.json")
    service["status"]["conditions"][0].update(
        status="False",
        reason="MissingEndpoints",
        message="endpoints for service/metrics-server in kube-system have no addresses",
    )
    api.routes[SERVICE_MONITORS] = (200, crd)
    api.routes[METRICS] = (200, service)
    assert doctor(tmp_path, api) == 1
    out = capsys.readouterr().out
    assert "CustomResourceDefinition has no Established condition yet" in line_of(
        out, "servicemonitors.monitoring.coreos.com"
    )
    assert "APIService is not Available (Available=False: MissingEndpoints: endpoints for" in line_of(
        out, "v1beta1.metrics.k8s.io"
    )
    assert out.splitlines()[-1].startswith("6 ok, 2 missing, ")


def test_pod_identity_agent_and_gpu_namespace(
    tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    path = stack(tmp_path, identity=POD_IDENTITY)
    assert doctor(tmp_path, api, stack_path=path) == 0
    out = capsys.readouterr().out
    assert line_of(out, "kube-system/eks-pod-identity-agent").startswith("ok ")
    assert AGENT in api.paths

    agent = fixture("daemonset_pod_identity_agent.json")
    agent["status"].update(numberReady=0, numberAvailable=0, numberUnavailable=3)
    api.routes[AGENT] = (200, agent)
    del api.routes[GPU_NAMESPACE]
    assert doctor(tmp_path, api, stack_path=path) == 1
    out = capsys.readouterr().out
    line = line_of(out, "kube-system/eks-pod-identity-agent")
    assert "DaemonSet has no available pod (0 ready of 3 scheduled)" in line
    assert line.endswith("fix: aws eks create-addon --cluster-name loopform-dev --addon-name eks-pod-identity-agent")
    namespace = line_of(out, "namespace nvidia-gpu")
    assert "Namespace not found" in namespace and namespace.endswith("fix: kubectl create namespace nvidia-gpu")


def test_server_down(tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor(tmp_path, api, "--context", "elsewhere") == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and captured.out == ""
    assert err.startswith("error: context elsewhere: cannot reach the API server http://127.0.0.1:")
    assert "Connection refused" in err
    assert api.requests == []


def test_context_not_in_kubeconfig(tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor(tmp_path, api, "--context", "loopform-prod") == 2
    err = capsys.readouterr().err
    assert "context loopform-prod is not in kubeconfig" in err
    assert f"contexts there: {CONTEXT}, elsewhere" in err
    assert api.requests == []


def test_unauthorized(tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    api.routes["/version"] = (401, fixture("status_unauthorized.json"))
    assert doctor(tmp_path, api) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: context {CONTEXT}: the API server {api.url} refused the credentials")
    assert "401 Unauthorized: Unauthorized" in err
    assert api.paths == ["/version"]


def test_forbidden(tmp_path: Path, api: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    api.routes[NODEPOOLS] = (403, fixture("status_forbidden.json"))
    assert doctor(tmp_path, api) == 2
    err = capsys.readouterr().err
    assert f"error: context {CONTEXT}: the API server {api.url} forbids GET {NODEPOOLS}" in err
    assert 'cannot get resource "customresourcedefinitions"' in err


def test_local_stack_needs_no_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--stack", "local", "--kubeconfig", str(tmp_path / "absent")]) == 0
    assert "no prerequisites" in capsys.readouterr().out


def test_kubeconfig_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    absent = tmp_path / "absent"
    args = ["--root", str(ROOT), "doctor", "--stack", ENV, "--file", str(stack(tmp_path)), "--kubeconfig", str(absent)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: kubeconfig {absent} not found: pass --kubeconfig or set KUBECONFIG")
