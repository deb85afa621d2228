"""Every reference of every rendered object resolves: created by the program, or a listed prerequisite.

A cluster applies objects whose Secrets, ServiceAccounts, CRDs or IAM roles do not exist and
then leaves their pods stuck; these tests fail the same way, offline, per stack.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loopform import chart_values, identity, prerequisites, render
from loopform.references import (
    CHART_CR_SWITCHES,
    Manifests,
    Ref,
    chart_provides,
    chart_refs,
    crd_name,
    object_refs,
    pods_without_object_store_credentials,
    prerequisite_ref,
    unresolved,
)
from loopform.spec import CONFIG_KEY, IrsaIdentity, PlatformSpec, PodIdentity, load_stack, stack_file
from tests import records

from .conftest import ROOT, STACKS

UPSTREAM = ROOT.parent / "shared" / "upstream"
RELEASES = {"fraud": records.release(), "delivery": records.release(sealed=records.regression_evidence())}


def released(spec: PlatformSpec) -> PlatformSpec:
    """The stack with its models released, so the GitOps service manifests are part of what is checked."""
    data = spec.model_dump(mode="json")
    for name, model in data["models"].items():
        model["release"] = RELEASES[name]
    return PlatformSpec.model_validate(data)


def stack(name: str, rendered) -> tuple[PlatformSpec, Manifests]:
    spec = released(load_stack(stack_file(name)))
    return spec, render.stack_manifests(rendered(name), spec)


@pytest.mark.parametrize("name", STACKS)
def test_every_reference_is_created_or_a_prerequisite(name: str, rendered) -> None:
    spec, manifests = stack(name, rendered)
    kinds = {m["kind"] for m in manifests.objects}
    assert {"Deployment", "ServiceAccount", "WorkflowTemplate", "HorizontalPodAutoscaler"} <= kinds
    assert unresolved(manifests, prerequisites.prerequisites(spec)) == []


@pytest.mark.parametrize("name", STACKS)
def test_every_pod_that_reads_s3_has_credentials(name: str, rendered) -> None:
    spec, manifests = stack(name, rendered)
    assert pods_without_object_store_credentials(manifests, prerequisites.prerequisites(spec)) == []


@pytest.mark.parametrize("name", STACKS)
def test_every_listed_prerequisite_is_needed(name: str, rendered) -> None:
    """No padding: each cluster or AWS object listed is referenced by a rendered object (or is identity plumbing)."""
    spec, manifests = stack(name, rendered)
    refs = {r for m in manifests.objects for r in object_refs(m)}
    refs |= {r for chart_name, chart in manifests.charts for r in chart_refs(chart, chart_name)}
    for item in prerequisites.prerequisites(spec):
        provided = prerequisite_ref(item)
        if provided is None:  # OIDC provider, Pod Identity agent and associations, secret config, a bucket's rules
            assert item.kind in {
                "iam-oidc-provider",
                "daemonset",
                "pod-identity-association",
                "secret-config",
                "bucket-policy",
            }
            continue
        assert provided in refs, f"{item.line()} is listed but nothing references it"


def _object(manifests: Manifests, kind: str, name: str) -> dict[str, Any]:
    return next(m for m in manifests.objects if m["kind"] == kind and m["metadata"]["name"] == name)


def test_a_missing_service_account_secret_key_or_crd_is_caught(rendered) -> None:
    spec, manifests = stack("dev", rendered)
    needed = prerequisites.prerequisites(spec)
    objects = [
        m
        for m in manifests.objects
        if not (m["kind"] == "ServiceAccount" and m["metadata"]["name"] == "loopform-model-service")
    ]
    server = copy.deepcopy(_object(manifests, "Deployment", "dev-registry"))
    server["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["key"] = "password"
    server["spec"]["template"]["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": "mlflow-artifacts"}}]
    objects = [server if m is _object(manifests, "Deployment", "dev-registry") else m for m in objects]
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "m", "namespace": "loopform-dev-serving"},
        "spec": {},
    }
    missing = {str(r) for r in unresolved(Manifests([*objects, monitor], manifests.charts), needed)}
    assert missing == {
        "ServiceAccount loopform-dev-serving/loopform-model-service",
        "Secret loopform-dev-system/dev-registry-db key 'password'",
        "Secret loopform-dev-system/mlflow-artifacts",
        "CustomResourceDefinition servicemonitors.monitoring.coreos.com",
    }


def test_a_pod_reading_s3_without_identity_is_caught(rendered) -> None:
    _, manifests = stack("dev", rendered)
    objects = [
        m
        for m in manifests.objects
        if not (m["kind"] == "ServiceAccount" and m["metadata"]["name"] in {"loopform-feast", "loopform-model-service"})
    ]
    missing = pods_without_object_store_credentials(Manifests(objects, manifests.charts), [])
    assert any("Deployment loopform-dev-serving/fraud-service" in line for line in missing), missing
    assert any("Job loopform-dev-system/dev-features-apply" in line for line in missing), missing
    # The PostgreSQL StatefulSet names no s3:// location: it needs no object-store identity.
    assert not any("dev-registry-postgres" in line for line in missing)


def _run_as(value: Any) -> Iterator[str]:
    """Every ServiceAccount a manifest's pods run as (pod specs, CronJob templates, Argo workflow specs)."""
    if isinstance(value, dict):
        if isinstance(value.get("serviceAccountName"), str):
            yield value["serviceAccountName"]
        for item in value.values():
            yield from _run_as(item)
    elif isinstance(value, list):
        for item in value:
            yield from _run_as(item)


