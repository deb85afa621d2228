"""Serving availability: model services keep enough replicas, roll out without dropping capacity, and have
a disruption budget.

A model service is a Deployment labelled `loopform.dev/model` (components/model_service.py labels
its Deployment, Service, HorizontalPodAutoscaler and PodDisruptionBudget alike). With GitOps the
services never pass through Pulumi: `loopform check` sends the manifests of the GitOps folder to
the pack, so the same rules judge them there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policies.core import Config, Props, Resource, ResourceRule, StackRule
from policies.workloads import dig, is_number, items, mapping, number, unwrap_secrets

DEPLOYMENT = "kubernetes:apps/v1:Deployment"
AUTOSCALER = "kubernetes:autoscaling/v2:HorizontalPodAutoscaler"
DISRUPTION_BUDGET = "kubernetes:policy/v1:PodDisruptionBudget"
MODEL_LABEL = "loopform.dev/model"


def is_model_service(props: Props) -> bool:
    return MODEL_LABEL in mapping(dig(props, ("metadata", "labels")))


def _name(props: Props) -> str:
    return str(dig(props, ("metadata", "name")) or "?")


def _max_unavailable(spec: Mapping[str, Any]) -> str | None:
    """Why the rollout may drop below capacity, or None when it never does (RollingUpdate, maxUnavailable 0)."""
    strategy = mapping(spec.get("strategy"))
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        return f"strategy {strategy['type']} stops every pod before starting new ones"
    value = mapping(strategy.get("rollingUpdate")).get("maxUnavailable")
    if value is None:
        return "rollingUpdate.maxUnavailable unset (25% by default) > 0"
    if value in (0, "0", "0%"):
        return None
    return f"rollingUpdate.maxUnavailable {number(value)} > 0"


def check_serving_availability(type_: str, props: Props, config: Config) -> list[str]:
    """A model service runs at least `min_replicas` pods, also under its autoscaler, and a rollout never
    takes one away before its replacement is ready."""
    props = unwrap_secrets(props)
    if not is_model_service(props):
        return []
    minimum = config["min_replicas"]
    spec = mapping(props.get("spec"))
    where = f"{props.get('kind', type_.rsplit(':', 1)[-1])} {_name(props)}"
    found = []
    if type_ == AUTOSCALER:
        replicas = spec.get("minReplicas", 1)
        if is_number(replicas) and replicas < minimum:
            found.append(f"{where}: minReplicas {number(replicas)} < {number(minimum)} (min_replicas)")
        return found
    replicas = spec.get("replicas", 1)
    if is_number(replicas) and replicas < minimum:
        found.append(f"{where}: replicas {number(replicas)} < {number(minimum)} (min_replicas)")
    if problem := _max_unavailable(spec):
        found.append(f"{where}: {problem} (a rollout must keep every serving pod until its replacement is ready)")
    return found


def _selects(selector: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
    """A label selector (matchLabels and matchExpressions) matches `labels`; an empty one matches nothing
    here: a budget over every pod of the namespace is not a service's budget."""
    match_labels = mapping(selector.get("matchLabels"))
    expressions = [mapping(e) for e in items(selector.get("matchExpressions"))]
    if not match_labels and not expressions:
        return False
    if any(labels.get(key) != value for key, value in match_labels.items()):
        return False
    for expression in expressions:
        key, values = expression.get("key"), items(expression.get("values"))
        operator = expression.get("operator")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def check_disruption_budget(resources: Sequence[Resource], config: Config) -> list[tuple[Resource | None, str]]:
    """Where required, every model service has a PodDisruptionBudget in its namespace that selects its pods,
    so a node drain cannot take all of them at once."""
    if not config["require_pdb"]:
        return []
    budgets = [unwrap_secrets(r.props) for r in resources if r.type == DISRUPTION_BUDGET]
    found: list[tuple[Resource | None, str]] = []
    for resource in resources:
        props = unwrap_secrets(resource.props)
        if resource.type != DEPLOYMENT or not is_model_service(props):
            continue
        namespace = dig(props, ("metadata", "namespace"))
        labels = mapping(dig(props, ("spec", "template", "metadata", "labels")))
        covered = any(
            dig(budget, ("metadata", "namespace")) == namespace
            and _selects(mapping(dig(budget, ("spec", "selector"))), labels)
            for budget in budgets
        )
        if not covered:
            found.append(
                (
                    resource,
                    f"Deployment {_name(props)}: no PodDisruptionBudget in namespace {namespace or '(default)'} "
                    f"selects its pods (require_pdb)",
                )
            )
    return found


RULES = [
    ResourceRule(
        name="serving-availability",
        description="Model services (Deployments labelled loopform.dev/model, and their autoscalers) run at "
        "least min_replicas pods and roll out with maxUnavailable 0.",
        check=check_serving_availability,
        types=frozenset({DEPLOYMENT, AUTOSCALER}),
        config={
            "min_replicas": {
                "type": "integer",
                "minimum": 1,
                "default": 1,
                "description": "Fewest pods of a model service (Deployment replicas, autoscaler minReplicas).",
            }
        },
    ),
    StackRule(
        name="serving-disruption-budget",
        description="Where required, every model service has a PodDisruptionBudget selecting its pods.",
        check=check_disruption_budget,
        config={
            "require_pdb": {
                "type": "boolean",
                "default": False,
                "description": "Require a PodDisruptionBudget per model service.",
            }
        },
    ),
]
