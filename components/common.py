"""Small builders shared by the components: labels, metadata, hardened pod and container settings.

Kept here so that every workload gets the same restricted security context, probes and
labels, and a fix lands everywhere at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pulumi

from loopform.image_ref import ImageRef
from loopform.spec import Resources

PART_OF = "loopform"


def labels(component: str, instance: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Recommended Kubernetes labels (app.kubernetes.io/*) plus the stack's common labels."""
    return {
        **(extra or {}),
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": "pulumi",
    }


def selector(component: str, instance: str) -> dict[str, str]:
    """The immutable subset of labels that Services and workloads select on."""
    return {"app.kubernetes.io/name": component, "app.kubernetes.io/instance": instance}


def metadata(
    name: str, namespace: str | None, object_labels: dict[str, str], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": object_labels}
    if namespace:
        meta["namespace"] = namespace
    if annotations:
        meta["annotations"] = annotations
    return meta


#: The user loopform's images (images/*/Dockerfile) run as: 10000 or above, so it maps to no user of the host.
IMAGE_UID = 10001
#: Kubernetes resource annotations Checkov reads as reviewed exceptions: `checkov.io/skip<n>: <check>=<reason>`.
CHECKOV_SKIP = "checkov.io/skip"


#: A database image's own user: the files on its volume are that user's, so a pod of another UID could not
#: start on an existing volume (day-two safety outweighs the rule).
DATA_OWNER_EXCEPTION = (
    "CKV_K8S_40",
    "the official image's user owns the data on the volume; another UID could not open an existing database",
)


#: Feast (the feature server, its jobs, and the model services reading the online store through it) takes its
#: online store and registry URLs, passwords inside, from environment variables only.
FEAST_ENV_EXCEPTION = (
    "CKV_K8S_35",
    "Feast reads the online store and registry URLs only from env vars (${VAR} in feature_store.yaml)",
)


def image(reference: str) -> dict[str, str]:
    """A container's image fields: a tag can be moved, so it is pulled every time; a digest cannot."""
    return {"image": reference} if "@sha256:" in reference else {"image": reference, "imagePullPolicy": "Always"}


def chart_image(reference: str, *, registry: bool = False) -> dict[str, str]:
    """A chart's `image` values block for `reference`: repository (with the registry apart where the chart takes it
    apart) and tag, a digest following the tag (`v1.2.3@sha256:...`); charts join them as `repository:tag`."""
    ref = ImageRef.parse(reference)
    tag = (ref.tag or "") + (f"@{ref.digest}" if ref.digest else "")
    if registry and "/" in ref.repository:
        host, repository = ref.repository.split("/", 1)
        return {"registry": host, "repository": repository, "tag": tag}
    return {"repository": ref.repository, "tag": tag}


def checkov_skips(*exceptions: tuple[str, str]) -> dict[str, str]:
    """Annotations recording reviewed Checkov exceptions (check id, reason); docs/hardening.md lists them all."""
    return {f"{CHECKOV_SKIP}{n}": f"{check}={reason}" for n, (check, reason) in enumerate(exceptions, start=1)}


#: A workload whose images are named by tag (CKV_K8S_43 wants digests): a digest comes only from the registry.
TAG_EXCEPTION = (
    "CKV_K8S_43",
    "named by tag until pinned: loopform pin-images writes the digests CI built, and the policy pack's "
    "images-pinned-by-digest reports every tag where the stack requires digests (prod)",
)


def workload_skips(images: Sequence[str], *exceptions: tuple[str, str]) -> dict[str, str]:
    """A workload's reviewed Checkov exceptions: `exceptions`, plus TAG_EXCEPTION while any of `images` has no
    digest (pinned by digest, the workload carries none)."""
    tagged = any("@sha256:" not in reference for reference in images)
    return checkov_skips(*exceptions, *((TAG_EXCEPTION,) if tagged else ()))


def pod_security(user: int) -> dict[str, Any]:
    """Pod-level settings that satisfy the `restricted` Pod Security Standard."""
    return {
        "runAsNonRoot": True,
        "runAsUser": user,
        "runAsGroup": user,
        "fsGroup": user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security(read_only_root: bool = True) -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
    }


def env_from(sources: list[dict[str, Any]]) -> dict[str, Any]:
    """A container's `envFrom` entry, left out when there is nothing to load."""
    return {"envFrom": list(sources)} if sources else {}


def http_probe(path: str, port: str, period: int = 10, initial_delay: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "initialDelaySeconds": initial_delay,
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": 6,
    }


def exec_probe(command: list[str], period: int = 10) -> dict[str, Any]:
    return {"exec": {"command": command}, "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": 6}


def resources(spec: Resources) -> dict[str, dict[str, str]]:
    return spec.manifest()


def service_monitor(
    name: str,
    namespace: str,
    object_labels: dict[str, str],
    selector: dict[str, str],
    release: str,
    port: str = "http",
    honor_labels: bool = False,
) -> dict[str, Any]:
    """A Prometheus Operator ServiceMonitor scraping `/metrics` on the named `port` of the Services `selector`
    picks; the operator's Prometheus selects it by its `release` label."""
    endpoint: dict[str, Any] = {"port": port, "path": "/metrics"}
    if honor_labels:
        endpoint["honorLabels"] = True
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata(name, namespace, {**object_labels, "release": release}),
        "spec": {"selector": {"matchLabels": selector}, "endpoints": [endpoint]},
    }


