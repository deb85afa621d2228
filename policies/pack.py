"""The pack's rules as `pulumi_policy` policies (the pack itself is built only in `__main__.py`).

Constructing `PolicyPack` starts the analyzer server, so this module only builds the
policy list; `policies/__main__.py` hands it to `PolicyPack`, as Pulumi runs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from policies.core import Resource, ResourceRule, Rule, StackRule, with_defaults

#: One module per group of rules; each exports RULES.
RULE_MODULES = (
    "policies.release_gates",
    "policies.gitops_signing",
    "policies.workloads",
    "policies.availability",
    "policies.gpu",
    "policies.hygiene",
)


def rules() -> list[Rule]:
    """Every rule of the pack, in module order."""
    found: list[Rule] = []
    for module in RULE_MODULES:
        found += importlib.import_module(module).RULES
    names = [rule.name for rule in found]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"rule names must be unique: {', '.join(duplicated)}")
    return found


def rule(name: str) -> Rule:
    """The rule named `name`."""
    for candidate in rules():
        if candidate.name == name:
            return candidate
    raise KeyError(name)


def plain(value: Any) -> Any:
    """The analyzer's read-only proxies (`Mapping`/`Sequence`, not dict/list) as plain data for the pure rules.

    Reading through the proxy keeps its preview semantics: a value not known before the update
    (another resource's output) raises `UnknownValueError`, which the analyzer reports as "can't
    run policy during preview" instead of the rule judging a placeholder.
    """
    if isinstance(value, str | bytes):
        return value
    if isinstance(value, Mapping):
        return {key: plain(value[key]) for key in value}
    if isinstance(value, Sequence):
        return [plain(item) for item in value]
    return value


def config_schema(rule: Rule) -> Any:
    from pulumi_policy import PolicyConfigSchema

    return PolicyConfigSchema(properties=dict(rule.config), required=[]) if rule.config else None


def _resource_policy(rule: ResourceRule) -> Any:
    from pulumi_policy import ResourceValidationPolicy

    def validate(args: Any, report_violation: Any) -> None:
        if rule.types is not None and args.resource_type not in rule.types:
            return
        config = with_defaults(rule, args.get_config())
        for message in rule.check(args.resource_type, plain(args.props), config):
            report_violation(message)

    return ResourceValidationPolicy(
        name=rule.name, description=rule.description, validate=validate, config_schema=config_schema(rule)
    )


def _stack_policy(rule: StackRule) -> Any:
    from pulumi_policy import StackValidationPolicy

    def validate(args: Any, report_violation: Any) -> None:
        resources: Sequence[Resource] = [
            Resource(type=r.resource_type, name=r.name, props=plain(r.props), urn=r.urn) for r in args.resources
        ]
        config = with_defaults(rule, args.get_config())
        for resource, message in rule.check(resources, config):
            report_violation(message, resource.urn if resource is not None and resource.urn else None)

    return StackValidationPolicy(
        name=rule.name, description=rule.description, validate=validate, config_schema=config_schema(rule)
    )


def policies() -> list[Any]:
    """The pulumi_policy objects of every rule."""
    return [_resource_policy(r) if isinstance(r, ResourceRule) else _stack_policy(r) for r in rules()]
