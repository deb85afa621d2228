"""The serving namespace's budget: a ResourceQuota sized from the spec, and a LimitRange for what lacks limits.

Model services autoscale, and anything else deployed into the serving namespace (by hand, or a bad sync)
would share its nodes. The quota is exactly what every model's service may use at its autoscaler's maximum
plus one surge pod of a rolling update, so the services always fit and nothing else does; the LimitRange
gives a container that names no resources small defaults and caps any container at the largest service's.
"""

from __future__ import annotations

import re
from typing import Any

from components import common
from loopform.spec import PlatformSpec

#: Container defaults for what names no resources (a debug pod, a sidecar added by hand).
DEFAULT_REQUEST = {"cpu": "50m", "memory": "64Mi"}
DEFAULT_LIMIT = {"cpu": "500m", "memory": "256Mi"}
_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTORS = {
    None: 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
}


def quantity(value: str) -> float:
    """A Kubernetes quantity in base units (cores, bytes)."""
    match = _QUANTITY.match(value)
    if not match:
        raise ValueError(f"unsupported quantity {value!r}")
    return float(match.group(1)) * _FACTORS[match.group(2)]


def _cpu(cores: float) -> str:
    return f"{round(cores * 1000)}m"


def _memory(size: float) -> str:
    return f"{-(-int(size) // 2**20)}Mi"


def serving_budget(spec: PlatformSpec) -> dict[str, str]:
    """The quota's `hard` limits: every model's service at max_replicas plus one surge pod."""
    totals = {"requests.cpu": 0.0, "requests.memory": 0.0, "limits.cpu": 0.0, "limits.memory": 0.0}
    pods = 0
    for model in spec.models.values():
        serving = model.serving
        count = serving.max_replicas + 1  # the rolling update's maxSurge
        resources = serving.resources.manifest()
        pods += count
        for kind in ("requests", "limits"):
            totals[f"{kind}.cpu"] += count * quantity(resources[kind]["cpu"])
            totals[f"{kind}.memory"] += count * quantity(resources[kind]["memory"])
    return {
        "pods": str(pods),
        **{key: _cpu(value) if key.endswith("cpu") else _memory(value) for key, value in totals.items()},
    }


def serving_limit_manifests(spec: PlatformSpec, labels: dict[str, str]) -> list[dict[str, Any]]:
    """The ResourceQuota and the LimitRange of the serving namespace."""
    namespace = spec.cluster.namespaces.serving
    # The cap: the largest service's limit, and never below the default (the API refuses a default above max).
    largest = {
        resource: max(
            [quantity(m.serving.resources.manifest()["limits"][resource]) for m in spec.models.values()]
            + [quantity(DEFAULT_LIMIT[resource])]
        )
        for resource in ("cpu", "memory")
    }
    name = "model-services"
    object_labels = common.labels("serving-budget", name, labels)
    return [
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": common.metadata(name, namespace, object_labels),
            "spec": {"hard": serving_budget(spec)},
        },
        {
            "apiVersion": "v1",
            "kind": "LimitRange",
            "metadata": common.metadata(name, namespace, object_labels),
            "spec": {
                "limits": [
                    {
                        "type": "Container",
                        "defaultRequest": DEFAULT_REQUEST,
                        "default": DEFAULT_LIMIT,
                        "max": {"cpu": _cpu(largest["cpu"]), "memory": _memory(largest["memory"])},
                    }
                ]
            },
        },
    ]
