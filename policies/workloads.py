"""Workload guardrails: the `restricted` Pod Security Standard, requests and limits, image tags and digests.

`pods()` is the one place that knows where each workload kind keeps its pod spec (a Deployment's
`spec.template.spec`, a CronJob's job template, an Argo template's `container`, `script`,
`initContainers`, `sidecars` and `containerSet`), so every rule here, and `policies.gpu` and
`policies.hygiene`, judge the same containers with the same pod-level settings the pod will run with.

An Argo pod is built by the workflow controller: the template's `securityContext`, `nodeSelector`,
`affinity` and `tolerations` replace the workflow's (`spec.*`), `hostNetwork` comes from the
workflow, `templateDefaults` fill every template. The controller's own `init` and `wait`
containers are set by its configuration, not by these objects, and are not judged here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pulumi.runtime.rpc import is_rpc_secret

from policies.core import Config, Props, ResourceRule

# --- where pod specs are -----------------------------------------------------------------------------------

#: Kubernetes workload kinds: the path from the properties to the pod spec.
POD_SPEC_PATHS: Mapping[str, tuple[str, ...]] = {
    "kubernetes:core/v1:Pod": ("spec",),
    "kubernetes:core/v1:PodTemplate": ("template", "spec"),
    "kubernetes:core/v1:ReplicationController": ("spec", "template", "spec"),
    "kubernetes:apps/v1:Deployment": ("spec", "template", "spec"),
    "kubernetes:apps/v1:StatefulSet": ("spec", "template", "spec"),
    "kubernetes:apps/v1:DaemonSet": ("spec", "template", "spec"),
    "kubernetes:apps/v1:ReplicaSet": ("spec", "template", "spec"),
    "kubernetes:batch/v1:Job": ("spec", "template", "spec"),
    "kubernetes:batch/v1:CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
#: Argo Workflows kinds: the path from the properties to the WorkflowSpec whose `templates` become pods.
WORKFLOW_SPEC_PATHS: Mapping[str, tuple[str, ...]] = {
    "kubernetes:argoproj.io/v1alpha1:Workflow": ("spec",),
    "kubernetes:argoproj.io/v1alpha1:WorkflowTemplate": ("spec",),
    "kubernetes:argoproj.io/v1alpha1:ClusterWorkflowTemplate": ("spec",),
    "kubernetes:argoproj.io/v1alpha1:CronWorkflow": ("spec", "workflowSpec"),
}
WORKLOAD_TYPES = frozenset(POD_SPEC_PATHS) | frozenset(WORKFLOW_SPEC_PATHS)
#: Helm chart resources of pulumi-kubernetes: chart, version and values, not expanded.
CHART_TYPES = frozenset({"kubernetes:helm.sh/v4:Chart", "kubernetes:helm.sh/v3:Chart", "kubernetes:helm.sh/v3:Release"})
#: Argo names the main container of a `container` or `script` template `main`, whatever the template says.
ARGO_MAIN = "main"


def unwrap_secrets(value: Any) -> Any:
    """Properties without Pulumi's secret wrappers: the engine hands the analyzer secrets unwrapped, the
    render's mocks keep the wrapper (`{<sig>: ..., "value": ...}`) around a whole top-level property."""
    if is_rpc_secret(value):
        return unwrap_secrets(value["value"])
    if isinstance(value, Mapping):
        return {key: unwrap_secrets(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [unwrap_secrets(item) for item in value]
    return value


def mapping(value: Any) -> Mapping[str, Any]:
    """`value` if it is a mapping, else an empty one (absent or malformed fields read as unset)."""
    return value if isinstance(value, Mapping) else {}


def items(value: Any) -> list[Any]:
    """`value` if it is a list, else an empty one."""
    return list(value) if isinstance(value, list | tuple) else []


def dig(value: Any, path: Iterable[str]) -> Any:
    for key in path:
        value = mapping(value).get(key)
    return value


def is_number(value: Any) -> bool:
    """A known number (a preview may send an unknown value in its place)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def number(value: Any) -> str:
    """A number as people write it (the engine sends 3.0 for 3)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Container:
    """One container of a pod, with what messages call it."""

    role: str
    """"container", "init container", "ephemeral container" or (Argo) "sidecar"."""
    name: str
    spec: Mapping[str, Any]
    template: str = ""
    """The Argo template it belongs to; empty for Kubernetes workloads."""

    @property
    def where(self) -> str:
        prefix = f"template {self.template} " if self.template else ""
        return f"{prefix}{self.role} {self.name}"

    @property
    def security(self) -> Mapping[str, Any]:
        return mapping(self.spec.get("securityContext"))


@dataclass(frozen=True)
class Pod:
    """A pod a workload creates: its pod-level settings as the pod gets them, its annotations and containers."""

    spec: Mapping[str, Any]
    annotations: Mapping[str, Any]
    containers: tuple[Container, ...]
    template: str = ""

    @property
    def where(self) -> str:
        return f"template {self.template}" if self.template else "pod"

    @property
    def security(self) -> Mapping[str, Any]:
        return mapping(self.spec.get("securityContext"))


def _kubernetes_pod(spec: Mapping[str, Any], annotations: Mapping[str, Any]) -> Pod:
    roles = (
        ("containers", "container"),
        ("initContainers", "init container"),
        ("ephemeralContainers", "ephemeral container"),
    )
    containers = tuple(
        Container(role, str(mapping(c).get("name", "?")), mapping(c))
        for key, role in roles
        for c in items(spec.get(key))
    )
    return Pod(spec, annotations, containers)


def _merged(defaults: Mapping[str, Any], template: Mapping[str, Any]) -> Mapping[str, Any]:
    """`templateDefaults` under a template: the template's own values win, mappings merge."""
    result = dict(defaults)
    for key, value in template.items():
        current = result.get(key)
        merge = isinstance(current, Mapping) and isinstance(value, Mapping)
        result[key] = _merged(current, value) if merge else value
    return result


def _first_set(own: Any, inherited: Any) -> Any:
    return own if own is not None else inherited


def _argo_pods(workflow: Mapping[str, Any]) -> Iterator[Pod]:
    defaults = mapping(workflow.get("templateDefaults"))
    workflow_annotations = mapping(mapping(workflow.get("podMetadata")).get("annotations"))
    for raw in items(workflow.get("templates")):
        template = _merged(defaults, mapping(raw))
        name = str(template.get("name", "?"))
        containers = [
            Container(role, str(mapping(c).get("name", "?")), mapping(c), name)
            for key, role in (("initContainers", "init container"), ("sidecars", "sidecar"))
            for c in items(template.get(key))
        ]
        containers += [
            Container("container", str(mapping(c).get("name", "?")), mapping(c), name)
            for c in items(mapping(template.get("containerSet")).get("containers"))
        ]
        containers += [
            Container("container", ARGO_MAIN, mapping(template[key]), name)
            for key in ("container", "script")
            if isinstance(template.get(key), Mapping)
        ]
        if not containers:
            continue  # dag, steps, suspend, resource, http, plugin: no pod of the user's containers
        # What the controller does (addSchedulingConstraints): a template's own setting replaces the workflow's.
        spec = {
            "securityContext": _first_set(template.get("securityContext"), workflow.get("securityContext")),
            "nodeSelector": template.get("nodeSelector") or workflow.get("nodeSelector"),
            "affinity": _first_set(template.get("affinity"), workflow.get("affinity")),
            "tolerations": template.get("tolerations") or workflow.get("tolerations"),
            "hostNetwork": workflow.get("hostNetwork"),
            "volumes": [*items(workflow.get("volumes")), *items(template.get("volumes"))],
        }
        annotations = {**workflow_annotations, **mapping(mapping(template.get("metadata")).get("annotations"))}
        yield Pod(spec, annotations, tuple(containers), name)


def pods(type_: str, props: Props) -> list[Pod]:
    """Every pod the resource creates, with its containers; none for a type that creates no pods."""
    props = unwrap_secrets(props)
    if type_ in POD_SPEC_PATHS:
        path = POD_SPEC_PATHS[type_]
        spec = dig(props, path)
        if not isinstance(spec, Mapping):
            return []
        annotations = mapping(dig(props, (*path[:-1], "metadata", "annotations")))
        return [_kubernetes_pod(spec, annotations)]
    if type_ in WORKFLOW_SPEC_PATHS:
        return list(_argo_pods(mapping(dig(props, WORKFLOW_SPEC_PATHS[type_]))))
    return []


def containers(type_: str, props: Props) -> list[Container]:
    return [container for pod in pods(type_, props) for container in pod.containers]


# --- pod-security-restricted ----------------------------------------------------------------------------

#: Inline volume sources the restricted profile allows (everything else, hostPath first, is forbidden).
ALLOWED_VOLUMES = (
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
)
#: The baseline profile's safe sysctls, as of Kubernetes 1.32.
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
    }
)
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
SECCOMP_TYPES = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_TYPES = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"
ADDABLE_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})


