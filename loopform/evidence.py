"""Release evidence: canonical JSON, its digest, and the one check every gate keeper calls.

Stdlib only: the Pulumi policy pack imports this module, and `loopform promote` calls the
same `check_evidence`, so a release is judged by one piece of code wherever it is judged.

Layout of an evidence record (top-level keys):

    model                      registered model name
    version                    MLflow model version (int)
    run_id                     MLflow run that trained it
    training_data_fingerprint  sha256 of the training data (loopform.contract.fingerprint)
    created_at                 ISO-8601 UTC time the evidence was sealed
    gates                      {"validation": GateResult dict, "drift": ..., "ood": ...}
    evaluation                 loopform.evaluation `evaluate`: {task, and its metrics: auc,
                                auc_low, positives, brier_skill, ..., auc_delta_low for a
                                classifier; rmse, rmse_low, rmse_high, mae, r2, rows, ...,
                                rmse_ratio_high for a regressor; champion_version, confidence}
    training                   the model's training facts (its `info`): seed, rows, epochs, device it
                                trained on (cpu / cuda), hyperparameters
    artifacts                  {"digest": sha256 over the model's files, "files": {path: sha256}}
    digest                     sha256 hex of canonical JSON of every other key

The digest makes tampering visible (an edited metric in a stack file no longer matches);
`check_evidence` re-judges the recorded metrics against the *target* environment's gates
(with the model's own `models.<m>.gates` over them), because a version that passed dev's
gates may still be below prod's. The evaluation gates follow the task the evaluation names:

- classification: at least `min_positives` holdout positives, AUC >= `min_auc`, Brier skill
  (against always predicting the training base rate) >= `min_brier_skill`, and with a
  champion the lower bound of the paired bootstrap interval of challenger minus champion AUC
  > -`max_auc_drop` (non-inferiority). A model that always predicts the base rate fails;
- regression: at least `min_holdout_rows` holdout rows, RMSE <= `max_rmse` (no default: a
  regressor judged by gates without one is refused), R² >= `min_r2`, and with a champion the
  upper bound of the paired interval of challenger RMSE / champion RMSE - 1 < `max_rmse_increase`.

Each reason names the key path of its threshold: `gates.min_auc` when the environment sets
it, `models.<m>.gates.max_rmse` when the model's own gates do.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

REQUIRED_GATES: tuple[str, ...] = ("validation", "drift", "ood")
REQUIRED_FIELDS: tuple[str, ...] = (
    "model",
    "version",
    "run_id",
    "training_data_fingerprint",
    "created_at",
    "gates",
    "evaluation",
    "artifacts",
)
TASKS: tuple[str, ...] = ("classification", "regression")
#: Numbers every evaluation of a task must carry: the gates judge some, the rest is what a reviewer reads.
EVALUATION_FIELDS: dict[str, tuple[str, ...]] = {
    "classification": (
        "auc",
        "auc_low",
        "positives",
        "brier_skill",
        "ece",
        "threshold",
        "precision",
        "recall",
        "precision_at_alert_rate",
        "recall_at_alert_rate",
    ),
    "regression": ("rmse", "rmse_low", "rmse_high", "mae", "r2", "rows"),
}
# Clocks of the machine that sealed the evidence and the one that checks it may differ a little.
CLOCK_SKEW = timedelta(minutes=5)


def jsonable(obj: Any) -> Any:
    """Plain JSON data: tuples to lists, numpy scalars/arrays via item()/tolist(), NaN/inf to None.

    Evidence crosses MLflow tags, YAML stack files and Pulumi config; only plain JSON values
    survive all three unchanged, so the digest is computed over exactly those.
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, without importing numpy
        return jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return jsonable(obj.item())
    if hasattr(obj, "to_dict"):  # GateResult and friends
        return jsonable(obj.to_dict())
    raise TypeError(f"evidence value of type {type(obj).__name__} is not JSON data: {obj!r}")


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def digest(evidence: Mapping[str, Any]) -> str:
    """sha256 hex over the canonical JSON of every field except `digest`."""
    body = {k: v for k, v in evidence.items() if k != "digest"}
    return hashlib.sha256(canonical(body)).hexdigest()


