"""`loopform diff`: what merging the working tree changes in one stack, previewed offline for a pull request.

Both sides are rendered as `loopform render` writes them, each by its own tree's code (components may differ
between the base and the head), so no Pulumi backend, state or credentials are needed: the base is the stack at
a git REF (`git archive` into a temporary folder), the head is the working tree. The report, in this order:

1. model promotions: each model whose release record (`models.<m>.release`) changes, its versions, each gate's
   verdict with its numbers, whether the signature verifies with the keys the policy config trusts, and the
   rolling update of its Deployment;
2. resources added, changed and removed, with a field-level diff of each changed one; secret values never show;
3. the policy pack's verdict on the working tree (`loopform check`).

Markdown is cut at whole entries to fit one pull-request comment, with a note saying what was left out.
The report is built by pure functions over rendered objects (`build_report`, `to_markdown`, `to_text`);
`diff` does the git and rendering work around them.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

#: The most characters one GitHub pull-request comment holds.
COMMENT_LIMIT = 65_536
#: What a secret value shows as.
SECRET = "[secret]"
#: Pulumi's marker of a secret value in serialized properties, and what `loopform render` writes for one.
_PULUMI_SECRET_SIG = "4dabf18193072939515e22adb298388d"
_REDACTED = "<redacted>"
MODEL_LABEL = "loopform.dev/model"
ARGO_CD = "Argo CD"
#: Longest value shown inline, and most lines of a multi-line value's diff.
MAX_VALUE = 400
MAX_DIFF_LINES = 80
#: Pod-template fields a rolling update lists before "and N more".
MAX_ROLLOUT_FIELDS = 8
#: Seconds one side's render may take.
RENDER_TIMEOUT = 600
ACTIONS = ("added", "changed", "removed")


class DiffError(Exception):
    """The diff cannot be made: no such ref, no git repository, or a side that does not render."""


class _Absent:
    """A field one side lacks (distinct from an explicit null)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


# --- resources -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class ObjectKey:
    """A rendered object's identity: kind, namespace ("" when cluster-scoped) and name, and who applies it."""

    kind: str
    namespace: str
    name: str
    via: str = ""  # "" for Pulumi, ARGO_CD for the GitOps folder's model services

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"


@dataclass(frozen=True)
class FieldChange:
    """One leaf that differs: its dotted path and both values (ABSENT where a side lacks it; secrets masked)."""

    path: str
    old: Any
    new: Any


@dataclass(frozen=True)
class ResourceChange:
    key: ObjectKey
    action: str  # one of ACTIONS
    fields: tuple[FieldChange, ...] = ()


def objects_in(folder: Path) -> dict[ObjectKey, dict[str, Any]]:
    """The objects `loopform render --out FOLDER` wrote: one YAML file each, the GitOps services under services/.

    A chart's file holds chart, version and values, so its kind and name come from the file name
    (`<name>.<kind>.yaml`).
    """
    found: dict[ObjectKey, dict[str, Any]] = {}
    for via, where in (("", folder), (ARGO_CD, folder / "services")):
        for path in sorted(where.glob("*.yaml")) if where.is_dir() else []:
            data = yaml.safe_load(path.read_text()) or {}
            stem, _, kind = path.name.removesuffix(".yaml").rpartition(".")
            if "kind" in data and "apiVersion" in data:
                metadata = data.get("metadata") or {}
                key = ObjectKey(
                    data["kind"], str(metadata.get("namespace") or ""), str(metadata.get("name") or stem), via
                )
            else:
                key = ObjectKey(kind.capitalize(), str(data.get("namespace") or ""), stem, via)
            if key in found:
                raise DiffError(f"two rendered objects are both {key}: {path}")
            found[key] = data
    return found


def _is_secret(value: Any) -> bool:
    if isinstance(value, Mapping):
        return _PULUMI_SECRET_SIG in value or set(value) == {"secure"}  # serialized, or a stack file's `secure:`
    return value == _REDACTED