def service_url(name: str, namespace: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://{name}.{namespace}.svc.cluster.local:{port}"


def child(parent: pulumi.Resource, **extra: Any) -> pulumi.ResourceOptions:
    """Options for a child resource of a component."""
    return pulumi.ResourceOptions(parent=parent, **extra)


def stateful(parent: pulumi.Resource, protect: bool, **extra: Any) -> pulumi.ResourceOptions:
    """Options of a resource that holds data: protected (Pulumi refuses to delete or replace it) and retained
    on delete (a `pulumi destroy` after unprotecting leaves it in the cluster) when `protect` is on."""
    return child(parent, protect=protect, retain_on_delete=protect, **extra)


def claim_name(workload: str) -> str:
    """The claim a one-replica StatefulSet's `data` volumeClaimTemplate would have made (`data-<name>-0`)."""
    return f"data-{workload}-0"


def persistent_volume_claim(
    parent: pulumi.Resource,
    name: str,
    workload: str,
    namespace: str,
    labels: dict[str, str],
    size: str,
    storage_class: str | None,
    protect: bool,
    guards: dict[str, str] | None = None,
) -> Any:
    """A workload's volume as its own PersistentVolumeClaim rather than a volumeClaimTemplate.

    A volumeClaimTemplate is immutable: growing it replaces the StatefulSet and still leaves the old,
    smaller claim attached. A claim of its own grows in place (with a StorageClass that allows
    expansion), is protected with the data, and outlives the StatefulSet.

    `guards` are annotations whose change must never be applied to the data in place (e.g. the
    PostgreSQL major version): a change of one asks Pulumi to replace the claim, which protection
    refuses, so the deploy stops before anything changes.
    """
    from pulumi_kubernetes.core.v1 import PersistentVolumeClaim

    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    replace_on = [f'metadata.annotations["{key}"]' for key in sorted(guards or {})]
    return PersistentVolumeClaim(
        name,
        metadata=metadata(claim_name(workload), namespace, labels, guards),
        spec=spec,
        opts=stateful(parent, protect, replace_on_changes=replace_on or None),
    )


def custom_resource(name: str, manifest: dict[str, Any], opts: pulumi.ResourceOptions) -> Any:
    """A custom resource declared from its rendered manifest (apiVersion, kind, metadata, spec)."""
    from pulumi_kubernetes.apiextensions import CustomResource

    return CustomResource(
        name,
        api_version=manifest["apiVersion"],
        kind=manifest["kind"],
        metadata=manifest["metadata"],
        spec=manifest["spec"],
        opts=opts,
    )


def declare(
    parent: pulumi.ComponentResource, name: str, manifests: list[dict[str, Any]], classes: Mapping[str, Any]
) -> None:
    """Declare rendered manifests as children `<name>-<kind>`: typed resources for the kinds in `classes`
    (metadata and spec), custom resources for the rest (the Prometheus Operator's kinds)."""
    for manifest in manifests:
        kind = manifest["kind"]
        child_name = f"{name}-{kind.lower()}"
        if kind in classes:
            classes[kind](child_name, metadata=manifest["metadata"], spec=manifest["spec"], opts=child(parent))
        else:
            custom_resource(child_name, manifest, child(parent))


def metadata_name(metadata: Any) -> str:
    """metadata.name of a resource's output (a dict from a custom resource, ObjectMeta when typed)."""
    return metadata["name"] if isinstance(metadata, dict) else metadata.name


def service_account_with_role(
    parent: pulumi.Resource,
    prefix: str,
    account: str,
    *,
    account_namespace: str,
    role_namespace: str,
    rules: list[dict[str, Any]],
    labels: dict[str, str],
    annotations: dict[str, str] | None = None,
) -> tuple[Any, Any]:
    """A ServiceAccount, a Role in `role_namespace` with `rules`, and the RoleBinding between them.

    Children are `<prefix>-sa` (with `annotations`, e.g. its IAM role), `<prefix>-role` and
    `<prefix>-binding`; returns (account, binding):
    a workload that depends on the binding runs with its permissions in place.
    """
    from pulumi_kubernetes.core.v1 import ServiceAccount
    from pulumi_kubernetes.rbac.v1 import Role, RoleBinding

    service_account = ServiceAccount(
        f"{prefix}-sa", metadata=metadata(account, account_namespace, labels, annotations), opts=child(parent)
    )
    role = Role(f"{prefix}-role", metadata=metadata(account, role_namespace, labels), rules=rules, opts=child(parent))
    binding = RoleBinding(
        f"{prefix}-binding",
        metadata=metadata(account, role_namespace, labels),
        role_ref={"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        subjects=[{"kind": "ServiceAccount", "name": account, "namespace": account_namespace}],
        opts=child(parent, depends_on=[service_account, role]),
    )
    return service_account, binding


def service_account(
    parent: pulumi.Resource,
    name: str,
    account: str,
    namespace: str,
    labels: dict[str, str],
    annotations: dict[str, str],
) -> Any:
    """A workload's own ServiceAccount (its identity: the IAM role annotation, where IRSA is used)."""
    from pulumi_kubernetes.core.v1 import ServiceAccount

    return ServiceAccount(name, metadata=metadata(account, namespace, labels, annotations), opts=child(parent))
