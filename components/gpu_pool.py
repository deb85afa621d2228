"""GPU node pools and the NVIDIA device plugin.

A pool's taints and labels are declared once, on the pool object of the spec. `scheduling()`
turns that object into everything else that must agree with it: the taints and labels the
Karpenter NodePool puts on its nodes, the tolerations and node selector of a pipeline step
that trains on the pool, and the node affinity and tolerations of the device plugin and DCGM
exporter DaemonSets. Nothing here restates a taint or label by hand, so they cannot drift.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi_kubernetes.helm.v4 import Chart, ChartArgs, RepositoryOptsArgs

from components import common
from loopform.spec import ExistingPool, GpuSpec, KarpenterPool, Taint

GPU_RESOURCE = "nvidia.com/gpu"
DEVICE_PLUGIN_REPO = "https://nvidia.github.io/k8s-device-plugin"
DCGM_EXPORTER_REPO = "https://nvidia.github.io/dcgm-exporter/helm-charts"

# Well-known Karpenter labels (karpenter.sh/v1, karpenter.k8s.aws/v1).
INSTANCE_FAMILY = "karpenter.k8s.aws/instance-family"
INSTANCE_GPU_COUNT = "karpenter.k8s.aws/instance-gpu-count"
CAPACITY_TYPE = "karpenter.sh/capacity-type"
DISCOVERY_TAG = "karpenter.sh/discovery"


@dataclass(frozen=True)
class GpuScheduling:
    """What a pod needs to land on a pool's nodes, and what those nodes carry. One source for both."""

    pool: str
    node_labels: dict[str, str]
    taints: tuple[Taint, ...]

    def node_selector(self) -> dict[str, str]:
        """The pod nodeSelector: exactly the labels the pool's nodes carry."""
        return dict(self.node_labels)

    def tolerations(self) -> list[dict[str, str]]:
        """One toleration per pool taint (Equal on its value, or Exists when the taint has none)."""
        result = []
        for taint in self.taints:
            toleration = {"key": taint.key, "operator": "Equal" if taint.value else "Exists", "effect": taint.effect}
            if taint.value:
                toleration["value"] = taint.value
            result.append(toleration)
        return result

    def node_taints(self) -> list[dict[str, str]]:
        """The taints as node objects (Karpenter NodePool template) carry them."""
        return [
            {"key": t.key, "value": t.value, "effect": t.effect} if t.value else {"key": t.key, "effect": t.effect}
            for t in self.taints
        ]

    def node_selector_term(self) -> dict[str, Any]:
        """A nodeAffinity term that matches this pool's nodes (terms of several pools are ORed)."""
        return {
            "matchExpressions": [
                {"key": key, "operator": "In", "values": [value]} for key, value in sorted(self.node_labels.items())
            ]
        }


def scheduling(pool_name: str, pool: KarpenterPool | ExistingPool) -> GpuScheduling:
    """The scheduling constraints of a pool, derived from its spec object (never typed twice)."""
    return GpuScheduling(pool=pool_name, node_labels=pool.node_labels(pool_name), taints=tuple(pool.node_taints()))


