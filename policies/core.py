"""How a rule is declared: one pure function, the exact type tokens it judges, its config schema.

A rule never calls Pulumi: it takes plain data (a resource's type token and properties, or
every resource of the stack) and its config, and returns messages. `policies.pack` wraps the
rules into `pulumi_policy` policies; tests call the functions directly, and `loopform check`
sends resources to the pack over the analyzer protocol.

Every message names what is wrong, the number and the threshold, e.g.
"drift share 0.41 > 0.30 (prod)".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Props = Mapping[str, Any]
Config = Mapping[str, Any]


@dataclass(frozen=True)
class Resource:
    """One resource as a stack rule sees it."""

    type: str
    name: str
    props: Props
    urn: str = ""


@dataclass(frozen=True)
class ResourceRule:
    """A rule judged on each resource whose type token is in `types` (None: every resource)."""

    name: str
    description: str
    check: Callable[[str, Props, Config], list[str]]
    types: frozenset[str] | None = None
    config: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    """JSON-schema properties of the rule's config; each has a `default`."""


@dataclass(frozen=True)
class StackRule:
    """A rule judged once over every resource of the stack; returns (resource or None, message)."""

    name: str
    description: str
    check: Callable[[Sequence[Resource], Config], list[tuple[Resource | None, str]]]
    config: Mapping[str, dict[str, Any]] = field(default_factory=dict)


Rule = ResourceRule | StackRule


def defaults(rule: Rule) -> dict[str, Any]:
    """The rule's config with every schema default filled in."""
    return {key: schema["default"] for key, schema in rule.config.items() if "default" in schema}


def with_defaults(rule: Rule, config: Config | None) -> dict[str, Any]:
    """What the rule runs with: schema defaults overlaid by the given config (enforcementLevel dropped)."""
    given = {k: v for k, v in (config or {}).items() if k != "enforcementLevel"}
    return {**defaults(rule), **given}
