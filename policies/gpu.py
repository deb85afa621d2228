"""GPU scheduling: a workload that requests GPUs lands on a GPU pool this stack declares, and tolerates it.

The pools of a stack are
- every Karpenter NodePool (`kubernetes:karpenter.sh/v1:NodePool`) that offers GPUs: its nodes carry
  the template's labels and `karpenter.sh/nodepool: <name>`, and the template's taints;
- every GpuNodePool component of kind `existing` (`loopform:gpu:GpuNodePool`): a node group the cluster
  already has, which no Kubernetes object of the stack declares; the component registers the pool's
  node labels and taints as its inputs.

A workload selects a pool when its nodeSelector, or each term of its required node affinity, can only
match that pool's nodes: every requirement holds for the pool's labels and at least one names a label
of the pool (`In` its value, or `Exists`). It must then tolerate every NoSchedule and NoExecute taint
of each pool it can land on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from policies.core import Config, Resource, StackRule
from policies.workloads import WORKLOAD_TYPES, Pod, dig, items, mapping, number, pods, unwrap_secrets

NODE_POOL = "kubernetes:karpenter.sh/v1:NodePool"
GPU_POOL_COMPONENT = "loopform:gpu:GpuNodePool"
NODE_POOL_LABEL = "karpenter.sh/nodepool"
#: Taint effects a pod must tolerate to be scheduled (PreferNoSchedule only repels).
HARD_EFFECTS = ("NoSchedule", "NoExecute")


@dataclass(frozen=True)
class Pool:
    """A GPU pool: the labels every node of it carries, the values some of its nodes may carry, its taints."""

    name: str
    labels: Mapping[str, str]
    possible: Mapping[str, frozenset[str]] = field(default_factory=dict)
    taints: tuple[Mapping[str, Any], ...] = ()

    def describe(self) -> str:
        return f"{self.name} ({', '.join(f'{k}={v}' for k, v in sorted(self.labels.items()))})"

    def may_carry(self, key: str, value: str) -> bool:
        return self.labels.get(key) == value or value in self.possible.get(key, frozenset())


def _offers_gpus(spec: Mapping[str, Any], gpu_resources: Sequence[str]) -> bool:
    """A NodePool offers GPUs when it limits them, requires GPU instances, or taints its nodes for them."""
    template = mapping(dig(spec, ("template", "spec")))
    return (
        any(resource in mapping(spec.get("limits")) for resource in gpu_resources)
        or any("gpu" in str(mapping(r).get("key", "")) for r in items(template.get("requirements")))
        or any(mapping(t).get("key") in gpu_resources for t in items(template.get("taints")))
    )


def declared_pools(resources: Sequence[Resource], config: Config) -> list[Pool]:
    """The GPU pools the stack declares: GPU NodePools, and GpuNodePool components of kind `existing`."""
    pools = []
    for resource in resources:
        props = unwrap_secrets(resource.props)
        if resource.type == NODE_POOL and _offers_gpus(mapping(props.get("spec")), config["gpu_resources"]):
            name = str(dig(props, ("metadata", "name")) or resource.name)
            template = mapping(dig(props, ("spec", "template")))
            labels = {**mapping(mapping(template.get("metadata")).get("labels")), NODE_POOL_LABEL: name}
            possible = {
                str(r["key"]): frozenset(map(str, items(r.get("values"))))
                for r in map(mapping, items(mapping(template.get("spec")).get("requirements")))
                if r.get("operator") == "In" and "key" in r
            }
            taints = tuple(map(mapping, items(mapping(template.get("spec")).get("taints"))))
            pools.append(Pool(f"NodePool {name}", labels, possible, taints))
        elif resource.type == GPU_POOL_COMPONENT and props.get("kind") == "existing":
            labels = {str(k): str(v) for k, v in mapping(props.get("nodeLabels")).items()}
            taints = tuple(map(mapping, items(props.get("taints"))))
            pools.append(Pool(f"existing pool {props.get('pool', resource.name)}", labels, {}, taints))
    return pools


def _requirement_holds(pool: Pool, expression: Mapping[str, Any]) -> bool:
    """The pool's nodes may meet the requirement; a key the pool says nothing of (kubernetes.io/arch, a zone)
    may hold any value there."""
    key, operator = str(expression.get("key")), expression.get("operator")
    values = [str(v) for v in items(expression.get("values"))]
    described = key in pool.labels or key in pool.possible
    if operator == "In":
        return not described or any(pool.may_carry(key, value) for value in values)
    if operator == "NotIn":
        return pool.labels.get(key) not in values
    if operator == "DoesNotExist":
        return key not in pool.labels
    return True  # Exists, Gt, Lt: nothing the pool declares rules them out


def _pins(pool: Pool, expression: Mapping[str, Any]) -> bool:
    """The requirement names a label every node of the pool carries (so it selects the pool, not any node)."""
    key, operator = str(expression.get("key")), expression.get("operator")
    if key not in pool.labels:
        return False
    return operator == "Exists" or (operator == "In" and pool.labels[key] in map(str, items(expression.get("values"))))


def _term_pools(term: list[Mapping[str, Any]], pools: Sequence[Pool]) -> list[Pool]:
    return [p for p in pools if all(_requirement_holds(p, e) for e in term) and any(_pins(p, e) for e in term)]


def _selection(pod: Pod, pools: Sequence[Pool]) -> tuple[list[Pool], list[str]]:
    """The pools the pod can land on, and what in its selection does not stay on declared pools."""
    problems: list[str] = []
    candidates: list[Pool] | None = None
    node_selector = {str(k): str(v) for k, v in mapping(pod.spec.get("nodeSelector")).items()}
    if node_selector:
        term = [{"key": k, "operator": "In", "values": [v]} for k, v in node_selector.items()]
        candidates = _term_pools(term, pools)
        if not candidates:
            shown = ", ".join(f"{k}={v}" for k, v in sorted(node_selector.items()))
            problems.append(f"nodeSelector {shown} matches no declared GPU pool")
    required = dig(pod.spec, ("affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution"))
    terms = [items(mapping(t).get("matchExpressions")) for t in items(mapping(required).get("nodeSelectorTerms"))]
    if terms:
        by_affinity: list[Pool] = []
        for index, term in enumerate(terms):
            matched = _term_pools([mapping(e) for e in term], pools)
            if not matched:
                problems.append(f"required node affinity term {index} matches no declared GPU pool")
            by_affinity += [p for p in matched if p not in by_affinity]
        candidates = by_affinity if candidates is None else [p for p in candidates if p in by_affinity]
    if candidates is None:
        problems.append("selects no GPU pool (no nodeSelector or required node affinity)")
    return candidates or [], problems


def _tolerates(tolerations: list[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """Kubernetes' toleration matching: effect (empty: all), key (empty with Exists: all), Exists or Equal value."""
    for toleration in tolerations:
        if toleration.get("effect") and toleration.get("effect") != taint.get("effect"):
            continue
        operator = toleration.get("operator", "Equal")
        if not toleration.get("key"):
            if operator == "Exists":
                return True
            continue
        if toleration.get("key") != taint.get("key"):
            continue
        if operator == "Exists" or str(toleration.get("value", "")) == str(taint.get("value", "")):
            return True
    return False