@pytest.mark.parametrize("name", STACKS)
def test_every_workload_runs_as_its_account_with_its_role(name: str, rendered) -> None:
    """Each workload of the identity table has pods, running as its ServiceAccount, which gets its role.

    Checked per workload, not per s3:// string: the drift monitor reads the payload log through the stack file
    in its image, so no string in its manifest says it needs object storage.
    """
    spec, manifests = stack(name, rendered)
    run_as = {(m["metadata"].get("namespace"), account) for m in manifests.objects for account in _run_as(m)}
    accounts = {
        (m["metadata"]["namespace"], m["metadata"]["name"]): m["metadata"].get("annotations") or {}
        for m in manifests.objects
        if m["kind"] == "ServiceAccount"
    }
    needed = prerequisites.prerequisites(spec)
    associations = {item.name: item.fix for item in needed if item.kind == "pod-identity-association"}
    for workload in identity.workloads(spec).values():
        account = (workload.namespace, workload.service_account)
        assert account in run_as, f"no pod of {workload.name} runs as {account}"
        assert account in accounts, f"ServiceAccount {account} of {workload.name} is not created"
        role = identity.role_arn(spec, workload.name)
        if isinstance(spec.cluster.identity, IrsaIdentity):
            assert accounts[account].get(identity.IRSA_ANNOTATION) == role, f"{account} lacks the {workload.name} role"
            trusts = [item for item in needed if item.kind == "iam-role" and item.name == role]
            assert [workload.subject in item.why for item in trusts] == [True], workload.name
        else:
            assert isinstance(spec.cluster.identity, PodIdentity)
            assert f"--role-arn {role}" in associations[f"{workload.namespace}/{workload.service_account}"]


def test_prerequisites_follow_the_spec() -> None:
    dev, staging, prod = (load_stack(stack_file(s)) for s in STACKS)
    names = {s.environment: {(p.kind, p.name) for p in prerequisites.prerequisites(s)} for s in (dev, staging, prod)}
    assert ("crd", "nodepools.karpenter.sh") in names["dev"] and ("crd", "nodepools.karpenter.sh") not in names["prod"]
    assert ("iam-role", "KarpenterNodeRole-loopform-dev") in names["dev"]
    assert ("storage-class", prerequisites.DEFAULT_STORAGE_CLASS) in names["dev"]
    assert not any(kind == "storage-class" for kind, _ in names["prod"])  # prod's databases are managed
    assert ("secret-config", "loopform:redisPassword") in names["prod"]
    assert ("api-service", "v1beta1.metrics.k8s.io") in names["prod"]
    assert ("iam-oidc-provider", "the cluster's OIDC issuer") in names["dev"]
    assert ("pod-identity-association", "loopform-staging-serving/loopform-model-service") in names["staging"]
    assert ("daemonset", "eks-pod-identity-agent") in names["staging"]
    assert {name for kind, name in names["prod"] if kind == "bucket"} == {
        "loopform-prod-mlflow",
        "loopform-prod-feast",
        "loopform-prod-lake",
        "loopform-prod-argo",
    }
    assert prerequisites.prerequisites(load_stack(stack_file("local"))) == []


