"""pulumi-kubernetes' replace-vs-update rules (loopform.replacement), one group per rule source."""

from __future__ import annotations

import ast
import base64
import copy
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from loopform import replacement
from loopform.replacement import (
    FORCE_NEW,
    Change,
    changed_paths,
    delete_before_replace,
    force_new_paths,
    plan,
    replace_reasons,
)

STS = "kubernetes:apps/v1:StatefulSet"
DEPLOY = "kubernetes:apps/v1:Deployment"
PVC = "kubernetes:core/v1:PersistentVolumeClaim"
SECRET = "kubernetes:core/v1:Secret"
CONFIG_MAP = "kubernetes:core/v1:ConfigMap"


def _obj(api_version: str, kind: str, name: str = "x", namespace: str | None = "ml", **fields: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": {"app": name}}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata, **fields}


def _with(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of obj with the dotted path (list indexes as [i]) set to value; value `...` deletes it."""
    out = copy.deepcopy(obj)
    steps: list[str | int] = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]", path) if p]
    node: Any = out
    for step in steps[:-1]:
        node = node[step]
    if value is ...:
        del node[steps[-1]]
    else:
        node[steps[-1]] = value
    return out


def _one(type_: str, old: dict, new: dict, **flags: bool) -> Change:
    (change,) = plan({"r": (type_, old)}, {"r": (type_, new)}, **flags)
    return change


def _statefulset() -> dict[str, Any]:
    return _obj(
        "apps/v1",
        "StatefulSet",
        spec={
            "replicas": 1,
            "serviceName": "db",
            "podManagementPolicy": "OrderedReady",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"spec": {"containers": [{"name": "db", "image": "postgres:16"}]}},
            "volumeClaimTemplates": [
                {"metadata": {"name": "data"}, "spec": {"resources": {"requests": {"storage": "10Gi"}}}}
            ],
        },
    )


def _deployment() -> dict[str, Any]:
    return _obj(
        "apps/v1",
        "Deployment",
        spec={
            "replicas": 2,
            "selector": {"matchLabels": {"app": "x"}},
            "template": {"spec": {"containers": [{"name": "x", "image": "x:1"}]}},
        },
    )


# ------------------------------------------------------------------ StatefulSet (diff.go `statefulSet`)


def test_statefulset_replicas_and_template_update() -> None:
    old = _statefulset()
    change = _one(STS, old, _with(old, "spec.replicas", 3))
    assert change == Change("r", STS, "update", ("spec.replicas",))
    image = _with(old, "spec.template.spec.containers[0].image", "postgres:17")
    assert _one(STS, old, image) == Change("r", STS, "update", ("spec.template.spec.containers[0].image",))


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("spec.volumeClaimTemplates[0].spec.resources.requests.storage", "20Gi", "spec.volumeClaimTemplates"),
        ("spec.serviceName", "db-headless", "spec.serviceName"),
        ("spec.podManagementPolicy", "Parallel", "spec.podManagementPolicy"),
        ("spec.selector.matchLabels", {"app": "db2"}, "spec.selector"),
        ("spec.revisionHistoryLimit", 5, "spec.revisionHistoryLimit"),
    ],
)
def test_statefulset_force_new_fields_replace(path: str, value: Any, reason: str) -> None:
    old = _statefulset()
    assert _one(STS, old, _with(old, path, value)) == Change("r", STS, "replace", (reason,))


# ---------------------------------------------------- PersistentVolumeClaim (diff.go core v1 row)


def _pvc() -> dict[str, Any]:
    return _obj(
        "v1",
        "PersistentVolumeClaim",
        spec={
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "gp3",
            "resources": {"requests": {"storage": "10Gi"}},
        },
    )


def test_pvc_storage_growth_is_an_update() -> None:
    old = _pvc()
    new = _with(old, "spec.resources.requests.storage", "20Gi")
    assert replace_reasons(PVC, old, new) == []
    assert _one(PVC, old, new) == Change("r", PVC, "update", ("spec.resources.requests.storage",))


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("spec.storageClassName", "standard", "spec.storageClassName"),
        ("spec.accessModes", ["ReadWriteMany"], "spec.accessModes"),
        ("spec.volumeName", "pv-1", "spec.volumeName"),
        ("spec.selector", {"matchLabels": {"tier": "fast"}}, "spec.selector"),
    ],
)
def test_pvc_identity_fields_replace(path: str, value: Any, reason: str) -> None:
    old = _pvc()
    assert replace_reasons(PVC, old, _with(old, path, value)) == [reason]


def test_pvc_adding_access_modes_into_empty_spec_replaces() -> None:
    # diff_test.go "Adding spec and nested field results in correct diffs." -> spec.accessModes: ADD_REPLACE
    old = _obj("v1", "PersistentVolumeClaim", spec={})
    new = _obj("v1", "PersistentVolumeClaim", spec={"accessModes": {}})
    assert replace_reasons(PVC, old, new) == ["spec.accessModes"]


# ---------------------------------------------------------- Secret / ConfigMap (forceNewProperties)


def _secret(**fields: Any) -> dict[str, Any]:
    return _obj("v1", "Secret", type="Opaque", **fields)


def test_secret_data_change_replaces_by_default() -> None:
    old = _secret(data={"password": _b64("a")})
    new = _secret(data={"password": _b64("b")})
    assert _one(SECRET, old, new) == Change("r", SECRET, "replace", ("data",))
    assert replace_reasons(SECRET, _secret(stringData={"k": "a"}), _secret(stringData={"k": "b"})) == ["data"]


def test_secret_mutable_flag_turns_data_change_into_update_unless_immutable() -> None:
    old, new = _secret(data={"password": _b64("a")}), _secret(data={"password": _b64("b")})
    assert _one(SECRET, old, new, enable_secret_mutable=True) == Change("r", SECRET, "update", ("data.password",))
    frozen_old, frozen_new = _with(old, "immutable", True), _with(new, "immutable", True)
    assert replace_reasons(SECRET, frozen_old, frozen_new, enable_secret_mutable=True) == ["data"]
    retyped = _with(old, "type", "kubernetes.io/dockerconfigjson")
    assert replace_reasons(SECRET, old, retyped, enable_secret_mutable=True) == ["type"]


def test_secret_metadata_change_is_an_update() -> None:
    old = _secret(data={"password": _b64("a")})
    new = _with(old, "metadata.labels", {"app": "x", "team": "ml"})
    assert _one(SECRET, old, new) == Change("r", SECRET, "update", ("metadata.labels.team",))


def test_secret_string_data_and_data_with_the_same_content_are_the_same() -> None:
    # clients.normalizeSecret folds stringData into data (base64) before the diff.
    old = _secret(stringData={"password": "hunter2"})
    assert _one(SECRET, old, _secret(data={"password": _b64("hunter2")})).action == "same"
    assert _one(SECRET, old, _secret(data={"password": _b64("other")})).action == "replace"


def test_configmap_data_change_replaces_by_default_and_updates_when_mutable() -> None:
    old = _obj("v1", "ConfigMap", data={"a": "1"})
    new = _obj("v1", "ConfigMap", data={"a": "2"})
    assert _one(CONFIG_MAP, old, new) == Change("r", CONFIG_MAP, "replace", ("data",))
    assert _one(CONFIG_MAP, old, new, enable_configmap_mutable=True).action == "update"
    frozen_old, frozen_new = _with(old, "immutable", True), _with(new, "immutable", True)
    assert replace_reasons(CONFIG_MAP, frozen_old, frozen_new, enable_configmap_mutable=True) == ["data"]
    binary = _with(old, "binaryData", {"b": _b64("x")})
    assert replace_reasons(CONFIG_MAP, old, binary) == ["binaryData"]


# -------------------------------------------------- metadata.name / metadata.namespace (every kind)


def test_namespace_rename_replaces_and_label_change_updates() -> None:
    ns_type = "kubernetes:core/v1:Namespace"
    old = _obj("v1", "Namespace", name="ml", namespace=None)
    assert _one(ns_type, old, _with(old, "metadata.name", "ml2")) == Change("r", ns_type, "replace", ("metadata.name",))
    labels = _with(old, "metadata.labels", {"app": "ml", "istio-injection": "enabled"})
    assert _one(ns_type, old, labels).action == "update"
    # Namespace is cluster-scoped: the provider clears a namespace set on it before diffing.
    assert _one(ns_type, old, _with(old, "metadata.namespace", "elsewhere")).action == "same"


def test_moving_a_namespaced_object_replaces_but_default_namespace_is_implicit() -> None:
    old = _deployment()
    assert replace_reasons(DEPLOY, old, _with(old, "metadata.namespace", "other")) == ["metadata.namespace"]
    unset = _with(old, "metadata.namespace", ...)
    assert _one(DEPLOY, _with(old, "metadata.namespace", "default"), unset).action == "same"
    assert _one(DEPLOY, old, unset).action == "replace"


def test_removing_all_metadata_of_a_cluster_scoped_object_replaces() -> None:
    old = _obj("v1", "Namespace", name="ml", namespace=None)
    new = {"apiVersion": "v1", "kind": "Namespace"}
    assert replace_reasons("kubernetes:core/v1:Namespace", old, new) == ["metadata"]


# ------------------------------------------------------------------------------- Job (diff.go `job`)


def _job() -> dict[str, Any]:
    return _obj(
        "batch/v1",
        "Job",
        spec={
            "backoffLimit": 2,
            "parallelism": 1,
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "j", "image": "j:1"}]}},
        },
    )


def test_job_template_change_replaces_and_backoff_limit_updates() -> None:
    job_type = "kubernetes:batch/v1:Job"
    old = _job()
    image = _with(old, "spec.template.spec.containers[0].image", "j:2")
    assert _one(job_type, old, image) == Change("r", job_type, "replace", ("spec.template",))
    assert replace_reasons(job_type, old, _with(old, "spec.parallelism", 2)) == ["spec.parallelism"]
    assert _one(job_type, old, _with(old, "spec.backoffLimit", 4)) == Change(
        "r", job_type, "update", ("spec.backoffLimit",)
    )


def test_cronjob_has_no_force_new_fields() -> None:
    cron_type = "kubernetes:batch/v1:CronJob"
    old = _obj("batch/v1", "CronJob", spec={"schedule": "0 * * * *", "jobTemplate": {"spec": {"template": {}}}})
    new = _with(old, "spec.schedule", "*/5 * * * *")
    new = _with(new, "spec.jobTemplate.spec.template", {"spec": {"restartPolicy": "OnFailure"}})
    assert _one(cron_type, old, new).action == "update"
    assert _one(cron_type, old, _with(old, "metadata.name", "y")).action == "replace"


# ---------------------------------------- Deployment / DaemonSet / ReplicaSet (diff.go apps group)


def test_deployment_image_updates_and_selector_replaces() -> None:
    old = _deployment()
    image = _with(old, "spec.template.spec.containers[0].image", "x:2")
    assert _one(DEPLOY, old, image) == Change("r", DEPLOY, "update", ("spec.template.spec.containers[0].image",))
    selector = _with(old, "spec.selector.matchLabels.app", "y")
    assert _one(DEPLOY, old, selector) == Change("r", DEPLOY, "replace", ("spec.selector",))


def test_daemonset_selector_replaces_replicaset_selector_does_not() -> None:
    ds = _with(_deployment(), "kind", "DaemonSet")
    assert replace_reasons("kubernetes:apps/v1:DaemonSet", ds, _with(ds, "spec.selector.matchLabels.app", "y")) == [
        "spec.selector"
    ]
    rs = _with(_deployment(), "kind", "ReplicaSet")  # ReplicaSet is in no row of the provider's table
    assert replace_reasons("kubernetes:apps/v1:ReplicaSet", rs, _with(rs, "spec.selector.matchLabels.app", "y")) == []


# ---------------------------------------------------------------------------------- Service, PV, Pod


def test_service_type_updates_and_cluster_ip_replaces() -> None:
    svc_type = "kubernetes:core/v1:Service"
    old = _obj("v1", "Service", spec={"type": "ClusterIP", "clusterIP": "None", "ports": [{"port": 80}]})
    assert _one(svc_type, old, _with(old, "spec.type", "NodePort")).action == "update"
    assert replace_reasons(svc_type, old, _with(old, "spec.clusterIP", "10.0.0.9")) == ["spec.clusterIP"]
    assert replace_reasons(svc_type, old, _with(old, "spec.clusterIP", ...)) == ["spec.clusterIP"]
    assert _one(svc_type, old, _with(old, "spec.ports[0].port", 8080)).action == "update"


def test_persistent_volume_source_replaces_capacity_updates() -> None:
    pv_type = "kubernetes:core/v1:PersistentVolume"
    old = _obj(
        "v1",
        "PersistentVolume",
        namespace=None,
        spec={"capacity": {"storage": "10Gi"}, "csi": {"driver": "ebs.csi.aws.com", "volumeHandle": "vol-1"}},
    )
    assert replace_reasons(pv_type, old, _with(old, "spec.csi.volumeHandle", "vol-2")) == ["spec.csi"]
    assert _one(pv_type, old, _with(old, "spec.capacity.storage", "20Gi")).action == "update"


def test_pod_container_image_replaces_labels_update() -> None:
    pod_type = "kubernetes:core/v1:Pod"
    old = _obj("v1", "Pod", spec={"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]})
    assert replace_reasons(pod_type, old, _with(old, "spec.containers[1].image", "b:2")) == ["spec.containers[*].image"]
    assert _one(pod_type, old, _with(old, "metadata.labels.app", "z")).action == "update"


# ------------------------------------------------ RBAC, PDB, StorageClass, custom resources, types


def test_role_binding_role_ref_replaces_subjects_update() -> None:
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        type_ = f"kubernetes:rbac.authorization.k8s.io/v1:{kind}"
        old = _obj(
            "rbac.authorization.k8s.io/v1",
            kind,
            roleRef={"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
            subjects=[{"kind": "ServiceAccount", "name": "a"}],
        )
        assert replace_reasons(type_, old, _with(old, "roleRef.name", "r2")) == ["roleRef"], kind
        assert _one(type_, old, _with(old, "subjects[0].name", "b")).action == "update", kind


def test_pdb_policy_v1_spec_updates_only_v1beta1_replaces() -> None:
    old = _obj("policy/v1", "PodDisruptionBudget", spec={"minAvailable": 1, "selector": {"matchLabels": {"a": "b"}}})
    new = _with(old, "spec.minAvailable", 2)
    assert _one("kubernetes:policy/v1:PodDisruptionBudget", old, new).action == "update"
    beta_old, beta_new = _with(old, "apiVersion", "policy/v1beta1"), _with(new, "apiVersion", "policy/v1beta1")
    assert replace_reasons("kubernetes:policy/v1beta1:PodDisruptionBudget", beta_old, beta_new) == ["spec"]


def test_storage_class_parameters_and_provisioner_replace_reclaim_policy_updates() -> None:
    sc_type = "kubernetes:storage.k8s.io/v1:StorageClass"
    old = _obj(
        "storage.k8s.io/v1",
        "StorageClass",
        namespace=None,
        provisioner="ebs.csi.aws.com",
        parameters={"type": "gp3"},
        reclaimPolicy="Delete",
    )
    assert replace_reasons(sc_type, old, _with(old, "parameters.type", "io2")) == ["parameters"]
    assert replace_reasons(sc_type, old, _with(old, "provisioner", "efs.csi.aws.com")) == ["provisioner"]
    assert _one(sc_type, old, _with(old, "reclaimPolicy", "Retain")).action == "update"


def test_custom_resources_only_replace_on_name_or_namespace() -> None:
    app_type = "kubernetes:argoproj.io/v1alpha1:Application"
    old = _obj("argoproj.io/v1alpha1", "Application", namespace="argocd", spec={"source": {"targetRevision": "main"}})
    assert _one(app_type, old, _with(old, "spec.source.targetRevision", "v2")).action == "update"
    assert replace_reasons(app_type, old, _with(old, "metadata.name", "y")) == ["metadata.name"]


def test_aliased_api_version_change_is_an_update_unaliased_is_a_replace() -> None:
    beta = _obj("policy/v1beta1", "PodDisruptionBudget", spec={"minAvailable": 1})
    ga = _with(beta, "apiVersion", "policy/v1")
    (change,) = plan(
        {"pdb": ("kubernetes:policy/v1beta1:PodDisruptionBudget", beta)},
        {"pdb": ("kubernetes:policy/v1:PodDisruptionBudget", ga)},
    )
    assert change == Change("pdb", "kubernetes:policy/v1:PodDisruptionBudget", "update", ("apiVersion",))
    cr_old = _obj("karpenter.sh/v1beta1", "NodePool", namespace=None, spec={})
    cr_new = _with(cr_old, "apiVersion", "karpenter.sh/v1")
    (change,) = plan(
        {"pool": ("kubernetes:karpenter.sh/v1beta1:NodePool", cr_old)},
        {"pool": ("kubernetes:karpenter.sh/v1:NodePool", cr_new)},
    )
    assert change == Change("pool", "kubernetes:karpenter.sh/v1:NodePool", "replace", ("apiVersion",))


def test_sdk_aliases_every_pair_of_builtin_types_with_the_same_kind() -> None:
    """The alias rule and _SDK_GROUPS, checked against the installed pulumi_kubernetes SDK."""
    pk = pytest.importorskip("pulumi_kubernetes")
    tokens: dict[str, set[str]] = {}
    for source in Path(pk.__file__).parent.rglob("*.py"):
        text = source.read_text()
        for match in re.finditer(r"super\(\w+, __self__\)\.__init__\(\s*'(kubernetes:[^']+)'", text):
            tokens[match.group(1)] = set(re.findall(r'pulumi\.Alias\(type_="([^"]+)"\)', text))
    objects = {t for t in tokens if t.split(":")[1].split("/")[0] not in {"helm.sh", "yaml", "kustomize"}}
    assert len(objects) > 300
    assert {t.split(":")[1].split("/")[0] for t in objects} == replacement._SDK_GROUPS
    pairs = 0
    for a in objects:
        for b in objects - {a}:
            pairs += b in tokens[a]
            assert replacement._aliased(a, b) == (b in tokens[a]), (a, b)
    assert pairs > 100


# --------------------------------------------------------------------------------------- Helm Chart


def test_chart_input_changes_are_updates() -> None:
    chart = {"chart": "argo-cd", "version": "7.0.0", "namespace": "argocd", "values": {"server": {"replicas": 1}}}
    bumped = _with(_with(chart, "version", "7.1.0"), "values.server.replicas", 2)
    change = _one(replacement.CHART_TYPE, chart, bumped)
    assert change == Change("r", replacement.CHART_TYPE, "update", ("values.server.replicas", "version"))
    assert _one(replacement.CHART_TYPE, chart, _with(chart, "namespace", "cd")).action == "update"
    assert _one(replacement.CHART_TYPE, chart, copy.deepcopy(chart)).action == "same"


# ----------------------------------------------------------------------- plan() and value semantics


def test_plan_create_delete_same_in_name_order() -> None:
    d = _deployment()
    old = {"b": (DEPLOY, d), "gone": (DEPLOY, d), "a": (DEPLOY, d)}
    new = {"a": (DEPLOY, copy.deepcopy(d)), "b": (DEPLOY, _with(d, "spec.replicas", 3)), "added": (DEPLOY, d)}
    assert plan(old, new) == [
        Change("a", DEPLOY, "same", ()),
        Change("added", DEPLOY, "create", ()),
        Change("b", DEPLOY, "update", ("spec.replicas",)),
        Change("gone", DEPLOY, "delete", ()),
    ]


def test_values_compare_semantically() -> None:
    d = _deployment()
    assert changed_paths(DEPLOY, d, _with(d, "spec.replicas", 2.0)) == []  # 3.0 == 3 (equalNumbers)
    assert changed_paths(DEPLOY, d, _with(d, "spec.replicas", "2")) == ["spec.replicas"]  # a string is not a number
    flag = _with(d, "spec.paused", 1)
    assert changed_paths(DEPLOY, flag, _with(d, "spec.paused", True)) == ["spec.paused"]  # a bool is not a number
    reordered = dict(reversed(list(d.items())))
    assert changed_paths(DEPLOY, d, reordered) == []  # key order never matters
    assert changed_paths(DEPLOY, d, _with(d, "spec.strategy", None)) == []  # null == absent (SkipNulls)
    assert changed_paths(DEPLOY, d, _with(d, "metadata.annotations", {})) == ["metadata.annotations"]
    swapped = _with(d, "spec.template.spec.containers", [{"name": "y", "image": "y"}, {"name": "x", "image": "x:1"}])
    assert "spec.template.spec.containers[1]" in changed_paths(DEPLOY, d, swapped)  # lists compare by index


def test_paths_print_like_the_provider_detailed_diff() -> None:
    d = _with(_deployment(), "metadata.annotations", {"owner": "ml"})
    annotated = _with(d, "metadata.annotations", {"owner": "ml", "app.kubernetes.io/name": "x"})
    assert changed_paths(DEPLOY, d, annotated) == ['metadata.annotations["app.kubernetes.io/name"]']
    assert changed_paths(DEPLOY, _deployment(), annotated) == ["metadata.annotations"]  # a whole map added


def test_delete_before_replace_for_explicit_names_only() -> None:
    old = _statefulset()
    vct = _with(old, "spec.volumeClaimTemplates[0].spec.resources.requests.storage", "20Gi")
    assert delete_before_replace(STS, old, vct) is True
    assert delete_before_replace(STS, old, _with(old, "metadata.name", "y")) is False  # new name: create first
    assert delete_before_replace(STS, old, _with(old, "spec.replicas", 2)) is False  # not a replacement


def test_table_rows_are_reachable_and_metadata_is_universal() -> None:
    assert force_new_paths(STS, _statefulset())[:2] == ("metadata.name", "metadata.namespace")
    assert "spec.volumeClaimTemplates" in FORCE_NEW["apps/v1:StatefulSet"]
    assert "spec.resources" not in FORCE_NEW["core/v1:PersistentVolumeClaim"]
    assert "PodDisruptionBudget" not in {key.split(":")[1] for key in FORCE_NEW if key.startswith("policy/v1:")}
    assert force_new_paths(replacement.CHART_TYPE, {"chart": "x"}) == ()


def test_module_imports_only_the_standard_library() -> None:
    tree = ast.parse(Path(replacement.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - {"__future__"} <= sys.stdlib_module_names, imported


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