def mask(value: Any, secret: bool = False) -> Any:
    """`value` with every secret leaf (or all of it, under a Secret's data) shown as SECRET."""
    if value is ABSENT:
        return value
    if secret or _is_secret(value):
        return SECRET
    if isinstance(value, Mapping):
        return {key: mask(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mask(item) for item in value]
    return value


_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _path(parts: Sequence[Any]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, tuple):  # (name,) of a list entry matched by its name
            text += f"[name={part[0]}]"
        elif _PLAIN_KEY.match(str(part)):
            text += f".{part}" if text else str(part)
        else:
            text += f"[{json.dumps(str(part))}]"
    return text


def _named(items: list[Any]) -> dict[str, Any] | None:
    """A list of objects with unique names (containers, env, ports, volumes) by name, else None."""
    names = [item.get("name") for item in items if isinstance(item, Mapping)]
    if len(names) != len(items) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        return None
    return dict(zip(names, items, strict=True))


def _json_document(value: Any) -> Any:
    """A string holding a JSON object or array (release records in annotations), parsed; else ABSENT."""
    if not isinstance(value, str) or not value.lstrip().startswith(("{", "[")):
        return ABSENT
    try:
        return json.loads(value)
    except ValueError:
        return ABSENT


def field_changes(
    old: Any, new: Any, *, secret_paths: Iterable[str] = (), path: tuple[Any, ...] = ()
) -> list[FieldChange]:
    """Every leaf that differs between `old` and `new`, in key order; lists of named objects match by name.

    Values under a top-level key in `secret_paths` (a Secret's data) and secret-looking values are masked.
    """
    secret_paths = tuple(secret_paths)
    if old == new:
        return []
    recurse: list[tuple[Any, Any, Any]] | None = None
    if isinstance(old, Mapping) and isinstance(new, Mapping) and not (_is_secret(old) or _is_secret(new)):
        recurse = [(key, old.get(key, ABSENT), new.get(key, ABSENT)) for key in sorted({*old, *new}, key=str)]
    elif isinstance(old, list) and isinstance(new, list):
        named_old, named_new = _named(old), _named(new)
        if named_old is not None and named_new is not None:
            names = [*named_new, *(name for name in named_old if name not in named_new)]
            recurse = [((name,), named_old.get(name, ABSENT), named_new.get(name, ABSENT)) for name in names]
        else:
            recurse = [
                (i, old[i] if i < len(old) else ABSENT, new[i] if i < len(new) else ABSENT)
                for i in range(max(len(old), len(new)))
            ]
    else:
        parsed = _json_document(old), _json_document(new)
        if parsed[0] is not ABSENT and parsed[1] is not ABSENT:
            return field_changes(*parsed, secret_paths=secret_paths, path=path)
    if recurse is None:
        secret = bool(path) and path[0] in secret_paths
        return [FieldChange(_path(path), mask(old, secret), mask(new, secret))]
    changes: list[FieldChange] = []
    for part, before, after in recurse:
        changes += field_changes(before, after, secret_paths=secret_paths, path=(*path, part))
    return changes


def _secret_paths(key: ObjectKey) -> tuple[str, ...]:
    return ("data", "stringData") if key.kind == "Secret" else ()


def diff_objects(old: Mapping[ObjectKey, Any], new: Mapping[ObjectKey, Any]) -> list[ResourceChange]:
    """Added, changed and removed objects, each group in key order; changed ones with their field changes."""
    added = [ResourceChange(key, "added") for key in sorted(set(new) - set(old))]
    removed = [ResourceChange(key, "removed") for key in sorted(set(old) - set(new))]
    changed = []
    for key in sorted(set(old) & set(new)):
        fields = field_changes(old[key], new[key], secret_paths=_secret_paths(key))
        if fields:
            changed.append(ResourceChange(key, "changed", tuple(fields)))
    return [*added, *changed, *removed]


# --- promotions ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One policy violation, as the verdict shows it."""

    level: str
    policy: str
    resource: str
    message: str


@dataclass(frozen=True)
class Verdict:
    """The policy pack's verdict on the working tree, or why it could not run."""

    findings: tuple[Finding, ...] = ()
    policies: int = 0
    resources: int = 0
    error: str | None = None

    @property
    def mandatory(self) -> int:
        return sum(1 for f in self.findings if f.level == "mandatory")

    @property
    def advisory(self) -> int:
        return sum(1 for f in self.findings if f.level == "advisory")


@dataclass(frozen=True)
class Gate:
    """A gate of a release: verdict (None: not judged), its numbers as shown, and the pack's objections."""

    name: str
    passed: bool | None
    numbers: tuple[tuple[str, str], ...]
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rollout:
    """What a changed release does to one Deployment of its model."""

    key: ObjectKey
    action: str  # added, changed, removed
    replicas: Any
    strategy: str
    template: tuple[FieldChange, ...]  # the pod template's changes: any of them rolls the pods


@dataclass(frozen=True)
class Promotion:
    model: str
    old: int | None
    new: int | None
    gates: tuple[Gate, ...]
    signed: bool | None  # None: no record
    signature: str
    problems: tuple[str, ...]  # the pack's other objections to this release (workload, staging, freshness)
    rollouts: tuple[Rollout, ...]


#: The rules of the pack that judge each gate of a record.
GATE_RULES = {
    "validation": ("data-validation-passed",),
    "drift": ("drift-within-threshold",),
    "ood": ("ood-within-threshold",),
    "evaluation": ("metrics-meet-minimums", "no-champion-regression"),
}
#: The pack's other rules about a release (its signature is verified here, with the same keys).
OTHER_RELEASE_RULES = ("release-matches-workload", "released-to-staging-first", "evidence-fresh")
#: Each recorded number's threshold in the policy config: (rule, key, how it bounds the number).
THRESHOLDS = {
    "worst_missing_share": ("data-validation-passed", "max_missing_share", "max"),
    "worst_out_of_range_share": ("data-validation-passed", "max_out_of_range_share", "max"),
    "drift_share": ("drift-within-threshold", "max_drift_share", "max"),
    "ood_rate": ("ood-within-threshold", "max_ood_rate", "max"),
    "auc": ("metrics-meet-minimums", "min_auc", "min"),
    "positives": ("metrics-meet-minimums", "min_positives", "min"),
    "brier_skill": ("metrics-meet-minimums", "min_brier_skill", "min"),
    "rows": ("metrics-meet-minimums", "min_holdout_rows", "min"),
    "rmse": ("metrics-meet-minimums", "max_rmse", "max"),
    "r2": ("metrics-meet-minimums", "min_r2", "min"),
    "auc_delta_low": ("no-champion-regression", "max_auc_drop", "above -"),
    "rmse_ratio_high": ("no-champion-regression", "max_rmse_increase", "below"),
}


def releases(stack_document: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Each model's release record in a parsed stack file (none for a missing file or an unreleased model)."""
    from loopform.spec import CONFIG_KEY

    platform = ((stack_document or {}).get("config") or {}).get(CONFIG_KEY) or {}
    models = platform.get("models") or {}
    return {
        name: dict(model["release"])
        for name, model in models.items()
        if isinstance(model, Mapping) and isinstance(model.get("release"), Mapping)
    }


def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _threshold(policy: Mapping[str, Any], model: str, metric: str) -> str:
    rule, key, how = THRESHOLDS[metric]
    entry = policy.get(rule)
    if not isinstance(entry, Mapping):
        return ""
    own = (entry.get("models") or {}).get(model) or {}
    value = own.get(key, entry.get(key))
    if not isinstance(value, int | float) or isinstance(value, bool):
        return ""
    return f" ({how}{'' if how.endswith('-') else ' '}{_number(value)})"


def _objections(model: str, rules: Iterable[str], verdict: Verdict) -> tuple[str, ...]:
    """The pack's messages of `rules` about `model`, without repeats (both roads report a release)."""
    prefix = f"model {model}: "
    messages = [
        f.message.removeprefix(prefix) for f in verdict.findings if f.policy in rules and f.message.startswith(prefix)
    ]
    return tuple(dict.fromkeys(messages))


def gates(model: str, record: Mapping[str, Any], policy: Mapping[str, Any], verdict: Verdict) -> tuple[Gate, ...]:
    """Each gate of a record: its recorded verdict and numbers, thresholds, and what the pack says of it.

    Validation, drift and OOD record their own verdict; the evaluation records numbers only, judged by the
    pack (so it is not judged when the pack did not run).
    """
    recorded = record.get("gates") if isinstance(record.get("gates"), Mapping) else {}
    found = []
    for name, rules in GATE_RULES.items():
        gate = recorded.get(name) if isinstance(recorded.get(name), Mapping) else {}
        problems = _objections(model, rules, verdict)
        numbers = [
            (metric, _number(value) + (_threshold(policy, model, metric) if metric in THRESHOLDS else ""))
            for metric, value in gate.items()
            if metric not in ("passed", "task")
        ]
        if name == "evaluation":
            label = f"evaluation ({gate.get('task') or 'no task'})"
            passed = None if verdict.error else not problems
        else:
            label = name
            passed = gate.get("passed") is True and not problems
        found.append(Gate(label, passed, tuple(numbers), problems))
    return tuple(found)


def signature(record: Mapping[str, Any], policy: Mapping[str, Any] | None) -> tuple[bool, str]:
    """Whether the record verifies with the keys the environment's policy config trusts, and how it reads."""
    from loopform import record as rec

    entry = (policy or {}).get(rec.SIGNATURE_POLICY)
    if not isinstance(entry, Mapping):
        return False, "not verified: the policy config trusts no release keys"
    environment = str(entry.get("environment") or "")
    problems = rec.verify(record, environment, entry.get("trusted_keys") or [])
    if problems:
        return False, "NOT verified: " + "; ".join(problems)
    staged = "; its staging proof verifies too" if rec.staging_record(record) is not None else ""
    return True, f"verified: signed by key {record.get('key_id')}, trusted for {environment}{staged}"


def _model_of(manifest: Mapping[str, Any] | None) -> str | None:
    return (((manifest or {}).get("metadata") or {}).get("labels") or {}).get(MODEL_LABEL)


def _strategy(manifest: Mapping[str, Any]) -> str:
    strategy = (manifest.get("spec") or {}).get("strategy") or {}
    kind = strategy.get("type", "RollingUpdate")
    rolling = strategy.get("rollingUpdate") or {}
    if kind != "RollingUpdate":
        return kind
    return f"RollingUpdate, maxSurge {rolling.get('maxSurge', '25%')}, maxUnavailable {rolling.get('maxUnavailable', '25%')}"


def rollouts(
    model: str,
    changes: Iterable[ResourceChange],
    old: Mapping[ObjectKey, Any],
    new: Mapping[ObjectKey, Any],
) -> tuple[Rollout, ...]:
    """The model's Deployments that a change starts, rolls or stops."""
    found = []
    for change in changes:
        manifest = new.get(change.key) or old.get(change.key) or {}
        if change.key.kind != "Deployment" or _model_of(manifest) != model:
            continue
        template = tuple(f for f in change.fields if f.path.startswith("spec.template."))
        found.append(
            Rollout(
                change.key, change.action, (manifest.get("spec") or {}).get("replicas"), _strategy(manifest), template
            )
        )
    return tuple(found)


def promotions(
    old_releases: Mapping[str, Mapping[str, Any]],
    new_releases: Mapping[str, Mapping[str, Any]],
    changes: Sequence[ResourceChange],
    old: Mapping[ObjectKey, Any],
    new: Mapping[ObjectKey, Any],
    policy: Mapping[str, Any] | None,
    verdict: Verdict,
) -> tuple[Promotion, ...]:
    """Every model whose release record changes, in name order."""
    found = []
    for model in sorted({*old_releases, *new_releases}):
        before, after = old_releases.get(model), new_releases.get(model)
        if before == after:
            continue
        if after is None:
            signed, note, judged, problems = None, "no release record: the model no longer serves", (), ()
        else:
            signed, note = signature(after, policy)
            judged = gates(model, after, policy or {}, verdict)
            problems = _objections(model, OTHER_RELEASE_RULES, verdict)
        found.append(
            Promotion(
                model=model,
                old=before.get("version") if before else None,
                new=after.get("version") if after else None,
                gates=judged,
                signed=signed,
                signature=note,
                problems=problems,
                rollouts=rollouts(model, changes, old, new),
            )
        )
    return tuple(found)


# --- the report ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    stack: str
    base: str
    commit: str
    promotions: tuple[Promotion, ...]
    changes: tuple[ResourceChange, ...]
    verdict: Verdict
    notes: tuple[str, ...] = ()


def build_report(
    stack: str,
    base: str,
    commit: str,
    old_objects: Mapping[ObjectKey, Any],
    new_objects: Mapping[ObjectKey, Any],
    old_releases: Mapping[str, Mapping[str, Any]],
    new_releases: Mapping[str, Mapping[str, Any]],
    policy: Mapping[str, Any] | None,
    verdict: Verdict,
    notes: Sequence[str] = (),
) -> Report:
    """The whole diff from both sides' rendered objects and release records, the policy config and verdict."""
    changes = diff_objects(old_objects, new_objects)
    found = promotions(old_releases, new_releases, changes, old_objects, new_objects, policy, verdict)
    return Report(stack, base, commit, found, tuple(changes), verdict, tuple(notes))


# --- rendering -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """A piece of the output; rank 0 is always kept, higher ranks go first when cutting (`what` names them)."""

    text: str
    rank: int = 0
    what: str = ""


class _Markdown:
    arrow = "→"

    def code(self, text: str) -> str:
        longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
        fence = "`" * (longest + 1)
        pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
        return f"{fence}{pad}{text}{pad}{fence}"

    def plain(self, text: str) -> str:
        """Free text (policy messages): nothing in it may turn into markup or hidden HTML."""
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return re.sub(r"([\\`*_\[\]|#])", r"\\\1", " ".join(text.split()))

    def strong(self, text: str) -> str:
        return f"**{text}**"

    def heading(self, level: int, text: str) -> str:
        return f"{'#' * (level + 1)} {text}\n\n"

    def bullet(self, text: str, depth: int = 0) -> str:
        return f"{'  ' * depth}- {text}\n"

    def block(self, text: str, language: str, depth: int = 0) -> str:
        longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=2)
        fence = "`" * (longest + 1)
        indent = "  " * depth
        body = "".join(f"{indent}{line}\n" for line in text.splitlines())
        return f"{indent}{fence}{language}\n{body}{indent}{fence}\n"

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], depth: int = 0) -> str:
        indent = "  " * depth
        lines = [header, ["---"] * len(header), *rows]
        return "".join(f"{indent}| {' | '.join(cell.replace('|', chr(92) + '|') for cell in row)} |\n" for row in lines)

    def fold(self, summary: str) -> tuple[str, str]:
        return f"<details><summary>{summary}</summary>\n\n", "\n</details>\n"


