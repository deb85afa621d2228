"""What rendered objects reference, what the program creates, and what is left for the cluster to have.

A real cluster does not check references when an object is applied: a pod whose Secret,
ServiceAccount or PVC nothing created sits in CreateContainerConfigError, a custom
resource without its CRD fails to apply, a ServiceAccount's IAM role that does not exist
fails at the first S3 call. Here every reference of every rendered object (and of the
model-service manifests Argo CD applies) is derived from the manifests themselves, matched
against what the program creates and against `loopform.prerequisites`; whatever is left is
a pod that would not start. Pure functions over plain manifests: no Pulumi, no cluster.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from loopform.identity import ACCESS_KEY, IRSA_ANNOTATION
from loopform.prerequisites import BUILTIN_NAMESPACES, DEFAULT_STORAGE_CLASS, Prerequisite

CRD = "CustomResourceDefinition"
_S3 = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])")
#: What any YAML or JSON text with a mapping key `s3` contains: s3, maybe a closing quote, then the `:` indicator.
_S3_KEY = re.compile(r"s3['\"]?\s*:")
#: The CRDs each upstream chart installs with `crds.install: true` (its templates/crds/ folder, pinned versions).
CHART_CRDS = {
    "argo-workflows": (
        "clusterworkflowtemplates.argoproj.io",
        "cronworkflows.argoproj.io",
        "workflowartifactgctasks.argoproj.io",
        "workfloweventbindings.argoproj.io",
        "workflows.argoproj.io",
        "workflowtaskresults.argoproj.io",
        "workflowtasksets.argoproj.io",
        "workflowtemplates.argoproj.io",
    ),
    "argo-cd": ("applications.argoproj.io", "applicationsets.argoproj.io", "appprojects.argoproj.io"),
    "argo-events": ("eventbus.argoproj.io", "eventsources.argoproj.io", "sensors.argoproj.io"),
    # Its `crds` sub-chart (the Prometheus Operator's CRDs), switched by `crds.enabled`.
    "kube-prometheus-stack": tuple(
        f"{plural}.monitoring.coreos.com"
        for plural in (
            "alertmanagerconfigs",
            "alertmanagers",
            "podmonitors",
            "probes",
            "prometheusagents",
            "prometheuses",
            "prometheusrules",
            "scrapeconfigs",
            "servicemonitors",
            "thanosrulers",
        )
    ),
}
#: Chart values switches that make a chart render a custom resource of these CRDs.
CHART_CR_SWITCHES = {
    "serviceMonitor": "servicemonitors.monitoring.coreos.com",
    "prometheusRule": "prometheusrules.monitoring.coreos.com",
    "podMonitor": "podmonitors.monitoring.coreos.com",
}
#: Kinds whose CRD's `spec.names.plural` is not the English plural (Argo Events names it `eventbus`).
_IRREGULAR_PLURALS = {"EventBus": "eventbus"}
_PREREQUISITE_KINDS = {
    "crd": CRD,
    "api-service": "APIService",
    "storage-class": "StorageClass",
    "namespace": "Namespace",
    "iam-role": "IAMRole",
    "bucket": "Bucket",
    "aws-tag": "AWSTag",
}


@dataclass(frozen=True, order=True)
class Ref:
    """An object by kind, namespace and name (and a key, for a Secret's key); `by` says who refers to it."""

    kind: str
    namespace: str | None
    name: str
    key: str | None = None
    by: str = field(default="", compare=False)

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        key = f" key {self.key!r}" if self.key else ""
        return f"{self.kind} {where}{self.name}{key}"


def crd_name(api_version: str, kind: str) -> str:
    """The CRD that defines `kind` in `api_version`'s group: `<plural>.<group>` (EC2NodeClass -> ec2nodeclasses)."""
    singular = kind.lower()
    if kind in _IRREGULAR_PLURALS:
        plural = _IRREGULAR_PLURALS[kind]
    elif singular.endswith("s"):
        plural = f"{singular}es"
    elif singular.endswith("y"):
        plural = f"{singular[:-1]}ies"
    else:
        plural = f"{singular}s"
    return f"{plural}.{api_version.split('/', 1)[0]}"


def role_name(arn_or_name: str) -> str:
    """An IAM role's name, from its ARN or its name."""
    return arn_or_name.rsplit("/", 1)[-1]


# --- what an object references ------------------------------------------------------------------


WORKLOADS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"})


def _pod_specs(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The pod specs inside a workload (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob)."""
    if manifest["kind"] not in WORKLOADS:
        return
    spec = manifest.get("spec") or {}
    if manifest["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template = spec.get("template")
    if isinstance(template, dict) and "spec" in template:
        yield template["spec"]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _container_refs(container: dict[str, Any], namespace: str, by: str) -> Iterator[Ref]:
    for env in container.get("env") or []:
        source = env.get("valueFrom") or {}
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if not ref.get("optional"):
                yield Ref("Secret", namespace, ref["name"], ref["key"], by=by)
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            if not ref.get("optional"):
                yield Ref("ConfigMap", namespace, ref["name"], ref["key"], by=by)
    for source in container.get("envFrom") or []:
        for kind, field_name in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
            ref = source.get(field_name)
            if ref and not ref.get("optional"):
                yield Ref(kind, namespace, ref["name"], by=by)


def _pod_refs(pod: dict[str, Any], namespace: str, by: str) -> Iterator[Ref]:
    yield Ref("ServiceAccount", namespace, pod.get("serviceAccountName") or "default", by=by)
    for secret in pod.get("imagePullSecrets") or []:
        yield Ref("Secret", namespace, secret["name"], by=by)
    for volume in pod.get("volumes") or []:
        if "secret" in volume and not volume["secret"].get("optional"):
            yield Ref("Secret", namespace, volume["secret"]["secretName"], by=by)
        if "configMap" in volume and not volume["configMap"].get("optional"):
            yield Ref("ConfigMap", namespace, volume["configMap"]["name"], by=by)
        if "persistentVolumeClaim" in volume:
            yield Ref("PersistentVolumeClaim", namespace, volume["persistentVolumeClaim"]["claimName"], by=by)
    for container in _containers(pod):
        yield from _container_refs(container, namespace, by)


def _workflow_template_refs(manifest: dict[str, Any], namespace: str, by: str) -> Iterator[Ref]:
    """An Argo WorkflowTemplate: its pods' account, each template's container, the artifact repository."""
    spec = manifest["spec"]
    yield Ref("ServiceAccount", namespace, spec.get("serviceAccountName") or "default", by=by)
    pod_level = {"volumes": spec.get("volumes") or []}
    yield from _pod_refs({**pod_level, "serviceAccountName": spec.get("serviceAccountName")}, namespace, by)
    for template in spec.get("templates") or []:
        if "container" in template:
            yield from _container_refs(template["container"], namespace, by)
    repository = spec.get("artifactRepositoryRef")
    if repository:
        yield Ref("ConfigMap", namespace, repository["configMap"], repository["key"], by=by)


def _artifact_repository_refs(data: dict[str, str], namespace: str, by: str) -> Iterator[Ref]:
    """The Secrets and bucket an Argo artifact-repository ConfigMap names."""
    for text in data.values():
        if not _S3_KEY.search(text):  # parse only what can hold one: a stack's dashboards are megabytes of JSON
            continue
        try:
            repository = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        s3 = repository.get("s3") if isinstance(repository, dict) else None
        if not isinstance(s3, dict):
            continue
        yield Ref("Bucket", None, s3["bucket"], by=by)
        for field_name in ("accessKeySecret", "secretKeySecret"):
            if field_name in s3:
                yield Ref("Secret", namespace, s3[field_name]["name"], s3[field_name]["key"], by=by)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def object_refs(manifest: dict[str, Any]) -> list[Ref]:
    """Everything one Kubernetes object needs to exist (besides itself)."""
    kind, metadata = manifest["kind"], manifest.get("metadata") or {}
    namespace = metadata.get("namespace")
    by = f"{kind} {namespace + '/' if namespace else ''}{metadata.get('name')}"
    refs: list[Ref] = []
    group = manifest["apiVersion"].rpartition("/")[0]
    if "." in group and not group.endswith(".k8s.io"):  # built-in groups are core, apps, batch, *.k8s.io
        refs.append(Ref(CRD, None, crd_name(manifest["apiVersion"], kind), by=by))
    if namespace:
        refs.append(Ref("Namespace", None, namespace, by=by))
    for pod in _pod_specs(manifest):
        refs.extend(_pod_refs(pod, namespace, by))
    spec = manifest.get("spec") or {}
    if kind == "StatefulSet":
        for claim in spec.get("volumeClaimTemplates") or []:
            refs.append(
                Ref("StorageClass", None, claim["spec"].get("storageClassName") or DEFAULT_STORAGE_CLASS, by=by)
            )
    elif kind == "PersistentVolumeClaim":
        refs.append(Ref("StorageClass", None, spec.get("storageClassName") or DEFAULT_STORAGE_CLASS, by=by))
    elif kind == "WorkflowTemplate":
        refs.extend(_workflow_template_refs(manifest, namespace, by))
    elif kind == "CronWorkflow":
        template = spec["workflowSpec"].get("workflowTemplateRef")
        if template:
            refs.append(Ref("WorkflowTemplate", namespace, template["name"], by=by))
    elif kind == "ConfigMap":
        refs.extend(_artifact_repository_refs(manifest.get("data") or {}, namespace, by))
    elif kind == "RoleBinding":
        role = manifest["roleRef"]
        refs.append(Ref(role["kind"], namespace if role["kind"] == "Role" else None, role["name"], by=by))
        for subject in manifest.get("subjects") or []:
            if subject["kind"] == "ServiceAccount":
                refs.append(Ref("ServiceAccount", subject.get("namespace") or namespace, subject["name"], by=by))
    elif kind == "HorizontalPodAutoscaler":
        target = spec["scaleTargetRef"]
        refs.append(Ref(target["kind"], namespace, target["name"], by=by))
        if any(metric.get("type") == "Resource" for metric in spec.get("metrics") or []):
            refs.append(Ref("APIService", None, "v1beta1.metrics.k8s.io", by=by))
    elif kind == "ServiceAccount" and IRSA_ANNOTATION in (metadata.get("annotations") or {}):
        refs.append(Ref("IAMRole", None, role_name(metadata["annotations"][IRSA_ANNOTATION]), by=by))
    elif kind == "EC2NodeClass":
        refs.append(Ref("IAMRole", None, role_name(spec["role"]), by=by))
        for term in [*spec.get("subnetSelectorTerms", []), *spec.get("securityGroupSelectorTerms", [])]:
            for tag, value in (term.get("tags") or {}).items():
                refs.append(Ref("AWSTag", None, f"{tag}={value}", by=by))
    elif kind == "NodePool":
        node_class = spec["template"]["spec"]["nodeClassRef"]
        refs.append(Ref(node_class["kind"], None, node_class["name"], by=by))
    elif kind == "Application":
        refs.append(Ref("AppProject", namespace, spec["project"], by=by))
        refs.append(Ref("Namespace", None, spec["destination"]["namespace"], by=by))
    elif kind == "AppProject":
        refs.extend(Ref("Namespace", None, d["namespace"], by=by) for d in spec.get("destinations") or [])
    # Any s3:// location an object names is a bucket it needs; program source shipped in a ConfigMap only
    # mentions them (docstrings, examples): its locations come in through the environment.
    scanned = manifest
    if kind == "ConfigMap":
        data = {key: value for key, value in (manifest.get("data") or {}).items() if not key.endswith(".py")}
        scanned = {**manifest, "data": data}
    refs.extend(Ref("Bucket", None, bucket, by=by) for text in _strings(scanned) for bucket in _S3.findall(text))
    return refs


def chart_refs(chart: dict[str, Any], by: str) -> list[Ref]:
    """A Helm chart's own references: its namespace, and the CRDs of custom resources its values switch on."""
    refs = [Ref("Namespace", None, chart["namespace"], by=by)] if chart.get("namespace") else []

    def walk(values: Any) -> None:
        if not isinstance(values, dict):
            return
        for key, value in values.items():
            if key in CHART_CR_SWITCHES and isinstance(value, dict) and value.get("enabled") is True:
                refs.append(Ref(CRD, None, CHART_CR_SWITCHES[key], by=by))
            walk(value)

    walk(chart.get("values") or {})
    return refs


# --- what the program and the cluster provide -------------------------------------------------------


def object_provides(manifest: dict[str, Any]) -> list[Ref]:
    """The object itself (with each key of a Secret or ConfigMap), and what it creates in turn."""
    kind, metadata = manifest["kind"], manifest.get("metadata") or {}
    namespace = metadata.get("namespace")
    name = metadata["name"]
    provided = [Ref(kind, namespace, name)]
    if kind in ("Secret", "ConfigMap"):
        for data_field in ("data", "stringData", "binaryData"):
            provided.extend(Ref(kind, namespace, name, key) for key in manifest.get(data_field) or {})
    if kind == "Namespace":
        provided.append(Ref("ServiceAccount", name, "default"))  # every namespace gets its default account
    if kind == "StatefulSet":
        replicas = int(manifest["spec"].get("replicas", 1))
        for claim in manifest["spec"].get("volumeClaimTemplates") or []:
            claim_name = claim["metadata"]["name"]
            provided.extend(
                Ref("PersistentVolumeClaim", namespace, f"{claim_name}-{name}-{i}") for i in range(replicas)
            )
    return provided


def chart_provides(chart: dict[str, Any]) -> list[Ref]:
    """The CRDs a chart installs (when its values keep `crds.install` on, the charts' default)."""
    crds = (chart.get("values") or {}).get("crds") or {}
    if crds.get("install", True) is False or crds.get("enabled", True) is False:
        return []
    return [Ref(CRD, None, crd) for crd in CHART_CRDS.get(chart.get("chart", ""), ())]


def prerequisite_ref(item: Prerequisite) -> Ref | None:
    """The object a prerequisite stands for, where manifests can reference it (not an OIDC provider or config)."""
    kind = _PREREQUISITE_KINDS.get(item.kind)
    if kind is None:
        return None
    return Ref(kind, item.namespace, role_name(item.name) if kind == "IAMRole" else item.name)


#: What every cluster has: its built-in namespaces and their default ServiceAccounts.
BUILTIN = frozenset(
    {Ref("Namespace", None, namespace) for namespace in BUILTIN_NAMESPACES}
    | {Ref("ServiceAccount", namespace, "default") for namespace in BUILTIN_NAMESPACES}
)


# --- the check ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifests:
    """The rendered Kubernetes objects and charts of a stack (plus the manifests Argo CD applies)."""

    objects: list[dict[str, Any]]
    charts: list[tuple[str, dict[str, Any]]]
    """(resource name, chart + version + values)."""


def unresolved(manifests: Manifests, prerequisites: Iterable[Prerequisite]) -> list[Ref]:
    """References that nothing creates and no prerequisite covers: each one is a pod or apply that fails."""
    provided: set[Ref] = set(BUILTIN) | {ref for item in prerequisites if (ref := prerequisite_ref(item))}
    refs: list[Ref] = []
    for manifest in manifests.objects:
        provided.update(object_provides(manifest))
        refs.extend(object_refs(manifest))
    for name, chart in manifests.charts:
        provided.update(chart_provides(chart))
        refs.extend(chart_refs(chart, f"chart {name}"))
    missing = {ref: ref for ref in refs if ref not in provided}
    return sorted(missing.values())


def pods_without_object_store_credentials(manifests: Manifests, prerequisites: Iterable[Prerequisite]) -> list[str]:
    """Pods that name an s3:// location but have no way to authenticate to it.

    Credentials are: an IRSA-annotated ServiceAccount, a Pod Identity association for the
    ServiceAccount (a prerequisite), or static keys loaded with envFrom from a Secret that has them.
    """
    associations = {item.name for item in prerequisites if item.kind == "pod-identity-association"}
    accounts = {
        (m["metadata"]["namespace"], m["metadata"]["name"])
        for m in manifests.objects
        if m["kind"] == "ServiceAccount" and IRSA_ANNOTATION in (m["metadata"].get("annotations") or {})
    }
    key_secrets = {
        (m["metadata"]["namespace"], m["metadata"]["name"])
        for m in manifests.objects
        if m["kind"] == "Secret" and ACCESS_KEY in {**(m.get("stringData") or {}), **(m.get("data") or {})}
    }
    missing = []
    for manifest in manifests.objects:
        namespace = manifest["metadata"].get("namespace")
        pods = list(_pod_specs(manifest))
        if manifest["kind"] == "WorkflowTemplate":
            spec = manifest["spec"]
            containers = [
                {"name": t["name"], **t["container"]} for t in spec.get("templates") or [] if "container" in t
            ]
            pods = [{"serviceAccountName": spec.get("serviceAccountName"), "containers": containers}]
        for pod in pods:
            for container in _containers(pod):
                if not any(_S3.search(text) for text in _strings(container)):
                    continue
                account = pod.get("serviceAccountName") or "default"
                loaded = {
                    (namespace, s["secretRef"]["name"]) for s in container.get("envFrom") or [] if "secretRef" in s
                }
                if (namespace, account) in accounts or f"{namespace}/{account}" in associations or loaded & key_secrets:
                    continue
                missing.append(
                    f"{manifest['kind']} {namespace}/{manifest['metadata']['name']} container {container['name']} "
                    f"(ServiceAccount {account})"
                )
    return missing