def gpu_pod_resources(gpus: int, base: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """Container resources with `gpus` NVIDIA GPUs as both request and limit (extended resources need both)."""
    requests = dict(base.get("requests", {}))
    limits = dict(base.get("limits", {}))
    if gpus:
        requests[GPU_RESOURCE] = str(gpus)
        limits[GPU_RESOURCE] = str(gpus)
    return {"requests": requests, "limits": limits}


def karpenter_object_name(environment: str, pool_name: str) -> str:
    """Cluster-scoped name of a pool's NodePool and EC2NodeClass: environment-scoped, so stacks can share a cluster."""
    return f"loopform-{environment}-{pool_name}"


def node_pool_manifest(
    environment: str, pool_name: str, pool: KarpenterPool, labels: Mapping[str, str]
) -> dict[str, Any]:
    """The karpenter.sh/v1 NodePool: GPU instance families, capacity types, taints, GPU limit, scale to zero."""
    sched = scheduling(pool_name, pool)
    requirements = [
        {"key": INSTANCE_FAMILY, "operator": "In", "values": list(pool.instance_families)},
        {"key": CAPACITY_TYPE, "operator": "In", "values": list(pool.capacity_types)},
        # Only instances with GPUs, and none larger than the pool's declared node size.
        {"key": INSTANCE_GPU_COUNT, "operator": "Gt", "values": ["0"]},
        {"key": INSTANCE_GPU_COUNT, "operator": "Lt", "values": [str(pool.gpus_per_node + 1)]},
    ]
    return {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodePool",
        "metadata": {"name": karpenter_object_name(environment, pool_name), "labels": dict(labels)},
        "spec": {
            "template": {
                "metadata": {"labels": sched.node_labels},
                "spec": {
                    "nodeClassRef": {
                        "group": "karpenter.k8s.aws",
                        "kind": "EC2NodeClass",
                        "name": karpenter_object_name(environment, pool_name),
                    },
                    "requirements": requirements,
                    "taints": sched.node_taints(),
                },
            },
            "limits": {GPU_RESOURCE: str(pool.gpu_limit)},
            # Empty GPU nodes are removed after consolidate_after: an idle pool costs nothing.
            "disruption": {"consolidationPolicy": "WhenEmpty", "consolidateAfter": pool.consolidate_after},
        },
    }


def node_class_manifest(
    environment: str, pool_name: str, pool: KarpenterPool, labels: Mapping[str, str]
) -> dict[str, Any]:
    """The karpenter.k8s.aws/v1 EC2NodeClass the pool's nodes launch from."""
    node_class = pool.node_class
    discovery = [{"tags": {DISCOVERY_TAG: node_class.discovery_tag}}]
    return {
        "apiVersion": "karpenter.k8s.aws/v1",
        "kind": "EC2NodeClass",
        "metadata": {"name": karpenter_object_name(environment, pool_name), "labels": dict(labels)},
        "spec": {
            "role": node_class.role,
            # With an alias, Karpenter picks the accelerated (NVIDIA) variant for GPU instance types.
            "amiSelectorTerms": [{"alias": node_class.ami_alias}],
            "subnetSelectorTerms": discovery,
            "securityGroupSelectorTerms": discovery,
            "blockDeviceMappings": [
                {
                    "deviceName": "/dev/xvda",
                    "ebs": {
                        "volumeSize": node_class.volume_size,
                        "volumeType": "gp3",
                        "encrypted": True,
                        "deleteOnTermination": True,
                    },
                }
            ],
            "metadataOptions": {"httpTokens": "required", "httpPutResponseHopLimit": 1},
        },
    }


def pool_description(sched: GpuScheduling, kind: str) -> dict[str, Any]:
    """A pool as the GpuNodePool component registers it: name, kind, the labels and taints of its nodes."""
    return {"pool": sched.pool, "kind": kind, "nodeLabels": sched.node_selector(), "taints": sched.node_taints()}


@dataclass(frozen=True, kw_only=True)
class GpuNodePoolArgs:
    """Inputs of one GPU pool."""

    pool_name: str
    """Key of the pool in gpu.pools; steps name it in models.<m>.training.gpu_pool."""
    environment: str = "dev"
    """Environment of the stack: cluster-scoped objects carry it in their names."""
    pool: KarpenterPool | ExistingPool
    """The pool's spec object: its taints and labels are the only source of scheduling constraints."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Common labels added to the objects this component creates."""


class GpuNodePool(pulumi.ComponentResource):
    """A GPU pool: Karpenter NodePool + EC2NodeClass for kind `karpenter`; a description only for `existing`."""

    pool_name: pulumi.Output[str]
    node_selector: pulumi.Output[dict[str, str]]
    tolerations: pulumi.Output[list[dict[str, str]]]
    gpu_limit: pulumi.Output[int]
    node_pool_name: pulumi.Output[str | None]
    """Name of the Karpenter NodePool; None for a pool the cluster already has."""
    scheduling: GpuScheduling
    """The same constraints as plain data, for components that render pod specs."""

    def __init__(self, name: str, args: GpuNodePoolArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        sched = scheduling(args.pool_name, args.pool)
        # The pool as its inputs: the policy pack (gpu-workloads-on-declared-pools) reads an `existing` pool's
        # labels and taints here, since no Kubernetes object of the stack declares that pool.
        super().__init__("loopform:gpu:GpuNodePool", name, pool_description(sched, args.pool.kind), opts)
        self.scheduling = sched
        object_labels = common.labels("gpu-pool", args.pool_name, dict(args.labels))

        node_pool_name: pulumi.Input[str | None] = None
        if isinstance(args.pool, KarpenterPool):
            node_class = common.custom_resource(
                f"{name}-node-class",
                node_class_manifest(args.environment, args.pool_name, args.pool, object_labels),
                common.child(self),
            )
            node_pool = common.custom_resource(
                f"{name}-node-pool",
                node_pool_manifest(args.environment, args.pool_name, args.pool, object_labels),
                common.child(self, depends_on=[node_class]),
            )
            node_pool_name = node_pool.metadata.apply(common.metadata_name)

        self.pool_name = pulumi.Output.from_input(args.pool_name)
        self.node_selector = pulumi.Output.from_input(self.scheduling.node_selector())
        self.tolerations = pulumi.Output.from_input(self.scheduling.tolerations())
        self.gpu_limit = pulumi.Output.from_input(args.pool.gpu_limit)
        self.node_pool_name = pulumi.Output.from_input(node_pool_name)
        self.register_outputs(
            {
                "pool_name": self.pool_name,
                "node_selector": self.node_selector,
                "tolerations": self.tolerations,
                "gpu_limit": self.gpu_limit,
                "node_pool_name": self.node_pool_name,
            }
        )


# --- device plugin and DCGM exporter (once per platform) -----------------------------------------


def gpu_node_affinity(gpu: GpuSpec) -> dict[str, Any]:
    """Required node affinity matching the nodes of any pool (one ORed term per pool)."""
    terms = [scheduling(name, pool).node_selector_term() for name, pool in sorted(gpu.pools.items())]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


def gpu_tolerations(gpu: GpuSpec) -> list[dict[str, str]]:
    """The tolerations of every pool's taints, without duplicates, in a stable order."""
    seen: dict[tuple[str, ...], dict[str, str]] = {}
    for name, pool in sorted(gpu.pools.items()):
        for toleration in scheduling(name, pool).tolerations():
            seen.setdefault(tuple(sorted(toleration.items())), toleration)
    return list(seen.values())


def device_plugin_values(gpu: GpuSpec) -> dict[str, Any]:
    """nvidia-device-plugin chart values: run on GPU pool nodes only, tolerating their taints.

    The chart's default affinity keys on labels from Node Feature Discovery, which this
    platform does not install; the pools' own labels replace it.
    """
    return {
        "affinity": gpu_node_affinity(gpu),
        "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}, *gpu_tolerations(gpu)],
        "priorityClassName": "system-node-critical",
        "gfd": {"enabled": False},
        "nfd": {"enabled": False},
    }


def dcgm_exporter_values(gpu: GpuSpec, prometheus_release: str | None) -> dict[str, Any]:
    """dcgm-exporter chart values: GPU metrics on every GPU node, scraped through a ServiceMonitor."""
    values: dict[str, Any] = {
        "affinity": gpu_node_affinity(gpu),
        "tolerations": gpu_tolerations(gpu),
        "serviceMonitor": {"enabled": prometheus_release is not None, "interval": "30s"},
    }
    if prometheus_release is not None:
        values["serviceMonitor"]["additionalLabels"] = {"release": prometheus_release}
    return values


@dataclass(frozen=True, kw_only=True)
class NvidiaDevicePluginArgs:
    """Inputs of the NVIDIA device plugin and DCGM exporter, installed once for all pools."""

    gpu: GpuSpec
    """gpu section of the spec: the pools (for affinity and tolerations) and the chart versions."""
    namespace: str
    """Namespace of the DaemonSets; must admit privileged pods (hostPath, SYS_ADMIN), e.g. kube-system."""
    prometheus_release: str | None = None
    """`release` label the Prometheus Operator selects ServiceMonitors by; None (no Prometheus Operator CRDs
    in the cluster) installs no ServiceMonitor: the dcgm-exporter chart renders one whenever enabled."""


class NvidiaDevicePlugin(pulumi.ComponentResource):
    """NVIDIA device plugin (advertises nvidia.com/gpu) and DCGM exporter (GPU metrics) on the GPU pools."""

    namespace: pulumi.Output[str]
    device_plugin_version: pulumi.Output[str]
    dcgm_exporter_version: pulumi.Output[str]

    def __init__(self, name: str, args: NvidiaDevicePluginArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loopform:gpu:NvidiaDevicePlugin", name, None, opts)
        if not args.gpu.pools:
            raise ValueError("NvidiaDevicePlugin needs at least one pool in gpu.pools: without one it matches no node")
        Chart(
            f"{name}-device-plugin",
            ChartArgs(
                chart="nvidia-device-plugin",
                version=args.gpu.device_plugin_chart_version,
                namespace=args.namespace,
                repository_opts=RepositoryOptsArgs(repo=DEVICE_PLUGIN_REPO),
                values=device_plugin_values(args.gpu),
            ),
            opts=common.child(self),
        )
        Chart(
            f"{name}-dcgm-exporter",
            ChartArgs(
                chart="dcgm-exporter",
                version=args.gpu.dcgm_exporter_chart_version,
                namespace=args.namespace,
                repository_opts=RepositoryOptsArgs(repo=DCGM_EXPORTER_REPO),
                values=dcgm_exporter_values(args.gpu, args.prometheus_release),
            ),
            opts=common.child(self),
        )
        self.namespace = pulumi.Output.from_input(args.namespace)
        self.device_plugin_version = pulumi.Output.from_input(args.gpu.device_plugin_chart_version)
        self.dcgm_exporter_version = pulumi.Output.from_input(args.gpu.dcgm_exporter_chart_version)
        self.register_outputs(
            {
                "namespace": self.namespace,
                "device_plugin_version": self.device_plugin_version,
                "dcgm_exporter_version": self.dcgm_exporter_version,
            }
        )