class _Text(_Markdown):
    arrow = "->"

    def code(self, text: str) -> str:
        return text

    def plain(self, text: str) -> str:
        return " ".join(text.split())

    def strong(self, text: str) -> str:
        return text

    def heading(self, level: int, text: str) -> str:
        return f"{text}\n{'=-'[min(level, 2) - 1] * len(text)}\n\n" if level <= 2 else f"{text}\n\n"

    def block(self, text: str, language: str, depth: int = 0) -> str:
        indent = "  " * (depth + 2)
        return "".join(f"{indent}{line}\n" for line in text.splitlines())

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], depth: int = 0) -> str:
        everything = [header, *rows]
        widths = [max(len(row[i]) for row in everything) for i in range(len(header) - 1)]
        indent = "  " * (depth + 1)
        return "".join(
            indent
            + "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
            + "\n"
            for row in everything
        )

    def fold(self, summary: str) -> tuple[str, str]:
        return f"{summary}:\n", ""


def _value(style: _Markdown, value: Any) -> str:
    if value is ABSENT:
        return "(absent)"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(", ", ": "))
    if len(text) > MAX_VALUE:
        text = f"{text[:MAX_VALUE]}… ({len(text) - MAX_VALUE} more characters)"
    return style.code(text)


def _multiline(change: FieldChange) -> bool:
    return any(isinstance(v, str) and "\n" in v for v in (change.old, change.new))