def _host_settings(pod: Pod) -> list[str]:
    """Baseline: no host namespaces, HostProcess, host ports, or probes and hooks aimed at another host."""
    found = [
        f"{pod.where}: {field} true (restricted: false or unset)"
        for field in ("hostNetwork", "hostPID", "hostIPC")
        if pod.spec.get(field) is True
    ]
    contexts = [(pod.where, pod.security), *((c.where, c.security) for c in pod.containers)]
    found += [
        f"{where}: securityContext.windowsOptions.hostProcess true (restricted: false or unset)"
        for where, context in contexts
        if mapping(context.get("windowsOptions")).get("hostProcess") is True
    ]
    for container in pod.containers:
        found += [
            f"{container.where}: hostPort {number(port['hostPort'])} (restricted: none)"
            for port in map(mapping, items(container.spec.get("ports")))
            if port.get("hostPort")
        ]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            for handler in ("httpGet", "tcpSocket"):
                if host := dig(container.spec, (probe, handler, "host")):
                    found.append(f"{container.where}: {probe}.{handler}.host {host} (restricted: unset)")
        for hook in ("postStart", "preStop"):
            for handler in ("httpGet", "tcpSocket"):
                if host := dig(container.spec, ("lifecycle", hook, handler, "host")):
                    found.append(f"{container.where}: lifecycle.{hook}.{handler}.host {host} (restricted: unset)")
    return found