def _static_keys_stack(tmp_path: Path) -> Path:
    document = yaml.safe_load(stack_file("dev").read_text())
    document["config"][CONFIG_KEY]["cluster"]["identity"] = {"kind": "static-keys"}
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_static_keys_are_created_in_every_namespace_that_reads_them(tmp_path: Path) -> None:
    path = _static_keys_stack(tmp_path)
    spec = released(load_stack(path, ROOT))
    resources = render.render_stack("dev", ROOT, path)
    manifests = render.stack_manifests(resources, spec)
    secrets = {
        (m["metadata"]["namespace"], m["metadata"]["name"]): set(m["stringData"])
        for m in manifests.objects
        if m["kind"] == "Secret"
    }
    namespaces = ("loopform-dev-system", "loopform-dev-pipelines", "loopform-dev-serving", "loopform-dev-monitoring")
    for namespace in namespaces:
        assert secrets[(namespace, "loopform-object-store")] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    needed = prerequisites.prerequisites(spec)
    assert unresolved(manifests, needed) == []
    assert pods_without_object_store_credentials(manifests, needed) == []
    # No IRSA annotation anywhere, and Argo's artifact repository reads the same Secret.
    assert not any(
        m.get("metadata", {}).get("annotations", {}).get("eks.amazonaws.com/role-arn") for m in manifests.objects
    )
    repository = yaml.safe_load(_object(manifests, "ConfigMap", "artifact-repositories")["data"]["default-v1"])
    assert repository["s3"]["accessKeySecret"] == {"name": "loopform-object-store", "key": "AWS_ACCESS_KEY_ID"}
    assert "useSDKCreds" not in repository["s3"]
    assert ("secret-config", "loopform:objectStoreAccessKeyId") in {(p.kind, p.name) for p in needed}


def test_crd_names_follow_kubernetes_plurals() -> None:
    assert crd_name("karpenter.k8s.aws/v1", "EC2NodeClass") == "ec2nodeclasses.karpenter.k8s.aws"
    assert crd_name("karpenter.sh/v1", "NodePool") == "nodepools.karpenter.sh"
    assert crd_name("monitoring.coreos.com/v1", "ServiceMonitor") == "servicemonitors.monitoring.coreos.com"
    assert crd_name("x.io/v1", "Policy") == "policies.x.io"


# --- charts: with the monitoring flag off, no chart renders a custom resource whose CRD may be missing ---


def _upstream_chart(chart: str, version: str) -> dict[str, Any] | None:
    """The pinned chart's values and keys in shared/upstream; None for a version it does not mirror, whose keys
    loopform.chart_values keeps (written from that chart's values file)."""
    index = json.loads((UPSTREAM / "index.json").read_text())
    entry = next((c for c in index["charts"] if c["chart"] == chart and c["version"] == version), None)
    if entry is None:
        assert (chart, version) in chart_values.CHARTS, f"{chart} {version} is neither mirrored nor in chart_values"
        return None
    return {
        "values": yaml.safe_load((UPSTREAM / entry["values"]).read_text()),
        "keys": json.loads((UPSTREAM / entry["keys"]).read_text()),
    }


def _merged(defaults: Any, values: Any) -> Any:
    """Helm's value merge: maps merge key by key, anything else replaces."""
    if isinstance(defaults, dict) and isinstance(values, dict):
        return {k: _merged(defaults.get(k), values[k]) if k in values else defaults[k] for k in {*defaults, *values}}
    return values