def _text_diff(change: FieldChange) -> str:
    old = change.old.splitlines() if isinstance(change.old, str) else []
    new = change.new.splitlines() if isinstance(change.new, str) else []
    lines = list(difflib.unified_diff(old, new, lineterm="", n=2))[2:]
    if len(lines) > MAX_DIFF_LINES:
        lines = [*lines[:MAX_DIFF_LINES], f"… {len(lines) - MAX_DIFF_LINES} more lines"]
    return "\n".join(lines)


def _field_lines(style: _Markdown, fields: Iterable[FieldChange], depth: int) -> str:
    text = ""
    for change in fields:
        if _multiline(change):
            text += style.bullet(f"{style.code(change.path)}:", depth)
            text += style.block(_text_diff(change), "diff", depth + 1)
        else:
            text += style.bullet(
                f"{style.code(change.path)}: {_value(style, change.old)} {style.arrow} {_value(style, change.new)}",
                depth,
            )
    return text


def _key(style: _Markdown, key: ObjectKey) -> str:
    return style.code(str(key)) + (f" (applied by {key.via})" if key.via else "")


def _version(version: int | None) -> str:
    return f"v{version}" if version is not None else "none"


def _verdict_word(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "not judged"}[passed]


def _promotion_items(style: _Markdown, promotion: Promotion) -> list[_Item]:
    first = " (first release)" if promotion.old is None else ""
    text = style.heading(
        3, f"{promotion.model}: {_version(promotion.old)} {style.arrow} {_version(promotion.new)}{first}"
    )
    if promotion.signed is not None:
        text += style.bullet(f"{style.strong('Signature')}: {style.plain(promotion.signature)}")
        rows = [
            [gate.name, style.strong(_verdict_word(gate.passed)), ", ".join(f"{k} {v}" for k, v in gate.numbers) or "-"]
            for gate in promotion.gates
        ]
        text += style.bullet(f"{style.strong('Gates')}:")
        text += "\n" + style.table(["gate", "verdict", "numbers"], rows, depth=1) + "\n"
        for gate in promotion.gates:
            text += "".join(style.bullet(f"{gate.name}: {style.plain(p)}", 1) for p in gate.problems)
        for problem in promotion.problems:
            text += style.bullet(f"{style.strong('Policy')}: {style.plain(problem)}")
    else:
        text += style.bullet(style.plain(promotion.signature))
    if not promotion.rollouts:
        text += style.bullet(f"{style.strong('Rollout')}: no Deployment of {promotion.model} changes")
    for rollout in promotion.rollouts:
        what = _key(style, rollout.key)
        if rollout.action == "added":
            line = f"new {what}: first rollout of {rollout.replicas} replicas ({rollout.strategy})"
        elif rollout.action == "removed":
            line = f"{what} is removed: its pods stop"
        elif rollout.template:
            verb = "rolling update" if rollout.strategy.startswith("RollingUpdate") else "recreate"
            line = f"{verb} of {what}, {rollout.replicas} replicas ({rollout.strategy}); its pod template changes:"
        else:
            line = f"{what} changes, its pod template does not: no pod restarts"
        text += style.bullet(f"{style.strong('Rollout')}: {line}")
        if rollout.action == "changed":
            shown = rollout.template[:MAX_ROLLOUT_FIELDS]
            text += _field_lines(style, shown, 1)
            if len(rollout.template) > len(shown):
                text += style.bullet(f"and {len(rollout.template) - len(shown)} more (under Resources)", 1)
    return [_Item(text + "\n")]