def _volumes(pod: Pod) -> list[str]:
    found = []
    for volume in map(mapping, items(pod.spec.get("volumes"))):
        sources = [key for key in volume if key != "name"]
        bad = [key for key in sources if key not in ALLOWED_VOLUMES]
        if bad:
            found.append(
                f"{pod.where}: volume {volume.get('name')} is {', '.join(bad)} "
                f"(restricted allows only {', '.join(ALLOWED_VOLUMES)})"
            )
    return found


def _privileges(pod: Pod, windows: bool) -> list[str]:
    """Privileged, privilege escalation and capabilities (the last two do not apply to Windows pods)."""
    found = []
    for container in pod.containers:
        context = container.security
        if context.get("privileged") is True:
            found.append(f"{container.where}: privileged true (restricted: false or unset)")
        if windows:
            continue
        if context.get("allowPrivilegeEscalation") is not False:
            value = context.get("allowPrivilegeEscalation", "unset")
            found.append(f"{container.where}: allowPrivilegeEscalation {str(value).lower()} (restricted: false)")
        capabilities = mapping(context.get("capabilities"))
        if "ALL" not in items(capabilities.get("drop")):
            found.append(f"{container.where}: capabilities.drop lacks ALL (restricted: drop ALL)")
        added = [str(c) for c in items(capabilities.get("add")) if c not in ADDABLE_CAPABILITIES]
        if added:
            found.append(f"{container.where}: capabilities.add {', '.join(added)} (restricted: only NET_BIND_SERVICE)")
    return found


def _users(pod: Pod) -> list[str]:
    """runAsNonRoot true (pod-level counts for every container that leaves it unset), runAsUser never 0.

    A pod with its own user namespace (`hostUsers: false`) is exempt, as the admission is.
    """
    if pod.spec.get("hostUsers") is False:
        return []
    found = []
    pod_non_root = pod.security.get("runAsNonRoot")
    if pod_non_root not in (None, True):
        found.append(f"{pod.where}: runAsNonRoot {str(pod_non_root).lower()} (restricted: true)")
    for container in pod.containers:
        own = container.security.get("runAsNonRoot")
        if own not in (None, True):
            found.append(f"{container.where}: runAsNonRoot {str(own).lower()} (restricted: true)")
        elif own is None and pod_non_root is None:
            found.append(f"{container.where}: runAsNonRoot unset in the pod and the container (restricted: true)")
    for where, context in ((pod.where, pod.security), *((c.where, c.security) for c in pod.containers)):
        if context.get("runAsUser") == 0:
            found.append(f"{where}: runAsUser 0 (restricted: non-zero)")
    return found


def _seccomp(pod: Pod, windows: bool) -> list[str]:
    if windows:
        return []
    found = []
    pod_type = mapping(pod.security.get("seccompProfile")).get("type")
    if pod_type is not None and pod_type not in SECCOMP_TYPES:
        found.append(f"{pod.where}: seccompProfile.type {pod_type} (restricted: RuntimeDefault or Localhost)")
    for container in pod.containers:
        own = mapping(container.security.get("seccompProfile")).get("type")
        if own is not None and own not in SECCOMP_TYPES:
            found.append(f"{container.where}: seccompProfile.type {own} (restricted: RuntimeDefault or Localhost)")
        elif own is None and pod_type is None:
            found.append(
                f"{container.where}: seccompProfile unset in the pod and the container "
                "(restricted: RuntimeDefault or Localhost)"
            )
    return found