def _taint(taint: Mapping[str, Any]) -> str:
    value = f"={taint['value']}" if taint.get("value") else ""
    return f"{taint.get('key')}{value}:{taint.get('effect')}"


def _nonzero(quantity: Any) -> bool:
    try:
        return float(str(quantity)) != 0
    except ValueError:
        return True  # a quantity with a suffix, or an unknown value: something is requested


def _gpu_requests(pod: Pod, gpu_resources: Sequence[str]) -> list[str]:
    """The containers that request (or limit: a limit alone is also the request) GPUs, and how many."""
    found = []
    for container in pod.containers:
        resources = mapping(container.spec.get("resources"))
        wanted = {**mapping(resources.get("limits")), **mapping(resources.get("requests"))}
        counts = [
            f"{name} {number(wanted[name])}" for name in gpu_resources if name in wanted and _nonzero(wanted[name])
        ]
        if counts:
            found.append(f"{container.where} ({', '.join(counts)})")
    return found


def check_gpu_pools(resources: Sequence[Resource], config: Config) -> list[tuple[Resource | None, str]]:
    """Every pod that requests GPUs selects a GPU pool of this stack and tolerates that pool's taints."""
    gpu_resources = list(config["gpu_resources"])
    pools = declared_pools(resources, config)
    declared = "; ".join(p.describe() for p in pools) or "none"
    found: list[tuple[Resource | None, str]] = []
    for resource in resources:
        if resource.type not in WORKLOAD_TYPES:
            continue
        props = unwrap_secrets(resource.props)
        workload = (
            f"{props.get('kind', resource.type.rsplit(':', 1)[-1])} {dig(props, ('metadata', 'name')) or resource.name}"
        )
        for pod in pods(resource.type, props):
            requests = _gpu_requests(pod, gpu_resources)
            if not requests:
                continue
            where = f"{workload} {'; '.join(requests)}"
            candidates, problems = _selection(pod, pools)
            found += [(resource, f"{where}: {problem} (declared pools: {declared})") for problem in problems]
            tolerations = [mapping(t) for t in items(pod.spec.get("tolerations"))]
            for pool in candidates:
                found += [
                    (resource, f"{where}: no toleration for taint {_taint(taint)} of {pool.name}")
                    for taint in pool.taints
                    if taint.get("effect") in HARD_EFFECTS and not _tolerates(tolerations, taint)
                ]
    return found


RULES = [
    StackRule(
        name="gpu-workloads-on-declared-pools",
        description="Every workload that requests GPUs selects (nodeSelector or required node affinity) a GPU "
        "pool declared in the stack, Karpenter NodePool or existing pool, and tolerates its taints.",
        check=check_gpu_pools,
        config={
            "gpu_resources": {
                "type": "array",
                "items": {"type": "string"},
                "default": ["nvidia.com/gpu"],
                "description": "Extended resources that mean GPUs.",
            }
        },
    ),
]