def _items(style: _Markdown, report: Report) -> list[_Item]:
    items = [_Item(style.heading(1, f"loopform diff: stack {style.code(report.stack)}"))]
    items.append(
        _Item(
            f"The working tree against {style.code(report.base)} ({style.code(report.commit)}), rendered offline.\n\n"
        )
    )
    items += [_Item(f"{style.plain(note)}\n\n") for note in report.notes]
    items.append(_Item("", what="note"))  # where the cut's note goes
    items.append(_Item(style.heading(2, "Model promotions")))
    if not report.promotions:
        items.append(_Item("No release record changes.\n\n"))
    for promotion in report.promotions:
        items += _promotion_items(style, promotion)

    counts = {action: sum(1 for c in report.changes if c.action == action) for action in ACTIONS}
    summary = ", ".join(f"{count} {action}" for action, count in counts.items())
    items.append(_Item(style.heading(2, f"Resources: {summary}")))
    if not report.changes:
        items.append(_Item("No rendered object changes.\n\n"))
    for action in ACTIONS:
        group = [c for c in report.changes if c.action == action]
        if not group:
            continue
        items.append(_Item(style.heading(3, action.capitalize())))
        for change in group:
            items.append(_Item(style.bullet(_key(style, change.key)), rank=1, what="resource"))
            if change.fields:
                items.append(_Item(_field_lines(style, change.fields, 1), rank=3, what=f"field diff of {change.key}"))
        items.append(_Item("\n"))

    verdict = report.verdict
    if verdict.error is not None:
        items.append(_Item(style.heading(2, "Policy pack: did not run")))
        items.append(_Item(style.block(verdict.error, "text") + "\n"))
        return items
    word = "FAILS" if verdict.mandatory else "passes"
    items.append(
        _Item(
            style.heading(
                2,
                f"Policy pack {word}: {verdict.mandatory} mandatory, {verdict.advisory} advisory violations "
                f"from {verdict.policies} policies over {verdict.resources} resources",
            )
        )
    )
    for level, rank in (("mandatory", 0), ("advisory", 2)):
        found = [f for f in verdict.findings if f.level == level]
        if not found:
            continue
        opening, closing = (
            style.fold(f"{len(found)} {level}") if level == "advisory" else (f"{level.capitalize()}:\n\n", "")
        )
        items.append(_Item(opening))
        for finding in found:
            line = f"{style.code(finding.policy)} on {style.code(finding.resource)}: {style.plain(finding.message)}"
            items.append(_Item(style.bullet(line), rank=rank, what=f"{level} violation"))
        items.append(_Item(closing + "\n"))
    return items