def _kernel_options(pod: Pod) -> list[str]:
    """Baseline: AppArmor, SELinux, /proc mount and sysctls."""
    found = []
    contexts = [(pod.where, pod.security), *((c.where, c.security) for c in pod.containers)]
    for where, context in contexts:
        apparmor = mapping(context.get("appArmorProfile")).get("type")
        if apparmor is not None and apparmor not in APPARMOR_TYPES:
            found.append(f"{where}: appArmorProfile.type {apparmor} (restricted: RuntimeDefault or Localhost)")
        selinux = mapping(context.get("seLinuxOptions"))
        if selinux.get("type", "") not in SELINUX_TYPES:
            found.append(
                f"{where}: seLinuxOptions.type {selinux['type']} (restricted: {', '.join(sorted(SELINUX_TYPES - {''}))})"
            )
        found += [
            f"{where}: seLinuxOptions.{field} {selinux[field]} (restricted: unset)"
            for field in ("user", "role")
            if selinux.get(field)
        ]
    for key, value in pod.annotations.items():
        if (
            key.startswith(APPARMOR_ANNOTATION)
            and value != "runtime/default"
            and not str(value).startswith("localhost/")
        ):
            found.append(f"{pod.where}: annotation {key} {value} (restricted: runtime/default or localhost/*)")
    found += [
        f"{c.where}: procMount {c.security['procMount']} (restricted: Default)"
        for c in pod.containers
        if c.security.get("procMount") not in (None, "Default")
    ]
    found += [
        f"{pod.where}: sysctl {sysctl.get('name')} is not a safe sysctl (restricted: {', '.join(sorted(SAFE_SYSCTLS))})"
        for sysctl in map(mapping, items(pod.security.get("sysctls")))
        if sysctl.get("name") not in SAFE_SYSCTLS
    ]
    return found


def restricted_violations(pod: Pod) -> list[str]:
    """Every control of the `restricted` Pod Security Standard (latest) this pod breaks."""
    windows = mapping(pod.spec.get("os")).get("name") == "windows"
    return [
        *_host_settings(pod),
        *_volumes(pod),
        *_privileges(pod, windows),
        *_users(pod),
        *_seccomp(pod, windows),
        *_kernel_options(pod),
    ]


def check_pod_security(type_: str, props: Props, config: Config) -> list[str]:
    """The pods a workload creates would be admitted to a namespace that enforces `restricted`."""
    return [message for pod in pods(type_, props) for message in restricted_violations(pod)]


# --- resources-requests-limits ---------------------------------------------------------------------------


def check_resources(type_: str, props: Props, config: Config) -> list[str]:
    """Requests let the scheduler place a pod; a memory limit keeps one pod from starving its node.

    A limit without a request counts as the request, as the API server defaults it. Ephemeral
    containers take no resources and are not judged.
    """
    required_requests, required_limits = list(config["required_requests"]), list(config["required_limits"])
    found = []
    for container in containers(type_, props):
        if container.role == "ephemeral container":
            continue
        resources = mapping(container.spec.get("resources"))
        requests, limits = mapping(resources.get("requests")), mapping(resources.get("limits"))
        found += [
            f"{container.where}: no {name} request (required_requests: {', '.join(required_requests)})"
            for name in required_requests
            if not requests.get(name) and not limits.get(name)
        ]
        found += [
            f"{container.where}: no {name} limit (required_limits: {', '.join(required_limits)})"
            for name in required_limits
            if not limits.get(name)
        ]
    return found


# --- images ----------------------------------------------------------------------------------------------

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
#: What a refused image lacks, and how a stack gets it.
PIN_REQUIREMENT = "required: repo@sha256:<64 hex>; loopform pin-images writes the digest lock"


@dataclass(frozen=True)
class Image:
    """An image reference and where it is set."""

    where: str
    reference: str
    chart: bool = False
    """Set in Helm chart values (a block without a tag takes the chart's own default)."""

    @property
    def parts(self) -> tuple[str, str | None, str | None]:
        """(repository, tag, digest): the tag is after the last `:` of the last path segment."""
        name, _, digest = self.reference.partition("@")
        repository, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
        return repository, tag or None, digest or None

    @property
    def pinned(self) -> bool:
        digest = self.parts[2]
        return digest is not None and bool(DIGEST.match(digest))