def _leaves(values: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(values, dict) and values:
        return [leaf for key, value in values.items() for leaf in _leaves(value, (*path, key))]
    return [path]


needs_upstream = pytest.mark.skipif(
    not UPSTREAM.exists(), reason="shared/upstream (pinned charts) is not beside the repo"
)


@needs_upstream
@pytest.mark.parametrize("name", STACKS)
def test_charts_render_only_custom_resources_whose_crds_exist(name: str, rendered) -> None:
    """With the chart's own defaults merged in: a CRD a chart's values switch on is installed by a chart of the
    stack or listed as a prerequisite (the Prometheus Operator's only with monitoring.prometheus_operator)."""
    spec, manifests = stack(name, rendered)
    provided = {ref for _, chart in manifests.charts for ref in chart_provides(chart)}
    listed = {(p.kind, p.name) for p in prerequisites.prerequisites(spec)}
    charts = 0
    for chart_name, chart in manifests.charts:
        upstream = _upstream_chart(chart["chart"], chart["version"])
        effective = {**chart, "values": _merged(upstream["values"] if upstream else {}, chart["values"])}
        for crd in {r for r in chart_refs(effective, chart_name) if r.kind == "CustomResourceDefinition"}:
            assert crd in provided or ("crd", crd.name) in listed, f"{chart_name} renders custom resources of {crd}"
            assert spec.monitoring.operator, f"{chart_name} switches on {crd.name} without a Prometheus Operator"
        charts += 1
    assert charts >= 3


@needs_upstream
def test_the_monitoring_flag_turns_service_monitors_on_and_lists_their_crd(tmp_path: Path) -> None:
    document = yaml.safe_load(stack_file("dev").read_text())
    document["config"][CONFIG_KEY]["monitoring"]["prometheus_operator"] = True
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(document))
    spec = load_stack(path, ROOT)
    manifests = render.stack_manifests(render.render_stack("dev", ROOT, path), spec)
    switched = {
        chart["chart"]
        for _, chart in manifests.charts
        if Ref("CustomResourceDefinition", None, CHART_CR_SWITCHES["serviceMonitor"]) in set(chart_refs(chart, ""))
    }
    assert switched == {"argo-workflows", "dcgm-exporter"}
    assert ("crd", "servicemonitors.monitoring.coreos.com") in {
        (p.kind, p.name) for p in prerequisites.prerequisites(spec)
    }
    assert unresolved(manifests, prerequisites.prerequisites(spec)) == []


@needs_upstream
@pytest.mark.parametrize("name", STACKS)
def test_every_chart_value_is_one_the_chart_reads(name: str, rendered) -> None:
    """A values key the chart's templates never read (e.g. `useDefaultArtifactRepo`, dropped in 0.26) does nothing."""
    _, manifests = stack(name, rendered)
    for chart_name, chart in manifests.charts:
        upstream = _upstream_chart(chart["chart"], chart["version"])
        if upstream is None:
            unknown = chart_values.check_values(chart["chart"], chart["version"], chart["values"])
            assert not unknown, f"{chart_name}: values keys {unknown} are not documented by {chart['chart']}"
            continue
        keys = upstream["keys"]
        # Paths the templates read, free-form maps, and the chart's own defaults (crds.* is read under crds/).
        read = {tuple(path) for path in keys["template_refs"]} | set(_leaves(upstream["values"]))
        freeform = [tuple(path) for path in keys["freeform"]]
        for leaf in _leaves(chart["values"]):
            known = any(leaf[: len(p)] == p for p in freeform) or any(leaf[: len(r)] == r for r in read)
            assert known, f"{chart_name}: values key {'.'.join(leaf)} is read by no template of {chart['chart']}"


# --- the report: render prints it, the README lists exactly it ---------------------------------


def test_render_prints_the_prerequisites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loopform.cli import main

    assert main(["render", "--stack", "prod", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert prerequisites.report(load_stack(stack_file("prod"))) in printed


def test_render_fails_when_an_object_would_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With nothing listed as a prerequisite, render names what the cluster would lack, and exits 1."""
    from loopform.cli import main

    monkeypatch.setattr(prerequisites, "prerequisites", lambda spec: [])
    assert main(["render", "--stack", "dev", "--out", str(tmp_path)]) == 1
    errors = capsys.readouterr().err
    assert "would not start on the cluster" in errors
    assert (
        "IAMRole loopform-dev-serving (referenced by ServiceAccount loopform-dev-serving/loopform-model-service)"
        in errors
    )
    assert "CustomResourceDefinition nodepools.karpenter.sh" in errors


README_BEGIN = "<!-- prerequisites:begin (generated: make golden) -->"
README_END = "<!-- prerequisites:end -->"


def readme_block() -> str:
    sections = [f"#### `{s}`\n\n```\n{prerequisites.report(load_stack(stack_file(s)))}```\n" for s in STACKS]
    return "\n".join(sections)


def test_readme_deploy_section_lists_exactly_what_render_reports() -> None:
    import os

    readme = (ROOT / "README.md").read_text()
    before, _, rest = readme.partition(README_BEGIN)
    current, _, after = rest.partition(README_END)
    expected = f"\n{readme_block()}"
    if os.environ.get("LOOPFORM_REGENERATE_GOLDEN") == "1":
        (ROOT / "README.md").write_text(f"{before}{README_BEGIN}{expected}{README_END}{after}")
        return
    assert README_BEGIN in readme and README_END in readme
    assert current == expected, "README's prerequisites differ from `loopform render`: run `make golden`"
