"""Network isolation (components/network.py) as a cluster would apply it, and the namespaces' Pod Security.

The rendered NetworkPolicies are evaluated here with the API's semantics: a pod is isolated for a direction
once any policy of its namespace selects it for that direction, and then a connection passes only if some
rule of a selecting policy allows the peer and port; a connection needs the source's egress and the
destination's ingress. Peers are namespaces by their `kubernetes.io/metadata.name` label, pods by
`matchLabels`/`In` expressions, and ipBlocks (addresses outside the cluster).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from loopform import render
from loopform.spec import PlatformSpec, load_stack, stack_file

from .conftest import ROOT, STACKS

EXTERNAL = "external"


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or ():
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _namespace_labels(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


def _peer_matches(peer: dict[str, Any], other: Pod | str, own_namespace: str) -> bool:
    if other == EXTERNAL:
        return "ipBlock" in peer
    assert isinstance(other, Pod)
    if "ipBlock" in peer:
        return False  # an ipBlock is meant for addresses outside the cluster here (0.0.0.0/0 to the API, S3)
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], _namespace_labels(other.namespace)):
            return False
    elif other.namespace != own_namespace:
        return False
    return "podSelector" not in peer or _selects(peer["podSelector"], other.labels)


def _allows(policies: list[dict[str, Any]], pod: Pod, direction: str, other: Pod | str, port: int) -> bool:
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and direction in p["spec"]["policyTypes"]
        and _selects(p["spec"]["podSelector"], pod.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(key) or ():
            ports = [p["port"] for p in rule.get("ports") or ()]
            if ports and port not in ports:
                continue
            if not rule.get(peers) or any(_peer_matches(peer, other, pod.namespace) for peer in rule[peers]):
                return True
    return False


def connects(policies: list[dict[str, Any]], source: Pod | str, destination: Pod | str, port: int) -> bool:
    out = source == EXTERNAL or _allows(policies, source, "Egress", destination, port)  # type: ignore[arg-type]
    into = destination == EXTERNAL or _allows(policies, destination, "Ingress", source, port)  # type: ignore[arg-type]
    return out and into


def _app(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name}


@pytest.fixture(scope="module", params=STACKS)
def stack(request: pytest.FixtureRequest, rendered) -> tuple[PlatformSpec, list[dict[str, Any]]]:
    spec = load_stack(stack_file(request.param), ROOT)
    return spec, render.stack_manifests(rendered(request.param), spec).objects


def test_every_namespace_denies_by_default(stack) -> None:
    spec, objects = stack
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    namespaces = {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"}
    assert namespaces == set(spec.cluster.namespaces.model_dump().values())
    for namespace in namespaces:
        (deny,) = [
            p for p in policies if p["metadata"]["namespace"] == namespace and p["metadata"]["name"] == "default-deny"
        ]
        assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_the_loop_can_talk_and_nothing_else(stack) -> None:
    spec, objects = stack
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    ns = spec.cluster.namespaces
    mlflow, feast = Pod(ns.platform, _app("mlflow")), Pod(ns.platform, _app("feast"))
    postgres, redis = Pod(ns.platform, _app("postgresql")), Pod(ns.platform, _app("redis"))
    step, controller = Pod(ns.pipelines, {"workflows.argoproj.io/workflow": "x"}), Pod(ns.pipelines, _app("argo"))
    service = Pod(ns.serving, _app("model-service"))
    monitor, pushgateway = Pod(ns.monitoring, _app("drift-monitor")), Pod(ns.monitoring, _app("pushgateway"))
    repo_server = Pod(ns.gitops, _app("argocd-repo-server"))
    dns = Pod("kube-system", {"k8s-app": "kube-dns"})
    registry, server, serving = spec.registry.port, spec.feature_store.server.port, spec.models["fraud"].serving.port

    allowed = [
        (step, mlflow, registry),
        (step, feast, server),
        (step, postgres, 5432),  # Feast's SQL registry
        (step, redis, 6379),  # materialisation
        (step, EXTERNAL, 443),  # the object store, the API server
        (service, feast, server),
        (service, redis, 6379),
        (service, mlflow, registry),
        (service, EXTERNAL, 443),  # the payload lake
        (monitor, mlflow, registry),
        (monitor, pushgateway, 9091),
        (mlflow, postgres, 5432),
        (feast, redis, 6379),
        (controller, EXTERNAL, 6443),  # the API server where it listens on 6443
        (repo_server, EXTERNAL, 22),  # Git over SSH
        (Pod("some-team", {}), service, serving),  # callers of a model
    ]
    allowed += [(pod, dns, 53) for pod in (step, service, monitor, mlflow, repo_server)]
    for source, destination, port in allowed:
        assert connects(policies, source, destination, port), (source, destination, port)
    denied = [
        (step, repo_server, 8081),  # the Argo CD repo-server, from a workflow pod
        (service, repo_server, 8081),
        (service, step, 8080),
        (monitor, redis, 6379),
        (monitor, postgres, 5432),
        (Pod("some-team", {}), mlflow, registry),
        (Pod("some-team", {}), postgres, 5432),
        (Pod(ns.gitops, _app("argocd-server")), postgres, 5432),
        (step, EXTERNAL, 25),  # no SMTP, nor any port the spec does not name
        (mlflow, step, 8080),
    ]
    for source, destination, port in denied:
        assert not connects(policies, source, destination, port), (source, destination, port)


def test_prometheus_scrapes_and_alertmanager_posts_only_with_an_operator(stack) -> None:
    spec, objects = stack
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    ns = spec.cluster.namespaces
    service, feast = Pod(ns.serving, _app("model-service")), Pod(ns.platform, _app("feast"))
    event_source = Pod(ns.monitoring, {"eventsource-name": "alertmanager"})
    where = spec.monitoring.prometheus_namespace or ns.monitoring
    prometheus, alertmanager = Pod(where, _app("prometheus")), Pod(where, _app("alertmanager"))
    operator = spec.monitoring.operator
    assert connects(policies, prometheus, service, 3000) is operator or where != ns.monitoring
    assert _allows(policies, feast, "Ingress", prometheus, 8000) is operator  # `feast serve --metrics`
    if operator:  # Alertmanager must reach the retraining webhook (else there is none to reach)
        assert _allows(policies, event_source, "Ingress", alertmanager, 12000)
    outsider = Pod("some-team", _app("alertmanager"))
    assert not _allows(policies, event_source, "Ingress", outsider, 12000)


def test_external_databases_ports_are_open_only_where_named() -> None:
    spec = load_stack(stack_file("prod"), ROOT)
    from components.platform import network_policies_args

    args = network_policies_args(spec, {})
    assert set(args.external_ports) == {spec.registry.backend.port, spec.feature_store.online_store.port}
    dev = network_policies_args(load_stack(stack_file("dev"), ROOT), {})
    assert dev.external_ports == []


def test_namespaces_enforce_restricted_except_monitoring(stack) -> None:
    spec, objects = stack
    levels = {
        o["metadata"]["name"]: o["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        for o in objects
        if o["kind"] == "Namespace"
    }
    ns = spec.cluster.namespaces
    assert levels.pop(ns.monitoring) == ("privileged" if spec.monitoring.install_prometheus_stack else "baseline")
    assert set(levels.values()) == {"restricted"}


def test_our_pods_meet_restricted(stack) -> None:
    """What `restricted` checks of every pod the platform declares directly (charts' pods are the charts')."""
    _, objects = stack
    allowed_volumes = {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected", "downwardAPI"}
    checked = 0
    for manifest in objects:
        template = manifest.get("spec", {})
        if manifest["kind"] == "CronJob":
            template = template["jobTemplate"]["spec"]
        pod = template.get("template", {}).get("spec")
        if manifest["kind"] not in {"Deployment", "StatefulSet", "Job", "CronJob"} or pod is None:
            continue
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert security.get("runAsUser", 1) != 0
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
        for volume in pod.get("volumes", ()):
            assert set(volume) - {"name"} <= allowed_volumes, volume
        for container in [*pod.get("initContainers", ()), *pod["containers"]]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        checked += 1
    assert checked >= 8