def _fit(items: list[_Item], limit: int, command: str) -> str:
    """The items in order, within `limit` characters: whole items are left out, highest rank first, each rank
    from its end, and a note says what."""
    text = "".join(item.text for item in items)
    if len(text) <= limit:
        return text
    reserve = 600
    budget = limit - reserve - sum(len(item.text) for item in items if item.rank == 0)
    kept = {i for i, item in enumerate(items) if item.rank == 0}
    for rank in sorted({item.rank for item in items} - {0}):
        members = [i for i, item in enumerate(items) if item.rank == rank]
        for i in members:
            if len(items[i].text) > budget:
                break
            kept.add(i)
            budget -= len(items[i].text)
        else:
            continue
        break
    left = [items[i] for i in range(len(items)) if i not in kept]
    kinds: dict[str, int] = {}
    for item in left:
        kind = item.what.split(" of ", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    first = next((item.what for item in left if " of " in item.what), None)
    listed = ", ".join(f"{count} {kind}{'s' if count > 1 else ''}" for kind, count in kinds.items())
    note = (
        f"> **Cut to fit one pull-request comment ({limit:,} characters):** left out {listed}"
        + (f" (from the {first} on)" if first else "")
        + f". Run `{command}` for all of it.\n\n"
    )
    out = "".join(note if item.what == "note" else item.text for i, item in enumerate(items) if i in kept)
    if len(out) > limit:  # the always-kept parts alone are too long: cut at a line
        out = out[: limit - len("\n…\n")].rsplit("\n", 1)[0] + "\n…\n"
    return out


def to_markdown(report: Report, limit: int = COMMENT_LIMIT) -> str:
    """The report as one pull-request comment of at most `limit` characters."""
    command = f"loopform diff --stack {report.stack} --base {report.base}"
    return _fit(_items(_Markdown(), report), limit, command)


def to_text(report: Report) -> str:
    """The report for a terminal, whole."""
    return "".join(item.text for item in _items(_Text(), report)).rstrip("\n") + "\n"


# --- git and rendering ---------------------------------------------------------------------------------------


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, check=False)
    except FileNotFoundError:
        raise DiffError("git is not installed: diff renders the base from git") from None