def _value_images(values: Any, path: str) -> Iterator[Image]:
    """Images set in chart values: `image: "repo:tag"`, or an `image` block of registry/repository/tag/digest."""
    if isinstance(values, Mapping):
        for key, value in values.items():
            where = f"{path}.{key}"
            if str(key).lower().endswith("image") and isinstance(value, str) and value:
                yield Image(where, value, chart=True)
            elif str(key).lower().endswith("image") and isinstance(value, Mapping) and value.get("repository"):
                registry = f"{value['registry']}/" if value.get("registry") else ""
                tag = f":{value['tag']}" if value.get("tag") else ""
                digest = str(value.get("digest") or "")
                at = f"@{digest}" if digest and not digest.startswith("@") else digest
                yield Image(where, f"{registry}{value['repository']}{tag}{at}", chart=True)
            else:
                yield from _value_images(value, where)
    elif isinstance(values, list):
        for index, value in enumerate(values):
            yield from _value_images(value, f"{path}[{index}]")


def images(type_: str, props: Props) -> list[Image]:
    """Every image a resource runs: its containers', or those its chart values set."""
    if type_ in CHART_TYPES:
        props = unwrap_secrets(props)
        return list(_value_images(props.get("values"), f"chart {props.get('chart', '?')} values"))
    return [Image(c.where, str(c.spec.get("image") or "")) for c in containers(type_, props)]


def check_no_latest_tag(type_: str, props: Props, config: Config) -> list[str]:
    """A tag other than `latest`, or a digest: what runs is what was reviewed, and a rollback means something."""
    found = []
    for image in images(type_, props):
        _, tag, digest = image.parts
        if digest:
            continue
        if tag == "latest":
            found.append(f"{image.where}: image {image.reference} uses the latest tag (an explicit tag or a digest)")
        elif tag is None and not image.chart:
            found.append(f"{image.where}: image {image.reference or '(none)'} has no tag (an explicit tag or a digest)")
    return found


def check_pinned_by_digest(type_: str, props: Props, config: Config) -> list[str]:
    """Where required, every image is `repo@sha256:<64 hex>`: a tag can be moved, a digest cannot.

    Chart values are judged for the images they set; images a chart picks itself are pinned by
    the chart's exact version (`helm-charts-pinned`).
    """
    if not config["required"]:
        return []
    allowed = tuple(str(prefix) for prefix in config["allowed_unpinned"])
    return [
        f"{image.where}: image {image.reference or '(none)'} is not pinned by digest ({PIN_REQUIREMENT})"
        for image in images(type_, props)
        if not image.pinned and not (allowed and image.reference.startswith(allowed))
    ]


RULES = [
    ResourceRule(
        name="pod-security-restricted",
        description="Workload pods meet the `restricted` Pod Security Standard, pod-level settings counting for "
        "their containers as at admission: non-root, no privilege escalation, capabilities dropped, seccomp, "
        "no host namespaces, paths or ports, allowed volume types only.",
        check=check_pod_security,
        types=WORKLOAD_TYPES,
    ),
    ResourceRule(
        name="resources-requests-limits",
        description="Every container and init container requests CPU and memory and has the required limits.",
        check=check_resources,
        types=WORKLOAD_TYPES,
        config={
            "required_requests": {
                "type": "array",
                "items": {"type": "string"},
                "default": ["cpu", "memory"],
                "description": "Resources every container must request (a limit counts as its request).",
            },
            "required_limits": {
                "type": "array",
                "items": {"type": "string"},
                "default": ["memory"],
                "description": "Resources every container must limit.",
            },
        },
    ),
    ResourceRule(
        name="no-latest-tag",
        description="Every image has an explicit tag other than `latest`, or a digest.",
        check=check_no_latest_tag,
        types=WORKLOAD_TYPES | CHART_TYPES,
    ),
    ResourceRule(
        name="images-pinned-by-digest",
        description="Where required, every image is pinned by digest (repo@sha256:<64 hex>); chart values are "
        "judged for the images they set, the rest of a chart by `helm-charts-pinned`.",
        check=check_pinned_by_digest,
        types=WORKLOAD_TYPES | CHART_TYPES,
        config={
            "required": {"type": "boolean", "default": False, "description": "Require digests in this environment."},
            "allowed_unpinned": {
                "type": "array",
                "items": {"type": "string"},
                "default": [],
                "description": "Image prefixes exempt from digests (e.g. an image built in this pipeline).",
            },
        },
    ),
]
