"""Promotion gates: every served release carries a signed record, and its numbers meet the environment's gates.

Releases are visible to the pack on both roads: a model service's Deployment carries its
record (annotation `loopform.dev/release`, the direct road), and the Argo CD Application
carries the records of every service it syncs (annotation `loopform.dev/releases`, the
GitOps road). The signature is checked first; the other rules judge the record's numbers
against this environment's thresholds, which come from the policy config: the numbers of the
task the record names (AUC and Brier skill of a classifier, RMSE and R² of a regressor), with
a model's own thresholds (the rule's `models` entry, from `models.<m>.gates`) over the
environment's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from loopform import record as rec
from policies.core import Config, Props, ResourceRule

DEPLOYMENT = "kubernetes:apps/v1:Deployment"
APPLICATION = "kubernetes:argoproj.io/v1alpha1:Application"
MODEL_LABEL = "loopform.dev/model"
ENVIRONMENT_LABEL = "loopform.dev/environment"
RELEASE_ANNOTATION = "loopform.dev/release"
RELEASES_ANNOTATION = "loopform.dev/releases"
TYPES = frozenset({DEPLOYMENT, APPLICATION})

Release = tuple[str, Any]  # (where, record: a mapping, or the raw value when it is not one)


def _metadata(props: Props) -> Mapping[str, Any]:
    metadata = props.get("metadata")
    return metadata if isinstance(metadata, Mapping) else {}


def _json(value: Any) -> Any:
    try:
        return json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return value


def releases(type_: str, props: Props) -> list[Release]:
    """The release records a resource serves: (label for messages, record)."""
    metadata = _metadata(props)
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    if type_ == DEPLOYMENT and MODEL_LABEL in labels:
        return [(f"model {labels[MODEL_LABEL]}", _json(annotations.get(RELEASE_ANNOTATION)))]
    if type_ == APPLICATION and RELEASES_ANNOTATION in annotations:
        records = _json(annotations[RELEASES_ANNOTATION])
        if not isinstance(records, Mapping):
            return [(f"application {metadata.get('name')}", records)]
        return [(f"model {model}", record) for model, record in sorted(records.items())]
    return []


def _environment(props: Props) -> str:
    return str((_metadata(props).get("labels") or {}).get(ENVIRONMENT_LABEL, "this environment"))


def _records(props: Props, type_: str) -> list[tuple[str, Mapping[str, Any]]]:
    """Only records that are mappings: `release-signed` reports the others."""
    return [(where, record) for where, record in releases(type_, props) if isinstance(record, Mapping)]


def _name(record: Mapping[str, Any]) -> str:
    return f"{record.get('model')} v{record.get('version')}"


def _gate(record: Mapping[str, Any], gate: str) -> Mapping[str, Any]:
    gates = record.get("gates")
    value = gates.get(gate) if isinstance(gates, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _limit(value: Any) -> str:
    """A threshold as people write it: 30, not 30.0 (config numbers cross the analyzer as floats)."""
    return f"{value:g}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def _time(value: Any) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- rules ---------------------------------------------------------------------------------------------


def check_signed(type_: str, props: Props, config: Config) -> list[str]:
    """The record is present and its signatures verify with a key trusted for this environment."""
    environment = str(config["environment"])
    if not environment and releases(type_, props):
        return [f"the {rec.SIGNATURE_POLICY} policy config names no environment: no record can verify"]
    messages = []
    for where, record in releases(type_, props):
        if record is None:
            messages.append(f"{where}: no release record (annotation {RELEASE_ANNOTATION}); run `loopform promote`")
        elif not isinstance(record, Mapping):
            messages.append(f"{where}: the release record is not a JSON object")
        else:
            messages += [f"{where}: {reason}" for reason in rec.verify(record, environment, config["trusted_keys"])]
            if record.get("model") != where.removeprefix("model "):
                messages.append(f"{where}: serves the release record of model {record.get('model')!r}")
    return messages


def _env_value(container: Mapping[str, Any], name: str) -> Any:
    for variable in container.get("env") or []:
        if isinstance(variable, Mapping) and variable.get("name") == name:
            return variable.get("value")
    return None


def check_matches_workload(type_: str, props: Props, config: Config) -> list[str]:
    """What the Deployment runs is what the record released: image, version and artifacts digest."""
    if type_ != DEPLOYMENT:
        return []
    pod = (((props.get("spec") or {}).get("template") or {}).get("spec")) or {}
    containers = [c for c in pod.get("containers") or [] if isinstance(c, Mapping)]
    messages = []
    for where, record in _records(props, type_):
        if not containers:
            return [f"{where}: the Deployment has no containers"]
        container = containers[0]
        expected = {"image": record.get("image"), **rec.release_env(record)}
        served = {
            "image": container.get("image"),
            **{name: _env_value(container, name) for name in rec.release_env(record)},
        }
        for key, value in expected.items():
            if served[key] != value:
                messages.append(
                    f"{where}: container {container.get('name')} runs {key} {served[key]!r}, "
                    f"the signed record of {_name(record)} released {value!r}"
                )
    return messages


@dataclass(frozen=True)
class Judged:
    """A served release and the thresholds it is judged by: the rule's config with its model's own over it."""

    where: str
    record: Mapping[str, Any]
    config: Config
    own: Mapping[str, Any]
    """The model's entry under the config's `models`."""
    env: str

    @property
    def name(self) -> str:
        return _name(self.record)

    def limit(self, key: str) -> str:
        """The threshold `key` as people write it."""
        return _limit(self.config[key])

    def source(self, key: str) -> str:
        """Where the threshold is set, for messages: `prod, max_rmse` or `prod, models.delivery.max_rmse`."""
        return f"{self.env}, {rec.MODELS}.{self.record.get('model')}.{key}" if key in self.own else f"{self.env}, {key}"


def _judged(type_: str, props: Props, config: Config) -> list[Judged]:
    env, models = _environment(props), config.get(rec.MODELS)
    found = []
    for where, record in _records(props, type_):
        own = models.get(record.get("model")) if isinstance(models, Mapping) else None
        own = own if isinstance(own, Mapping) else {}
        found.append(Judged(where, record, {**config, **own}, own, env))
    return found


def check_validation(type_: str, props: Props, config: Config) -> list[str]:
    """Data validation passed and the worst missing and out-of-range shares are within the thresholds."""
    messages = []
    for release in _judged(type_, props, config):
        gate = _gate(release.record, "validation")
        if gate.get("passed") is not True:
            messages.append(f"{release.where}: data validation of {release.name} did not pass")
        for metric, limit in (
            ("worst_missing_share", "max_missing_share"),
            ("worst_out_of_range_share", "max_out_of_range_share"),
        ):
            value = _number(gate.get(metric))
            if value is None:
                messages.append(f"{release.where}: data validation of {release.name} records no {metric}")
            elif value > release.config[limit]:
                messages.append(
                    f"{release.where}: {metric.replace('_', ' ')} {value:.4f} > {release.limit(limit)} "
                    f"({release.source(limit)})"
                )
    return messages


def _share_rule(gate: str, metric: str, limit: str, label: str) -> Any:
    def check(type_: str, props: Props, config: Config) -> list[str]:
        messages = []
        for release in _judged(type_, props, config):
            result = _gate(release.record, gate)
            value = _number(result.get(metric))
            if result.get("passed") is not True:
                messages.append(f"{release.where}: the {gate} gate of {release.name} did not pass")
            if value is None:
                messages.append(f"{release.where}: the {gate} gate of {release.name} records no {metric}")
            elif value > release.config[limit]:
                messages.append(
                    f"{release.where}: {label} {value:.4f} > {release.limit(limit)} ({release.source(limit)})"
                )
        return messages

    check.__doc__ = f"The {gate} gate passed and its {label} is within {limit}."
    return check


check_drift = _share_rule("drift", "drift_share", "max_drift_share", "drift share")
check_ood = _share_rule("ood", "ood_rate", "max_ood_rate", "OOD rate")

#: The thresholds of each task: (metric the record carries, threshold, label, format, whether it is a minimum).
TASK_THRESHOLDS: dict[str, tuple[tuple[str, str, str, str, bool], ...]] = {
    "classification": (
        ("positives", "min_positives", "holdout positives", "{:.0f}", True),
        ("auc", "min_auc", "AUC", "{:.4f}", True),
        ("brier_skill", "min_brier_skill", "Brier skill", "{:.3f}", True),
    ),
    "regression": (
        ("rows", "min_holdout_rows", "holdout rows", "{:.0f}", True),
        ("rmse", "max_rmse", "RMSE", "{:.4f}", False),
        ("r2", "min_r2", "R²", "{:.3f}", True),
    ),
}


def _task(release: Judged) -> str | None:
    task = _gate(release.record, "evaluation").get("task")
    return task if isinstance(task, str) and task in TASK_THRESHOLDS else None


def check_metrics(type_: str, props: Props, config: Config) -> list[str]:
    """The evaluation meets the thresholds of its task: holdout positives, AUC and Brier skill for a
    classifier; holdout rows, RMSE and R² for a regressor."""
    messages = []
    for release in _judged(type_, props, config):
        evaluation, task = _gate(release.record, "evaluation"), _task(release)
        if task is None:
            tasks = " or ".join(TASK_THRESHOLDS)
            messages.append(f"{release.where}: {release.name} records no task ({tasks}), so no minimum can judge it")
            continue
        for metric, limit, label, shown, at_least in TASK_THRESHOLDS[task]:
            value, threshold = _number(evaluation.get(metric)), _number(release.config.get(limit))
            if threshold is None:
                messages.append(
                    f"{release.where}: {release.name} is judged by {label}, and {release.env} sets no {limit} for it "
                    f"(set {rec.MODELS}.{release.record.get('model')}.gates.{limit} in the stack file)"
                )
            elif value is None:
                messages.append(f"{release.where}: {release.name} records no {label}")
            elif value < threshold if at_least else value > threshold:
                value = round(value, 4) + 0.0  # no "-0.000" for a base-rate model's float noise
                messages.append(
                    f"{release.where}: {label} {shown.format(value)} {'<' if at_least else '>'} "
                    f"{release.limit(limit)} ({release.source(limit)})"
                )
    return messages


def check_regression(type_: str, props: Props, config: Config) -> list[str]:
    """Non-inferior to the champion: for a classifier the paired interval's lower bound of the AUC difference
    is above -max_auc_drop; for a regressor the upper bound of challenger / champion RMSE - 1 is below
    max_rmse_increase.

    No bound means there was no champion to compare with (the first release).
    """
    messages = []
    for release in _judged(type_, props, config):
        evaluation, task = _gate(release.record, "evaluation"), _task(release)
        low, high = _number(evaluation.get("auc_delta_low")), _number(evaluation.get("rmse_ratio_high"))
        if task == "classification" and low is not None and low <= -release.config["max_auc_drop"]:
            messages.append(
                f"{release.where}: AUC minus the champion's has lower bound {low:.4f} <= "
                f"-{release.limit('max_auc_drop')} ({release.source('max_auc_drop')}): not shown to be non-inferior"
            )
        if task == "regression" and high is not None and high >= release.config["max_rmse_increase"]:
            messages.append(
                f"{release.where}: RMSE increase over the champion's has upper bound {high:.4f} >= "
                f"{release.limit('max_rmse_increase')} ({release.source('max_rmse_increase')}): "
                "not shown to be non-inferior"
            )
    return messages


def check_staging_first(type_: str, props: Props, config: Config) -> list[str]:
    """A release here was released to staging first (the signature rule verifies the staging proof)."""
    messages = []
    for release in _judged(type_, props, config):
        if not release.config["required"]:
            continue
        record = release.record
        proof = record.get("staging")
        if not isinstance(proof, Mapping):
            messages.append(
                f"{release.where}: {release.name} was never released to staging "
                f"(no signed staging record; {release.env} requires one)"
            )
            continue
        staged, released = _time(proof.get("released_at")), _time(record.get("released_at"))
        if staged is None or released is None or staged > released:
            messages.append(
                f"{release.where}: {release.name} was released to staging at {proof.get('released_at')}, "
                f"not before this release at {record.get('released_at')}"
            )
    return messages


def check_fresh(type_: str, props: Props, config: Config) -> list[str]:
    """The evidence was at most max_evidence_age_days old when the release was signed."""
    messages = []
    for release in _judged(type_, props, config):
        record = release.record
        created, released = _time(record.get("created_at")), _time(record.get("released_at"))
        if created is None or released is None:
            messages.append(f"{release.where}: {release.name} has no valid created_at/released_at times")
            continue
        age = (released - created).total_seconds() / 86400
        if age > release.config["max_evidence_age_days"]:
            messages.append(
                f"{release.where}: evidence of {release.name} was {age:.1f} days old when released "
                f"> {release.limit('max_evidence_age_days')} ({release.source('max_evidence_age_days')})"
            )
        elif age < -rec.CLOCK_SKEW_DAYS:
            messages.append(
                f"{release.where}: {release.name} was released at {record.get('released_at')}, "
                f"before its evidence was created at {record.get('created_at')}"
            )
    return messages


def _share(default: float) -> dict[str, Any]:
    return {"type": "number", "minimum": 0, "maximum": 1, "default": default}


TRUSTED_KEYS_SCHEMA = {
    "type": "array",
    "default": [],
    "items": {
        "type": "object",
        "required": ["key_id", "public_key", "environments"],
        "additionalProperties": False,
        "properties": {
            "key_id": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
            "public_key": {"type": "string", "description": "base64 of the raw Ed25519 public key"},
            "environments": {"type": "array", "items": {"type": "string"}},
            "owner": {"type": "string", "description": "Who holds the private key (for reviewers)."},
        },
    },
}


def _gate_rule(name: str, description: str, check: Any, config: Mapping[str, dict[str, Any]]) -> ResourceRule:
    """A promotion-gate rule: its thresholds, and under `models` any of them set for one model."""
    per_model = {
        "type": "object",
        "default": {},
        "description": "Thresholds of single models over the ones above (from the stack's models.<m>.gates).",
        "additionalProperties": {
            "type": "object",
            "additionalProperties": False,
            "properties": {key: {k: v for k, v in schema.items() if k != "default"} for key, schema in config.items()},
        },
    }
    return ResourceRule(
        name=name, description=description, check=check, types=TYPES, config={**config, rec.MODELS: per_model}
    )


RULES = [
    ResourceRule(
        name=rec.SIGNATURE_POLICY,
        description="Every served release carries a release record signed by a key trusted for this environment.",
        check=check_signed,
        types=TYPES,
        config={
            "environment": {"type": "string", "default": "", "description": "The environment records are signed for."},
            "trusted_keys": TRUSTED_KEYS_SCHEMA,
        },
    ),
    ResourceRule(
        name="release-matches-workload",
        description="A model service runs exactly the image, version and artifacts its signed record released.",
        check=check_matches_workload,
        types=frozenset({DEPLOYMENT}),
    ),
    _gate_rule(
        "data-validation-passed",
        "The released version's training data passed validation within the thresholds.",
        check_validation,
        {"max_missing_share": _share(0.05), "max_out_of_range_share": _share(0.01)},
    ),
    _gate_rule(
        "drift-within-threshold",
        "The released version's drift gate passed within the environment's drift share.",
        check_drift,
        {"max_drift_share": _share(0.3)},
    ),
    _gate_rule(
        "ood-within-threshold",
        "The released version's out-of-distribution rate is within the environment's threshold.",
        check_ood,
        {"max_ood_rate": _share(0.05)},
    ),
    _gate_rule(
        "metrics-meet-minimums",
        "The released version's evaluation meets the thresholds of its task: holdout positives, AUC and Brier "
        "skill against the base rate for a classifier; holdout rows, RMSE and R² for a regressor.",
        check_metrics,
        {
            "min_auc": _share(0.75),
            "min_positives": {"type": "number", "minimum": 1, "default": 100},
            "min_brier_skill": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.05},
            "min_holdout_rows": {"type": "number", "minimum": 1, "default": 200},
            "max_rmse": {
                "type": ["number", "null"],
                "exclusiveMinimum": 0,
                "default": None,
                "description": "Most holdout RMSE of a regressor, in its label's unit; none refuses every regressor.",
            },
            "min_r2": {"type": "number", "exclusiveMaximum": 1, "default": 0.1},
        },
    ),
    _gate_rule(
        "no-champion-regression",
        "The released version is non-inferior to the champion: for a classifier the lower bound of the paired "
        "interval of its AUC minus the champion's is above -max_auc_drop; for a regressor the upper bound of its "
        "RMSE over the champion's, minus 1, is below max_rmse_increase.",
        check_regression,
        {"max_auc_drop": _share(0.01), "max_rmse_increase": _share(0.02)},
    ),
    _gate_rule(
        "released-to-staging-first",
        "A release here was released to staging first, proved by the signed staging record.",
        check_staging_first,
        {"required": {"type": "boolean", "default": False}},
    ),
    _gate_rule(
        "evidence-fresh",
        "The release's evidence was not older than allowed when it was released.",
        check_fresh,
        {"max_evidence_age_days": {"type": "number", "minimum": 0, "default": 30}},
    ),
]