def materialise(root: Path, ref: str, out: Path) -> tuple[str, Path]:
    """Extract the project as it is at `ref` into `out` (`git archive`); return the commit and the project's
    root in `out` (the project may be a folder of its repository)."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise DiffError(f"{root} is not in a git repository: diff compares the working tree with a git ref")
    toplevel = Path(top.stdout.decode().strip())
    found = _git(root, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}")
    if found.returncode != 0:
        raise DiffError(
            f"no commit {ref!r} in the git repository at {toplevel}: name a branch, tag or commit "
            "(a shallow clone may need `git fetch` of it first)"
        )
    commit = found.stdout.decode().strip()
    prefix = Path(os.path.relpath(root.resolve(), toplevel.resolve())).as_posix()
    paths = [] if prefix == "." else ["--", prefix]
    out.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "archive", "--format=tar", commit, *paths], cwd=toplevel, stdout=subprocess.PIPE)
    assert archive.stdout is not None
    with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
        tar.extractall(out, filter="data")
    if archive.wait() != 0:
        raise DiffError(f"git archive of {ref} ({commit[:12]}) failed")
    return commit, out if prefix == "." else out / prefix


@dataclass
class _Render:
    """`loopform render` of one tree, run by that tree's own code in a subprocess."""

    label: str
    out: Path
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, label: str, stack: str, root: Path, out: Path) -> _Render:
        from loopform.spec import ROOT_ENV

        env = {key: value for key, value in os.environ.items() if key != ROOT_ENV}
        # The tree's own loopform and components come first; a user's project without them uses the installed ones.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        argv = [
            sys.executable,
            "-m",
            "loopform.cli",
            "--root",
            str(root),
            "render",
            "--stack",
            stack,
            "--out",
            str(out),
        ]
        log = out.parent / f"{out.name}.log"
        with open(log, "wb") as sink:
            process = subprocess.Popen(argv, cwd=root, env=env, stdout=sink, stderr=subprocess.STDOUT)
        return cls(label, out, process, log)

    def wait(self) -> dict[ObjectKey, dict[str, Any]]:
        try:
            code = self.process.wait(timeout=RENDER_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise DiffError(f"rendering {self.label} took over {RENDER_TIMEOUT} s") from None
        if code != 0:
            tail = "\n".join(self.log.read_text(errors="replace").strip().splitlines()[-20:])
            raise DiffError(f"`loopform render` of {self.label} failed (exit {code}):\n{tail}")
        return objects_in(self.out)


def policy_verdict(stack: str, root: Path) -> Verdict:
    """`loopform check` on the working tree, as findings (or the reason it could not run)."""
    from loopform.check import CheckError, check

    try:
        result = check(stack, root)
    except CheckError as error:
        return Verdict(error=str(error))
    findings = tuple(Finding(v.level, v.policy, f"{v.type_} {v.name}", v.message) for v in result.violations)
    return Verdict(findings, len(result.policies), result.resources)


def _policy_config(stack: str, root: Path) -> dict[str, Any] | None:
    from loopform.check import CheckError, policy_config_path

    try:
        return json.loads(policy_config_path(stack, root).read_text())
    except (CheckError, ValueError, OSError):
        return None


def diff(stack: str, root: Path, base: str) -> Report:
    """Render `stack` at git `base` and in the working tree at `root`, and judge the working tree."""
    from loopform.spec import load_stack, read_stack_file, stack_file

    root = Path(root).resolve()
    head_file = stack_file(stack, root)
    if load_stack(head_file, root).is_local:
        raise DiffError(f"stack {stack} has cluster.kind none and declares nothing to diff")
    with tempfile.TemporaryDirectory(prefix="loopform-diff-") as tmp:
        commit, base_root = materialise(root, base, Path(tmp) / "base")
        base_file = base_root / head_file.relative_to(root)
        shown = f"{stack} in the working tree"
        renders = [_Render.start(shown, stack, root, Path(tmp) / "head-render")]
        notes = []
        if base_file.is_file():
            renders.append(_Render.start(f"{stack} at {base}", stack, base_root, Path(tmp) / "base-render"))
        else:
            notes.append(f"{head_file.relative_to(root)} did not exist at {base}: every resource is added.")
        try:
            verdict = policy_verdict(stack, root)
            new_objects, *rest = [render.wait() for render in renders]
        finally:
            for render in renders:
                if render.process.poll() is None:
                    render.process.kill()
                    render.process.wait()
        old_objects = rest[0] if rest else {}
        old_releases = releases(read_stack_file(base_file)) if base_file.is_file() else {}
        new_releases = releases(read_stack_file(head_file))
    return build_report(
        stack,
        base,
        commit[:12],
        old_objects,
        new_objects,
        old_releases,
        new_releases,
        _policy_config(stack, root),
        verdict,
        notes,
    )
