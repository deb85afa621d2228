"""The serving namespace's ResourceQuota and LimitRange (components/serving_limits.py): every released service
fits at its autoscaler's maximum plus a surge pod, nothing beyond does, and the objects validate."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from components.model_service import ModelServiceArgs, manifests
from components.serving_limits import DEFAULT_LIMIT, quantity, serving_limit_manifests
from loopform.spec import ModelSpec, PlatformSpec, load_stack, stack_file
from tests import records

from .conftest import ROOT, STACKS


def _released(stack: str) -> PlatformSpec:
    """The stack with every model released (the services the quota must hold)."""
    spec = load_stack(stack_file(stack), ROOT)
    released = ModelSpec.model_validate({"path": "models/fraud", "release": records.release(stack)}).release
    models = {name: m.model_copy(update={"release": released}) for name, m in spec.models.items()}
    return spec.model_copy(update={"models": models})


def _pods(spec: PlatformSpec) -> list[tuple[int, dict[str, Any]]]:
    """(how many, container resources) of each model's pods at max_replicas plus the rolling update's surge."""
    found = []
    for name, model in spec.models.items():
        (deployment,) = [m for m in manifests(ModelServiceArgs(model=name, spec=model)) if m["kind"] == "Deployment"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        surge = deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
        found.append((model.serving.max_replicas + surge, container["resources"]))
    return found


def test_quantities() -> None:
    assert quantity("250m") == 0.25 and quantity("2") == 2 and quantity("1.5") == 1.5
    assert quantity("512Mi") == 512 * 2**20 and quantity("1Gi") == 2**30 and quantity("1G") == 1e9
    with pytest.raises(ValueError, match="unsupported"):
        quantity("lots")


@pytest.mark.parametrize("stack", STACKS)
def test_the_quota_holds_every_service_at_its_maximum_and_no_more(stack: str) -> None:
    spec = _released(stack)
    quota, limit_range = serving_limit_manifests(spec, {})
    hard = quota["spec"]["hard"]
    pods = _pods(spec)
    assert int(hard["pods"]) == sum(count for count, _ in pods)
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            needed = sum(count * quantity(r[kind][resource]) for count, r in pods)
            assert needed <= quantity(hard[f"{kind}.{resource}"]) < needed + 2**20, (kind, resource)
    # Every service container is within the LimitRange's cap, and so are its defaults (the API requires it).
    (limits,) = limit_range["spec"]["limits"]
    for _, resources in pods:
        for resource, value in resources["limits"].items():
            assert quantity(value) <= quantity(limits["max"][resource])
    for resource, value in DEFAULT_LIMIT.items():
        assert quantity(value) <= quantity(limits["max"][resource])
    for manifest in (quota, limit_range):
        assert manifest["metadata"]["namespace"] == spec.cluster.namespaces.serving
        kubernetes_validate.validate(manifest, "1.30", strict=True)


def test_the_platform_declares_them(rendered) -> None:
    kinds = {r.kind for r in rendered("prod") if r.is_kubernetes_object}
    assert {"ResourceQuota", "LimitRange"} <= kinds
