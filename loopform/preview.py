"""What `pulumi up` would do to each resource when a stack goes from one render to the next, offline.

Two renders of the program (before and after a change of spec, code or secret config) are
compared resource by resource with pulumi-kubernetes' own replacement rules
(`loopform.replacement`), the provider's settings as the program declares them, and each
resource's options: a `replaceOnChanges` path that changed forces a replacement, and a
protected resource that would be replaced or deleted is refused by the engine before anything
changes. Pure functions over `RenderedResource`s: no engine, no cluster.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from loopform.render import RenderedResource
from loopform.replacement import Change, plan

PROVIDER_TYPE = "pulumi:providers:kubernetes"


@dataclass(frozen=True)
class Step:
    """One resource's change, and whether the engine would refuse it (protected data)."""

    change: Change
    protected: bool

    @property
    def refused(self) -> bool:
        return self.protected and self.change.action in ("replace", "delete")

    def line(self) -> str:
        verdict = "REFUSED (protected) " if self.refused else ""
        why = f" ({', '.join(self.change.reasons)})" if self.change.reasons and self.change.action != "same" else ""
        return f"{verdict}{self.change.action.upper()} {self.change.type_} {self.change.name}{why}"


def _plain(value: Any) -> Any:
    """Inputs with secrets unwrapped: a changed secret value is still a change (never printed)."""
    from pulumi.runtime.rpc import is_rpc_secret

    if is_rpc_secret(value):
        return _plain(value["value"])
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _inputs(resources: Iterable[RenderedResource]) -> dict[str, tuple[str, dict[str, Any]]]:
    kept = [r for r in resources if (r.custom and r.type_ != PROVIDER_TYPE) or r.is_chart]
    return {r.name: (r.type_, _plain(r.inputs)) for r in kept}


def _provider_flag(resources: Iterable[RenderedResource], flag: str) -> bool:
    return any(r.type_ == PROVIDER_TYPE and r.inputs.get(flag) in (True, "true") for r in resources)


def _annotation_paths(paths: Iterable[str]) -> list[str]:
    """The annotation keys of `metadata.annotations["key"]` replaceOnChanges paths."""
    prefix = 'metadata.annotations["'
    return [path[len(prefix) : -2] for path in paths if path.startswith(prefix) and path.endswith('"]')]


def preview(before: list[RenderedResource], after: list[RenderedResource]) -> list[Step]:
    """Each resource's step from `before` to `after`, in name order."""
    changes = plan(
        _inputs(before),
        _inputs(after),
        enable_secret_mutable=_provider_flag(after, "enableSecretMutable"),
        enable_configmap_mutable=_provider_flag(after, "enableConfigMapMutable"),
    )
    old = {r.name: r for r in before}
    new = {r.name: r for r in after}
    steps = []
    for change in changes:
        if change.action == "update":
            was, now = old[change.name], new[change.name]
            keys = _annotation_paths(now.replace_on_changes)
            annotations = [((r.inputs.get("metadata") or {}).get("annotations") or {}) for r in (was, now)]
            forced = tuple(
                f"metadata.annotations.{key}" for key in keys if annotations[0].get(key) != annotations[1].get(key)
            )
            if forced:
                change = Change(change.name, change.type_, "replace", forced)
        resource = old.get(change.name) or new[change.name]
        steps.append(Step(change, protected=resource.protect))
    return steps
