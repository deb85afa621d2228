"""GPU pools under Pulumi mocks: Karpenter objects, existing pools, the device plugin, and the
spec errors for steps that name an undefined pool or ask for more GPUs than a pool's node has."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pulumi
import pytest
from pydantic import ValidationError

from components.gpu_pool import (
    GpuNodePool,
    GpuNodePoolArgs,
    NvidiaDevicePlugin,
    NvidiaDevicePluginArgs,
    gpu_pod_resources,
    scheduling,
)
from loopform.render import RenderedResource, render_components
from loopform.spec import GpuSpec, SpecError, Taint, load_stack, parse_spec, read_stack_file, stack_file

KARPENTER = {
    "kind": "karpenter",
    "instance_families": ["g6e"],
    "capacity_types": ["spot"],
    "gpu_limit": 6,
    "gpus_per_node": 2,
    "consolidate_after": "7m",
    "labels": {"team": "ml"},
    "node_class": {
        "role": "NodeRole-x",
        "ami_alias": "al2023@v20250101",
        "discovery_tag": "cl-x",
        "volume_size": "300Gi",
    },
}
EXISTING = {
    "kind": "existing",
    "labels": {"eks.amazonaws.com/nodegroup": "gpu-a10g", "gpu": "a10g"},
    "taints": [{"key": "nvidia.com/gpu", "value": "present"}, {"key": "dedicated", "effect": "NoExecute"}],
    "gpu_limit": 16,
    "gpus_per_node": 4,
}


def _gpu(**pools: dict) -> GpuSpec:
    return GpuSpec.model_validate({"pools": pools})


def _render(build) -> tuple[dict[str, RenderedResource], dict[str, object]]:
    outputs: dict[str, object] = {}
    names = ("pool_name", "node_selector", "tolerations", "gpu_limit", "node_pool_name", "namespace")

    def run():
        component = build()
        present = [n for n in names if hasattr(component, n)]
        return pulumi.Output.all(*[getattr(component, n) for n in present]).apply(
            lambda values: outputs.update(zip(present, values, strict=True))
        )

    return {r.name: r for r in render_components(run)}, outputs


def test_scheduling_tolerates_exactly_the_pool_taints() -> None:
    pool = _gpu(a10g=EXISTING).pools["a10g"]
    sched = scheduling("a10g", pool)
    assert sched.node_selector() == EXISTING["labels"]
    assert sched.tolerations() == [
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"},
        # A taint without a value is tolerated with Exists (Equal on "" would not match it).
        {"key": "dedicated", "operator": "Exists", "effect": "NoExecute"},
    ]
    assert sched.node_taints() == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
        {"key": "dedicated", "effect": "NoExecute"},
    ]
    karpenter = scheduling("big", _gpu(big=KARPENTER).pools["big"])
    assert karpenter.node_selector() == {"loopform.dev/gpu-pool": "big", "team": "ml"}
    assert karpenter.taints == (Taint(key="nvidia.com/gpu", value="present", effect="NoSchedule"),)


def test_gpu_pod_resources_request_and_limit_the_same_count() -> None:
    base = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    assert gpu_pod_resources(2, base) == {
        "requests": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "2"},
        "limits": {"memory": "4Gi", "nvidia.com/gpu": "2"},
    }
    assert gpu_pod_resources(0, base) == base


def test_karpenter_pool_declares_node_pool_and_node_class() -> None:
    pool = _gpu(big=KARPENTER).pools["big"]
    resources, outputs = _render(
        lambda: GpuNodePool("gpu-big", GpuNodePoolArgs(pool_name="big", pool=pool, labels={"env": "t"}))
    )
    assert set(resources) == {"gpu-big", "gpu-big-node-class", "gpu-big-node-pool"}
    component = resources["gpu-big"]
    assert component.type_ == "loopform:gpu:GpuNodePool"
    assert all(r.parent == component.urn for name, r in resources.items() if name != "gpu-big")

    node_pool = resources["gpu-big-node-pool"]
    assert node_pool.type_ == "kubernetes:karpenter.sh/v1:NodePool"
    manifest = node_pool.manifest()
    assert manifest["metadata"]["name"] == "loopform-dev-big"
    assert manifest["metadata"]["labels"]["env"] == "t"
    template = manifest["spec"]["template"]
    assert template["metadata"]["labels"] == {"loopform.dev/gpu-pool": "big", "team": "ml"}
    assert template["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    assert template["spec"]["nodeClassRef"] == {
        "group": "karpenter.k8s.aws",
        "kind": "EC2NodeClass",
        "name": "loopform-dev-big",
    }
    requirements = {(r["key"], r["operator"]): r["values"] for r in template["spec"]["requirements"]}
    assert requirements == {
        ("karpenter.k8s.aws/instance-family", "In"): ["g6e"],
        ("karpenter.sh/capacity-type", "In"): ["spot"],
        ("karpenter.k8s.aws/instance-gpu-count", "Gt"): ["0"],
        ("karpenter.k8s.aws/instance-gpu-count", "Lt"): ["3"],
    }
    assert manifest["spec"]["limits"] == {"nvidia.com/gpu": "6"}
    assert manifest["spec"]["disruption"] == {"consolidationPolicy": "WhenEmpty", "consolidateAfter": "7m"}
    # The NodePool waits for its node class.
    assert resources["gpu-big-node-class"].urn in node_pool.dependencies

    node_class = resources["gpu-big-node-class"]
    assert node_class.type_ == "kubernetes:karpenter.k8s.aws/v1:EC2NodeClass"
    spec = node_class.manifest()["spec"]
    assert spec["role"] == "NodeRole-x"
    assert spec["amiSelectorTerms"] == [{"alias": "al2023@v20250101"}]
    assert (
        spec["subnetSelectorTerms"]
        == spec["securityGroupSelectorTerms"]
        == [{"tags": {"karpenter.sh/discovery": "cl-x"}}]
    )
    assert spec["blockDeviceMappings"][0]["ebs"]["volumeSize"] == "300Gi"

    assert outputs == {
        "pool_name": "big",
        "node_selector": {"loopform.dev/gpu-pool": "big", "team": "ml"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}],
        "gpu_limit": 6,
        "node_pool_name": "loopform-dev-big",
    }


def test_existing_pool_creates_nothing_and_describes_itself() -> None:
    pool = _gpu(a10g=EXISTING).pools["a10g"]
    resources, outputs = _render(lambda: GpuNodePool("gpu-a10g", GpuNodePoolArgs(pool_name="a10g", pool=pool)))
    assert set(resources) == {"gpu-a10g"}
    assert outputs["node_selector"] == EXISTING["labels"]
    assert outputs["tolerations"] == scheduling("a10g", pool).tolerations()
    assert outputs["gpu_limit"] == 16
    assert outputs["node_pool_name"] is None


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_stack_pools_render(stack: str) -> None:
    spec = load_stack(stack_file(stack))
    for pool_name, pool in spec.gpu.pools.items():
        resources, outputs = _render(
            lambda pool_name=pool_name, pool=pool: GpuNodePool(
                f"gpu-{pool_name}", GpuNodePoolArgs(pool_name=pool_name, pool=pool, labels=spec.cluster.labels)
            )
        )
        assert outputs["node_selector"] == pool.node_labels(pool_name)
        node_pools = [r for r in resources.values() if r.kind == "NodePool"]
        if pool.kind == "karpenter":
            (node_pool,) = node_pools
            assert node_pool.manifest()["spec"]["limits"]["nvidia.com/gpu"] == str(pool.gpu_limit)
            assert node_pool.manifest()["spec"]["template"]["spec"]["requirements"][1]["values"] == pool.capacity_types
        else:
            assert node_pools == []


def test_device_plugin_runs_on_every_pool_and_tolerates_their_taints() -> None:
    gpu = GpuSpec.model_validate(
        {
            "pools": {"big": KARPENTER, "a10g": EXISTING},
            "device_plugin_chart_version": "0.17.2",
            "dcgm_exporter_chart_version": "4.2.0",
        }
    )
    resources, outputs = _render(
        lambda: NvidiaDevicePlugin(
            "nvidia", NvidiaDevicePluginArgs(gpu=gpu, namespace="kube-system", prometheus_release="kps")
        )
    )
    assert set(resources) == {"nvidia", "nvidia-device-plugin", "nvidia-dcgm-exporter"}
    assert resources["nvidia"].type_ == "loopform:gpu:NvidiaDevicePlugin"
    assert outputs == {"namespace": "kube-system"}

    plugin = resources["nvidia-device-plugin"].manifest()
    assert plugin["chart"] == "nvidia-device-plugin" and plugin["version"] == "0.17.2"
    assert plugin["repositoryOpts"]["repo"] == "https://nvidia.github.io/k8s-device-plugin"
    assert plugin["namespace"] == "kube-system"
    dcgm = resources["nvidia-dcgm-exporter"].manifest()
    assert dcgm["chart"] == "dcgm-exporter" and dcgm["version"] == "4.2.0"
    assert dcgm["repositoryOpts"]["repo"] == "https://nvidia.github.io/dcgm-exporter/helm-charts"
    assert dcgm["values"]["serviceMonitor"] == {
        "enabled": True,
        "interval": "30s",
        "additionalLabels": {"release": "kps"},
    }

    for values in (plugin["values"], dcgm["values"]):
        terms = values["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        # One ORed term per pool, each matching exactly that pool's node labels.
        selected = [{e["key"]: e["values"][0] for e in term["matchExpressions"]} for term in terms]
        assert selected == [gpu.pools["a10g"].node_labels("a10g"), gpu.pools["big"].node_labels("big")]
        for name, pool in gpu.pools.items():
            for toleration in scheduling(name, pool).tolerations():
                assert toleration in values["tolerations"]
        assert len(values["tolerations"]) == len({tuple(sorted(t.items())) for t in values["tolerations"]})


def test_device_plugin_without_prometheus_has_no_service_monitor() -> None:
    resources, _ = _render(
        lambda: NvidiaDevicePlugin("nvidia", NvidiaDevicePluginArgs(gpu=_gpu(big=KARPENTER), namespace="gpu"))
    )
    assert resources["nvidia-dcgm-exporter"].manifest()["values"]["serviceMonitor"]["enabled"] is False


def test_device_plugin_needs_a_pool() -> None:
    with pytest.raises(ValueError, match="at least one pool"):
        render_components(lambda: NvidiaDevicePlugin("nvidia", NvidiaDevicePluginArgs(gpu=GpuSpec(), namespace="gpu")))


# --- spec errors: the pool a training step names ----------------------------------------------------


def _dev_platform() -> dict:
    return copy.deepcopy(read_stack_file(stack_file("dev"))["config"]["loopform:platform"])


def test_step_naming_an_undefined_pool_is_a_spec_error() -> None:
    data = _dev_platform()
    data["models"]["fraud"]["training"]["gpu_pool"] = "h100"
    with pytest.raises(SpecError) as error:
        parse_spec(data, "stacks/Pulumi.dev.yaml")
    message = str(error.value)
    assert message.startswith("stacks/Pulumi.dev.yaml: invalid stack spec (1 problem)")
    assert (
        "loopform:platform.models.fraud.training.gpu_pool: names GPU pool 'h100', which gpu.pools does not define "
        "(defined: gpu)"
    ) in message


def test_step_asking_for_more_gpus_than_a_node_has_is_a_spec_error() -> None:
    data = _dev_platform()
    data["models"]["fraud"]["training"]["gpus"] = 2  # the dev pool's nodes have 1 GPU (gpus_per_node default)
    with pytest.raises(SpecError) as error:
        parse_spec(data, "stacks/Pulumi.dev.yaml")
    assert (
        "loopform:platform.models.fraud.training.gpus: asks for 2 GPUs but a node of pool 'gpu' has 1 "
        "(gpu.pools.gpu.gpus_per_node)"
    ) in str(error.value)
    # Raising the pool's node size makes the same request valid.
    data["gpu"]["pools"]["gpu"]["gpus_per_node"] = 2
    assert parse_spec(data, "stacks/Pulumi.dev.yaml").models["fraud"].training.gpus == 2


def test_gpus_without_a_pool_is_a_spec_error() -> None:
    data = _dev_platform()
    del data["models"]["fraud"]["training"]["gpu_pool"]
    with pytest.raises(SpecError, match="gpus > 0 needs gpu_pool"):
        parse_spec(data, "stacks/Pulumi.dev.yaml")


def test_the_default_ami_is_a_dated_eks_release() -> None:
    """Unpinned, `al2023@latest` moves every node to each AMI AWS publishes; the default names one release."""
    pool = GpuSpec.model_validate({"pools": {"big": {**KARPENTER, "node_class": {"role": "r", "discovery_tag": "t"}}}})
    assert re.fullmatch(r"al2023@v20\d{6}", pool.pools["big"].node_class.ami_alias)


@pytest.mark.parametrize("alias", ["al2023", "al2023@v2026", "al2023@2026-09-23", "AL2023@latest", "ami-0abc"])
def test_an_ami_alias_must_be_family_at_version(alias: str) -> None:
    with pytest.raises(ValidationError, match="ami_alias"):
        GpuSpec.model_validate(
            {"pools": {"big": {**KARPENTER, "node_class": {**KARPENTER["node_class"], "ami_alias": alias}}}}
        )


@pytest.mark.parametrize("path", sorted(Path(stack_file("dev")).parent.glob("Pulumi.*.yaml")), ids=lambda p: p.name)
def test_no_stack_runs_gpu_nodes_on_the_latest_ami(path: Path) -> None:
    """Every stack of the repository pins the AMI of its Karpenter pools: a new AMI is a reviewed change."""
    spec = load_stack(path)
    aliases = {name: pool.node_class.ami_alias for name, pool in spec.gpu.pools.items() if pool.kind == "karpenter"}
    assert not {name: alias for name, alias in aliases.items() if alias.endswith("@latest")}