def now_iso(now: datetime | None = None) -> str:
    """UTC time in the form evidence records it."""
    return (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")


def seal(evidence: Mapping[str, Any], *, now: datetime | None = None) -> dict[str, Any]:
    """A copy normalised to plain JSON, with `created_at` (if absent) and a fresh `digest`."""
    body = jsonable({k: v for k, v in evidence.items() if k != "digest"})
    body.setdefault("created_at", now_iso(now))
    body["digest"] = digest(body)
    return body


def verify(evidence: Mapping[str, Any] | None) -> bool:
    """True when the recorded digest matches the content."""
    if not isinstance(evidence, Mapping) or not isinstance(evidence.get("digest"), str):
        return False
    try:
        return evidence["digest"] == digest(evidence)
    except (TypeError, ValueError):
        return False


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _metrics(gate_results: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    result = gate_results.get(name)
    metrics = result.get("metrics") if isinstance(result, Mapping) else None
    return metrics if isinstance(metrics, Mapping) else {}


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class GatePaths:
    """Where the thresholds a model is judged by are set: its own `models.<model>.gates` (`overlay`), else `gates`."""

    model: str = ""
    overlay: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, key: str) -> str:
        """`models.<model>.gates.<key>` when the model's own gates set `key` (dotted: `drift.max_drift_share`),
        else `gates.<key>`."""
        node: Any = self.overlay
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return self.own(key) if node is not None else f"gates.{key}"

    def own(self, key: str) -> str:
        """Where the model's own threshold would be set."""
        return f"models.{self.model}.gates.{key}" if self.model else f"gates.{key}"


def check_evidence(
    evidence: Mapping[str, Any] | None,
    gates: Mapping[str, Any],
    *,
    now: datetime,
    require: Iterable[str] = REQUIRED_GATES,
    paths: GatePaths | None = None,
) -> list[str]:
    """Every reason to refuse a release with this evidence under these gates; empty means accept.

    `gates` is `GatesSpec.model_dump()` of the gates the model is judged by in the target
    environment (`PlatformSpec.gates_for(model)`); `paths` knows which of them the model's own
    `models.<model>.gates` set, so each reason names where its threshold is set.
    `require` names the gate results that must be present and passed. Pure: no I/O, the
    clock comes in as `now`.
    """
    if evidence is None or (isinstance(evidence, Mapping) and not evidence):
        return ["missing evidence: the version carries no release evidence"]
    if not isinstance(evidence, Mapping):
        return [f"malformed evidence: expected a mapping, got {type(evidence).__name__}"]

    path = paths or GatePaths()
    reasons: list[str] = []
    recorded = evidence.get("digest")
    if not isinstance(recorded, str) or not recorded:
        reasons.append("missing evidence digest: the evidence was never sealed")
    else:
        try:
            computed = digest(evidence)
        except (TypeError, ValueError) as error:
            computed = f"<uncomputable: {error}>"
        if computed != recorded:
            reasons.append(
                f"tampered evidence: digest mismatch (recorded {recorded[:12]}..., content hashes to {computed[:12]}...)"
            )

    for key in REQUIRED_FIELDS:
        if evidence.get(key) in (None, "", {}):
            reasons.append(f"missing evidence field {key!r}")

    created = _parse_time(evidence.get("created_at"))
    if evidence.get("created_at") and created is None:
        reasons.append(f"malformed created_at {evidence.get('created_at')!r}: expected an ISO-8601 time")
    if created is not None:
        max_age = timedelta(days=int(gates.get("max_evidence_age_days", 30)))
        now_utc = now if now.tzinfo else now.replace(tzinfo=UTC)
        age = now_utc - created
        if age > max_age:
            reasons.append(
                f"stale evidence: created {created.isoformat()} is {age.days} days old, "
                f"more than {path('max_evidence_age_days')}={max_age.days}"
            )
        elif age < -CLOCK_SKEW:
            reasons.append(f"evidence created_at {created.isoformat()} lies in the future")

    gate_results = evidence.get("gates")
    gate_results = gate_results if isinstance(gate_results, Mapping) else {}
    for name in require:
        result = gate_results.get(name)
        if not isinstance(result, Mapping):
            reasons.append(f"missing gate result {name!r}")
            continue
        if result.get("passed") is not True:
            failures = result.get("failures") or []
            detail = "; ".join(str(f) for f in failures) if failures else "no reason recorded"
            reasons.append(f"gate {name!r} did not pass: {detail}")

    validation = _metrics(gate_results, "validation")
    for metric, limit in (
        ("worst_missing_share", "max_missing_share"),
        ("worst_out_of_range_share", "max_out_of_range_share"),
    ):
        value, allowed = _number(validation.get(metric)), _number(gates.get(limit))
        if (gate_results.get("validation") or {}).get("passed") is True and value is None:
            reasons.append(f"validation gate result has no numeric metrics.{metric}")
        elif value is not None and allowed is not None and value > allowed:
            reasons.append(f"validation {metric} {value:.4f} is above {path(limit)}={allowed}")

    drift_metrics = _metrics(gate_results, "drift")
    drift_share = _number(drift_metrics.get("drift_share"))
    max_drift_share = float((gates.get("drift") or {}).get("max_drift_share", 0.3))
    if "drift" in gate_results and drift_share is None:
        reasons.append("drift gate result has no numeric metrics.drift_share")
    elif drift_share is not None and drift_share > max_drift_share:
        reasons.append(f"drift share {drift_share:.3f} is above {path('drift.max_drift_share')}={max_drift_share}")

    ood_metrics = _metrics(gate_results, "ood")
    ood_rate = _number(ood_metrics.get("ood_rate"))
    max_ood = float(gates.get("max_ood_rate", 0.05))
    if "ood" in gate_results and ood_rate is None:
        reasons.append("ood gate result has no numeric metrics.ood_rate")
    elif ood_rate is not None and ood_rate > max_ood:
        reasons.append(f"out-of-distribution rate {ood_rate:.4f} is above {path('max_ood_rate')}={max_ood}")

    evaluation = evidence.get("evaluation")
    evaluation = evaluation if isinstance(evaluation, Mapping) else {}
    reasons += _evaluation_reasons(evaluation, gates, path)
    return reasons


def _evaluation_reasons(evaluation: Mapping[str, Any], gates: Mapping[str, Any], path: GatePaths) -> list[str]:
    """The evaluation against the gates of its task (`path` names where each threshold is set).

    A number the evaluation lacks is a reason (a gate that cannot be judged refuses); the
    comparison with the champion is judged when the evaluation names one.
    """
    if not evaluation:
        return []  # the missing field is reported with the others
    task = evaluation.get("task")
    if task not in TASKS:
        return [f"evaluation.task is {task!r}: expected one of {', '.join(TASKS)}, so no gate can judge it"]
    reasons = [
        f"evaluation.{key} is missing or not a number"
        for key in EVALUATION_FIELDS[task]
        if _number(evaluation.get(key)) is None
    ]
    judge = _classification_reasons if task == "classification" else _regression_reasons
    return reasons + judge(evaluation, gates, path)


def _champion_bound(
    evaluation: Mapping[str, Any], compared: str, bound: str, reasons: list[str]
) -> tuple[str, float] | None:
    """('champion version N', the bound of the paired interval judged against it) when the evaluation compared
    with a champion (it has the champion's `compared` metric); None without one, or (a reason added) without
    the bound."""
    if evaluation.get("champion_version") is None and evaluation.get(compared) is None:
        return None
    champion = f"champion version {evaluation.get('champion_version')}"
    value = _number(evaluation.get(bound))
    if value is None:
        reasons.append(f"evaluation.{bound} is missing or not a number: no paired comparison with the {champion}")
        return None
    return champion, value


def _at(evaluation: Mapping[str, Any]) -> str:
    level = _number(evaluation.get("confidence"))
    return f" at {level:.0%}" if level is not None else ""


def _classification_reasons(evaluation: Mapping[str, Any], gates: Mapping[str, Any], path: GatePaths) -> list[str]:
    """Enough positives, AUC, Brier skill, and non-inferior AUC to the champion."""
    reasons = []
    positives = _number(evaluation.get("positives"))
    min_positives = int(gates.get("min_positives", 100))
    if positives is not None and positives < min_positives:
        reasons.append(
            f"holdout positives {positives:.0f} < {min_positives} ({path('min_positives')}): too few to judge the model"
        )
    auc = _number(evaluation.get("auc"))
    min_auc = float(gates.get("min_auc", 0.75))
    if auc is not None and auc < min_auc:
        reasons.append(f"AUC {auc:.4f} < {min_auc:g} ({path('min_auc')})")
    skill = _number(evaluation.get("brier_skill"))
    min_skill = float(gates.get("min_brier_skill", 0.05))
    if skill is not None and skill < min_skill:
        shown = round(skill, 3) + 0.0  # no "-0.000" for a base-rate model's float noise
        reasons.append(f"Brier skill {shown:.3f} < {min_skill:g} ({path('min_brier_skill')})")
    compared = _champion_bound(evaluation, "champion_auc", "auc_delta_low", reasons)
    margin = float(gates.get("max_auc_drop", 0.01))
    if compared is not None and compared[1] <= -margin:
        champion, low = compared
        reasons.append(
            f"AUC minus the {champion}'s: lower bound {low:.4f}{_at(evaluation)} <= -{margin:g} "
            f"({path('max_auc_drop')}): not shown to be non-inferior"
        )
    return reasons


def _regression_reasons(evaluation: Mapping[str, Any], gates: Mapping[str, Any], path: GatePaths) -> list[str]:
    """Enough holdout rows, RMSE, R², and RMSE non-inferior to the champion's."""
    reasons = []
    rows = _number(evaluation.get("rows"))
    min_rows = int(gates.get("min_holdout_rows", 200))
    if rows is not None and rows < min_rows:
        reasons.append(f"holdout rows {rows:.0f} < {min_rows} ({path('min_holdout_rows')}): too few to judge the model")
    rmse = _number(evaluation.get("rmse"))
    max_rmse = _number(gates.get("max_rmse"))
    if max_rmse is None:
        reasons.append(
            f"no max_rmse gate to judge a regressor by: set {path.own('max_rmse')} "
            "(the most holdout RMSE a release may have, in the label's unit)"
        )
    elif rmse is not None and rmse > max_rmse:
        reasons.append(f"RMSE {rmse:.4f} > {max_rmse:g} ({path('max_rmse')})")
    r2 = _number(evaluation.get("r2"))
    min_r2 = float(gates.get("min_r2", 0.1))
    if r2 is not None and r2 < min_r2:
        reasons.append(f"R² {round(r2, 3) + 0.0:.3f} < {min_r2:g} ({path('min_r2')})")
    compared = _champion_bound(evaluation, "champion_rmse", "rmse_ratio_high", reasons)
    margin = float(gates.get("max_rmse_increase", 0.02))
    if compared is not None and compared[1] >= margin:
        champion, high = compared
        reasons.append(
            f"RMSE increase over the {champion}'s: upper bound {high:.4f}{_at(evaluation)} >= {margin:g} "
            f"({path('max_rmse_increase')}): not shown to be non-inferior"
        )
    return reasons
