"""Schema gate: required columns, types, missing values, ranges and categories of a model's data contract.

Runs before anything learns from or is judged on a data set, so a broken upstream job (a column
dropped, numbers shipped as strings, sentinel values out of range) stops the pipeline with a
message that names the column, instead of a model quietly training on garbage.

`validate_batch` judges one incoming batch of labelled events on its own, before it is stored
(`loopform.ingest`): this gate's structure checks, ids already stored, and against the store's
reference window one-class labels, label shift, drift and OOD. Each failure is one line with its
number and threshold, e.g. "missing share of amount 0.200 > 0.05 (gates.max_missing_share)".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from loopform.contract import Contract, Feature
from loopform.gates.result import GateResult, json_safe
from loopform.spec import GatesSpec


def _dtype_problem(series: pd.Series, feature: Feature) -> str | None:
    """Why this column's storage type does not fit the feature, or None."""
    dtype = series.dtype
    if feature.kind == "categorical":
        if isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(dtype):
            values = series.cat.categories if isinstance(dtype, pd.CategoricalDtype) else series
            inferred = pd.api.types.infer_dtype(values, skipna=True)
            if inferred in ("string", "empty"):
                return None
            return f"holds {inferred} values, expected strings"
        return f"has dtype {dtype}, expected strings"
    if pd.api.types.is_bool_dtype(dtype) or not pd.api.types.is_numeric_dtype(dtype):
        example = series.dropna().iloc[0] if series.notna().any() else None
        return f"has dtype {dtype}, expected {feature.dtype}" + (f" (e.g. {example!r})" if example is not None else "")
    if feature.dtype == "int64" and pd.api.types.is_float_dtype(dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = values[np.isfinite(values)]
        if finite.size and not np.array_equal(finite, np.floor(finite)):
            return f"has fractional values, expected integers ({feature.dtype})"
    return None


def _out_of_range_share(series: pd.Series, feature: Feature, missing: int) -> tuple[float, int]:
    """Share (and count) of present values outside the feature's range or category list (`missing`: how many
    values are missing, counted once for the missing share; no copy of the present values is made)."""
    present = len(series) - missing
    if present == 0:
        return 0.0, 0
    if feature.kind == "categorical":
        inside = int(np.count_nonzero(series.isin(feature.categories or ()).to_numpy()))  # missing is never inside
    else:
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        low = -np.inf if feature.min is None else feature.min
        high = np.inf if feature.max is None else feature.max
        inside = int(np.count_nonzero((values >= low) & (values <= high)))  # NaN is not inside; inf counts as bad
    bad = present - inside
    return bad / present, bad


def _label_problem(label: pd.Series, contract: Contract) -> str | None:
    """Why the label column does not fit the contract's task, or None: 0/1 for a classifier, numbers in
    label_range for a regressor."""
    low, high = contract.label_range or (0, 1)
    if not pd.api.types.is_numeric_dtype(label.dtype) or pd.api.types.is_bool_dtype(label.dtype):
        expected = "0/1 integers" if contract.classification else f"numbers in its range [{low:g}, {high:g}]"
        return f"has dtype {label.dtype}, expected {expected}"
    values = label.dropna()
    if contract.classification:
        if not values.isin([0, 1]).all():
            return f"holds values other than 0/1: {sorted(set(values.unique()) - {0, 1})[:5]}"
        return None
    numbers = values.to_numpy(dtype=np.float64)
    outside = int(np.count_nonzero(~((numbers >= low) & (numbers <= high))))
    if outside:
        return f"has {outside} values outside its range [{low:g}, {high:g}] (e.g. {_examples(values[~values.between(low, high)])})"
    return None


@dataclass
class TableFacts:
    """What the validation gate decides on, measured over a whole data set: pandas measures it in memory
    (`table_facts`), `loopform.gates.out_of_core` with DuckDB aggregates over Parquet. One decision for both
    (`validation_result`)."""

    rows: int
    columns: list[str]
    type_errors: dict[str, str]
    """column -> why its type does not fit the contract (entity, timestamp, features, label)."""
    missing_count: dict[str, int]
    """Missing values (null, NaN) of each checked column present: the event id and the required columns."""
    out_of_range_count: dict[str, int]
    """Present values outside the range or categories of each feature present with a fitting type."""
    label_summary: dict[str, float] = field(default_factory=dict)
    """label_rate (classifier) or label_mean (regressor) over the labelled rows, when the label fits."""
    duplicate_ids: int | None = None
    """Rows whose event id repeats an earlier row's (None: no event id column)."""


def validate_data(
    df: pd.DataFrame,
    gates: GatesSpec,
    contract: Contract,
    *,
    require_label: bool = False,
) -> GateResult:
    """Check a data set against the model's contract and the gates' missing/out-of-range limits.

    Required: the entity (integers), the event time (timezone-aware datetimes), every feature, and
    the label when require_label (0/1 for a classifier, inside label_range for a regressor). Fails on
    a missing column, a wrong type, any column with more than gates.max_missing_share missing, any
    feature with more than gates.max_out_of_range_share of its present values outside its range or
    category list, or duplicate event ids.
    """
    if len(df) == 0:
        return validation_result(TableFacts(0, [str(c) for c in df.columns], {}, {}, {}), gates, contract)
    return validation_result(table_facts(df, contract, require_label=require_label), gates, contract, require_label)


def required_columns(contract: Contract, require_label: bool) -> list[str]:
    """The columns a data set must have: entity, event time, every feature, and the label when required."""
    features = [f.name for f in contract.features]
    return [contract.entity, contract.timestamp, *features] + ([contract.label] if require_label else [])


def table_facts(df: pd.DataFrame, contract: Contract, *, require_label: bool = False) -> TableFacts:
    """The validation gate's measurements of an in-memory data set."""
    entity, timestamp, event_id, label = contract.entity, contract.timestamp, contract.id, contract.label
    required = required_columns(contract, require_label)
    facts = TableFacts(len(df), [str(c) for c in df.columns], {}, {}, {})
    type_errors = facts.type_errors
    if entity in df.columns and not (
        pd.api.types.is_integer_dtype(df[entity].dtype) and not pd.api.types.is_bool_dtype(df[entity].dtype)
    ):
        type_errors[entity] = f"has dtype {df[entity].dtype}, expected int64 ids"
    if timestamp in df.columns:
        dtype = df[timestamp].dtype
        if not isinstance(dtype, pd.DatetimeTZDtype):
            type_errors[timestamp] = f"has dtype {dtype}, expected timezone-aware datetimes (UTC)"
    for feature in contract.features:
        if feature.name in df.columns:
            problem = _dtype_problem(df[feature.name], feature)
            if problem:
                type_errors[feature.name] = problem
    if label in df.columns:
        problem = _label_problem(df[label], contract)
        if problem:
            type_errors[label] = problem
        elif df[label].notna().any():
            facts.label_summary["label_rate" if contract.classification else "label_mean"] = float(df[label].mean())

    checked = [c for c in (event_id, *required) if c in df.columns]
    facts.missing_count.update({c: int(np.count_nonzero(df[c].isna().to_numpy())) for c in checked})
    for feature in contract.features:
        if feature.name in df.columns and feature.name not in type_errors:
            facts.out_of_range_count[feature.name] = _out_of_range_share(
                df[feature.name], feature, facts.missing_count[feature.name]
            )[1]
    if event_id in df.columns:
        facts.duplicate_ids = int(df[event_id].duplicated().sum())
    return facts


def validation_result(
    facts: TableFacts, gates: GatesSpec, contract: Contract, require_label: bool = False
) -> GateResult:
    """The validation gate's decision, metrics and failure lines from a data set's measurements."""
    failures: list[str] = []
    rows = facts.rows
    metrics: dict[str, Any] = {"rows": rows, "columns": list(facts.columns)}
    if rows == 0:
        return GateResult("validation", False, metrics, ["data set is empty"])

    missing_columns = [c for c in required_columns(contract, require_label) if c not in facts.columns]
    metrics["missing_columns"] = missing_columns
    failures += [f"missing column {c!r}" for c in missing_columns]

    metrics.update(facts.label_summary)
    metrics["type_errors"] = dict(facts.type_errors)
    failures += [f"column {c!r} {problem}" for c, problem in facts.type_errors.items()]

    missing_share = {c: count / rows for c, count in facts.missing_count.items()}
    metrics["missing_share"] = missing_share
    metrics["worst_missing_share"] = max(missing_share.values(), default=0.0)
    for column, share in missing_share.items():
        if share > gates.max_missing_share:
            failures.append(
                f"column {column!r} has {share:.2%} missing values, above gates.max_missing_share="
                f"{gates.max_missing_share}"
            )

    out_of_range: dict[str, float] = {}
    out_of_range_count: dict[str, int] = {}
    for feature in contract.features:
        if feature.name not in facts.out_of_range_count:
            continue
        count = facts.out_of_range_count[feature.name]
        present = rows - facts.missing_count[feature.name]
        share = count / present if present else 0.0
        out_of_range[feature.name] = share
        out_of_range_count[feature.name] = count
        if share > gates.max_out_of_range_share:
            allowed = (
                f"categories {', '.join(feature.categories or ())}"
                if feature.kind == "categorical"
                else f"range [{feature.min:g}, {feature.max:g}]"
            )
            failures.append(
                f"column {feature.name!r} has {share:.2%} of values ({count}) outside its {allowed}, above "
                f"gates.max_out_of_range_share={gates.max_out_of_range_share}"
            )
    metrics["out_of_range_share"] = out_of_range
    metrics["out_of_range_count"] = out_of_range_count
    metrics["worst_out_of_range_share"] = max(out_of_range.values(), default=0.0)

    if facts.duplicate_ids is not None:
        metrics["duplicate_ids"] = facts.duplicate_ids
        if facts.duplicate_ids:
            failures.append(f"column {contract.id!r} has {facts.duplicate_ids} duplicate event ids")
    return GateResult("validation", not failures, metrics, failures)


# --- one incoming batch, on its own ------------------------------------------------------------------

#: Fewest reference rows the checks against the reference need; below it a batch gets structural checks only.
MIN_REFERENCE_ROWS = 1000
#: Fewest days of reference the label dispersion is estimated from (else labels count as independent rows).
MIN_DISPERSION_DAYS = 7
EXAMPLES = 5


@dataclass
class Check:
    """One check of a batch: passed or not, its numbers, and each failure as one line with number and threshold."""

    name: str
    passed: bool
    failures: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    against_reference: bool = False
    """A comparison with the data already stored (label shift, drift, OOD): a shift of the world fails it as a
    broken batch does, so `accept_shift` may waive it (recorded); structural checks are never waived."""
    skipped: str | None = None
    """Why the check did not run (no reference, too few rows, columns it needs are broken)."""

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "name": self.name,
                "passed": self.passed,
                "failures": self.failures,
                "metrics": self.metrics,
                "against_reference": self.against_reference,
                "skipped": self.skipped,
            }
        )


@dataclass
class BatchReport:
    """Every check of one incoming batch; the batch is admitted only when `passed`."""

    batch_id: str
    rows: int
    checks: list[Check]
    reference: dict[str, Any] | None
    """rows, start and end of the reference window; None: no reference, structural checks only."""
    accept_shift: str | None = None
    """Why failed checks against the reference may pass (an operator's or a retraining trigger's decision)."""
    reference_rows: int = 0
    """Rows of the store's reference window, also when too few to be a reference."""

    def waived(self, check: Check) -> bool:
        return not check.passed and check.against_reference and self.accept_shift is not None

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed and not self.waived(c)]

    @property
    def accepted(self) -> list[Check]:
        return [c for c in self.checks if self.waived(c)]

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def structural_only(self) -> bool:
        return self.reference is None

    def failure_lines(self) -> list[str]:
        """`check: failure` for each failed check, with its number and threshold."""
        return [f"{c.name}: {failure}" for c in self.failed for failure in c.failures]

    def accepted_lines(self) -> list[str]:
        return [f"{c.name}: {failure}" for c in self.accepted for failure in c.failures]

    def scope(self) -> str:
        """What the checks compared the batch with, in one line."""
        if self.reference is None:
            held = "is empty" if not self.reference_rows else f"holds {self.reference_rows} rows < {MIN_REFERENCE_ROWS}"
            return (
                f"no reference (the offline store {held}): structural checks only (schema, types, missing values, "
                "ranges, ids); label shift, drift and OOD checks start once it holds a reference"
            )
        ref = self.reference
        return f"checked against the reference: {ref['rows']} stored rows from {ref['start']} to {ref['end']}"

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "batch_id": self.batch_id,
                "rows": self.rows,
                "passed": self.passed,
                "structural_only": self.structural_only,
                "reference": self.reference,
                "accept_shift": self.accept_shift,
                "failed": [c.name for c in self.failed],
                "accepted": [c.name for c in self.accepted],
                "failures": self.failure_lines(),
                "checks": [c.to_dict() for c in self.checks],
            }
        )


def _examples(values: pd.Series) -> str:
    shown = [str(v) for v in values.drop_duplicates().head(EXAMPLES)]
    return ", ".join(shown) + (", ..." if values.nunique() > EXAMPLES else "")


def _allowed(feature: Feature) -> str:
    if feature.kind == "categorical":
        return f"categories {', '.join(feature.categories or ())}"
    return f"[{feature.min:g}, {feature.max:g}]"


def _structure_checks(batch: pd.DataFrame, gates: GatesSpec, contract: Contract) -> list[Check]:
    """Schema, types, missing values, ranges and duplicate ids: what the batch must be, whatever is stored."""
    result = validate_data(batch, gates, contract, require_label=True)
    metrics = result.metrics
    event_id, keys = contract.id, contract.keys
    absent = [c for c in keys if c not in batch.columns and c not in metrics["missing_columns"]]
    missing_columns = [*absent, *metrics["missing_columns"]]
    schema = Check("schema", not missing_columns, metrics={"missing_columns": missing_columns})
    if missing_columns:
        schema.failures.append(f"missing column(s) {', '.join(missing_columns)}")

    type_errors = dict(metrics["type_errors"])
    if event_id in batch.columns:
        inferred = pd.api.types.infer_dtype(batch[event_id], skipna=True)
        if inferred not in ("string", "empty"):
            type_errors[event_id] = f"holds {inferred} values, expected strings"
    types = Check("types", not type_errors, metrics={"type_errors": type_errors})
    types.failures += [f"column {c!r} {problem} (check the column types)" for c, problem in type_errors.items()]

    shares = dict(metrics["missing_share"])
    if event_id in batch.columns and event_id not in shares:
        shares[event_id] = float(batch[event_id].isna().mean())
    missing = Check("missing values", True, metrics={"missing_share": shares})
    for column, share in shares.items():
        if column in keys and share > 0:
            missing.failures.append(
                f"missing share of {column} {share:.3f} > 0 (every row needs its {', '.join(keys)})"
            )
        elif share > gates.max_missing_share:
            missing.failures.append(
                f"missing share of {column} {share:.3f} > {gates.max_missing_share} (gates.max_missing_share)"
            )
    missing.passed = not missing.failures

    counts = metrics["out_of_range_count"]
    out_of_range = Check("out-of-range values", True, metrics={"share": metrics["out_of_range_share"], "count": counts})
    for column, share in metrics["out_of_range_share"].items():
        if share > gates.max_out_of_range_share:
            out_of_range.failures.append(
                f"out-of-range share of {column} {share:.3f} > {gates.max_out_of_range_share} "
                f"(gates.max_out_of_range_share): {counts[column]} values outside {_allowed(contract.by_name[column])}"
            )
    out_of_range.passed = not out_of_range.failures

    duplicates = Check("duplicate ids", True, metrics={"duplicate_ids": 0})
    if event_id in batch.columns:
        repeated = batch[event_id][batch[event_id].duplicated(keep=False) & batch[event_id].notna()]
        count = int(batch[event_id].dropna().duplicated().sum())
        duplicates.metrics["duplicate_ids"] = count
        if count:
            duplicates.passed = False
            duplicates.failures.append(f"duplicate ids in the batch {count} > 0 (e.g. {_examples(repeated)})")
    return [schema, types, missing, out_of_range, duplicates]


def _conflict_check(batch: pd.DataFrame, stored: pd.DataFrame | None, contract: Contract) -> Check:
    """Ids already stored: a re-sent or corrected batch is a conflict to resolve, never a silent replacement."""
    event_id, label = contract.id, contract.label
    check = Check("conflicting ids", True, metrics={"conflicts": 0, "changed_labels": 0})
    if stored is None or event_id not in batch.columns or stored.empty:
        return check
    known = batch[batch[event_id].isin(stored[event_id])]
    if known.empty:
        return check
    changed = 0
    if label in batch.columns:
        pairs = known[[event_id, label]].merge(stored[[event_id, label]], on=event_id, suffixes=("", "_stored"))
        changed = int((pairs[label] != pairs[f"{label}_stored"]).sum())
    check.passed = False
    check.metrics.update(conflicts=len(known), changed_labels=changed, examples=known[event_id].head(EXAMPLES).tolist())
    check.failures.append(
        f"ids already in the offline store {len(known)} > 0 ({changed} with a different label; e.g. "
        f"{_examples(known[event_id])}): stored labels are never replaced, resolve the conflict upstream"
    )
    return check


def label_dispersion(reference: pd.DataFrame, contract: Contract) -> float:
    """How much more the reference's daily positive counts vary than independent rows would (>= 1).

    Fraud comes in episodes (a few transactions of one card minutes apart) and in bad days, so
    labels are not independent rows: a proportion test that assumes they are raises false alarms
    on clean days. Pearson's chi-square of the daily counts over its degrees of freedom is the
    variance inflation (quasi-binomial); the test then counts rows divided by it. 1 with fewer
    than MIN_DISPERSION_DAYS days or a one-class reference.
    """
    labels = reference[contract.label].dropna()
    rate = float(labels.mean()) if len(labels) else 0.0
    if not 0 < rate < 1:
        return 1.0
    days = reference.loc[labels.index, contract.timestamp].dt.floor("D")
    counts = labels.groupby(days).agg(["sum", "count"])
    if len(counts) < MIN_DISPERSION_DAYS:
        return 1.0
    expected = counts["count"] * rate
    chi_square = float((((counts["sum"] - expected) ** 2) / (expected * (1 - rate))).sum())
    return max(1.0, chi_square / (len(counts) - 1))


def _label_checks(batch: pd.DataFrame, reference: pd.DataFrame, gates: GatesSpec, contract: Contract) -> list[Check]:
    """The label checks of the contract's task (a classifier's class balance, a regressor's label distribution)."""
    if contract.classification:
        return _class_checks(batch, reference, gates, contract.label, label_dispersion(reference, contract))
    return _value_checks(batch, reference, gates, contract.label)


def _value_checks(batch: pd.DataFrame, reference: pd.DataFrame, gates: GatesSpec, label: str) -> list[Check]:
    """A regressor's labels: all equal where the reference varies is a broken labeller (never waived); a moved
    distribution (the calibrated test of `drift.regression_label_shift`) is a label shift."""
    from loopform.gates.drift import regression_label_shift

    values, known = batch[label].dropna(), reference[label].dropna()
    constant = Check("labels", True, metrics={"rows": len(values), "distinct": int(values.nunique())})
    if len(values) > 1 and values.nunique() == 1 and known.nunique() > 1:
        constant.passed = False
        constant.failures.append(
            f"distinct labels 1 of {len(values)} rows (all {values.iloc[0]:g}) where the reference has "
            f"{known.nunique()}: a batch of one value is a broken labeller"
        )
    moved = regression_label_shift(known, values, gates, label)
    metrics = {**moved.to_dict(), "mean": float(values.mean()), "reference_mean": float(known.mean())}
    shift = Check("label shift", not moved.drifted, metrics=metrics, against_reference=True)
    if moved.drifted:
        shift.failures.append(
            f"label mean {values.mean():.3g} vs reference {known.mean():.3g}: normed Wasserstein distance "
            f"{moved.score:.3g} >= {moved.effect_threshold:g} (gates.drift.feature_threshold), p {moved.p_value:.2g} "
            f"<= {moved.level:g} (gates.drift.label_shift_p_value)"
        )
    return [constant, shift]


def _class_checks(
    batch: pd.DataFrame, reference: pd.DataFrame, gates: GatesSpec, label: str, dispersion: float
) -> list[Check]:
    """One-class labels (never waived) and label shift, with the monitor's test (`drift.label_shift`: a
    two-sided Fisher exact test at gates.drift.label_shift_p_value) but refusing only a batch whose ratio
    reaches label_shift_ratio itself (data is refused, not a retraining started). Counts are divided by
    the reference's label dispersion (`label_dispersion`), so bursts of fraud that clean days have are
    not called a shift. A batch of one class that the same test finds implausible is a broken labeller,
    refused even when a shift is accepted.
    """
    from loopform.gates.drift import label_shift

    decided = label_shift(
        reference[label],
        batch[label],
        gates,
        label,
        dispersion=dispersion,
        decision_ratio=gates.drift.label_shift_ratio,
    )
    n, positives = decided.n_current, decided.positives_current
    rate, rate_ref = decided.current_rate, decided.reference_rate
    ratio = decided.ratio if decided.ratio is not None else 1.0
    metrics = {
        "rows": n,
        "positives": positives,
        "rate": rate,
        "reference_rows": decided.n_reference,
        "reference_positives": decided.positives_reference,
        "reference_rate": rate_ref,
        "ratio": ratio,
        "dispersion": dispersion,
        "p_value": decided.p_value,
        "label_shift_ratio": decided.label_shift_ratio,
        "decision_ratio": decided.decision_ratio,
        "label_shift_p_value": decided.p_value_threshold,
    }
    test = (
        f"Fisher exact p {decided.p_value:.2g} < {decided.p_value_threshold} (gates.drift.label_shift_p_value; "
        f"dispersion {dispersion:.2f})"
    )
    one_class = Check("labels", True, metrics=dict(metrics))
    for name, count in (("positive", positives), ("negative", n - positives)):
        if count == 0 and decided.shifted:
            one_class.passed = False
            one_class.failures.append(
                f"{name} labels 0 of {n} > 0 expected at the reference rate {rate_ref:.3f}, {test}: "
                "a batch of one class is a broken labeller"
            )
    shift = Check("label shift", True, metrics=metrics, against_reference=True)
    if decided.shifted:
        limit = decided.decision_ratio
        direction = f">= {limit:g}" if ratio >= limit else f"<= 1/{limit:g}"
        shift.passed = False
        shift.failures.append(
            f"positive rate {rate:.3f} vs reference {rate_ref:.3f}: ratio {ratio:.2f} {direction} "
            f"(gates.drift.label_shift_ratio), {test}"
        )
    return [one_class, shift]


def validate_batch(
    batch: pd.DataFrame,
    gates: GatesSpec,
    contract: Contract,
    *,
    reference: pd.DataFrame | None = None,
    stored: pd.DataFrame | None = None,
    accept_shift: str | None = None,
    min_drift_rows: int = 200,
    batch_id: str = "",
) -> BatchReport:
    """Every check of one incoming batch of the model's labelled events, judged on its own.

    reference: labelled rows already in the offline store (its newest training window); with fewer than
        MIN_REFERENCE_ROWS the batch gets structural checks only.
    stored: id and label of every stored row: ids already stored are a conflict.
    accept_shift: a reason to let failed checks against the reference (label shift, drift, OOD) pass; they
        stay in the report. Structural checks, conflicts and one-class labels are never waived.
    min_drift_rows: fewest batch rows drift is judged on (fewer are too noisy to compare distributions).
    """
    from loopform.gates.drift import drift_gate
    from loopform.gates.ood import ood_gate

    if len(batch) == 0:
        return BatchReport(batch_id, 0, [Check("schema", False, ["the batch has no rows"])], None, accept_shift)
    checks = _structure_checks(batch, gates, contract)
    checks.append(_conflict_check(batch, stored, contract))
    held = 0 if reference is None else len(reference)
    if held < MIN_REFERENCE_ROWS:
        why = f"skipped: no reference, the offline store's window holds {held} rows < {MIN_REFERENCE_ROWS}"
        for name in ("label shift", "drift", "ood"):
            checks.append(Check(name, True, against_reference=True, skipped=why))
        return BatchReport(batch_id, len(batch), checks, None, accept_shift, held)
    assert reference is not None

    stamps = reference[contract.timestamp]
    label = contract.label
    window = {"rows": len(reference), "start": str(stamps.min()), "end": str(stamps.max())}
    by_name = {c.name: c for c in checks}
    broken = set(by_name["schema"].metrics["missing_columns"]) | set(by_name["types"].metrics["type_errors"])
    if label in broken:
        skipped = f"skipped: column {label!r} is missing or not a label of the contract's task ({contract.task})"
        checks.append(Check("labels", True, skipped=skipped))
        checks.append(Check("label shift", True, against_reference=True, skipped=skipped))
    else:
        checks += _label_checks(batch, reference, gates, contract)

    broken_features = sorted(broken & set(contract.feature_names))
    if broken_features:
        skipped = f"skipped: column(s) {', '.join(broken_features)} missing or of the wrong type"
        checks.append(Check("drift", True, against_reference=True, skipped=skipped))
        checks.append(Check("ood", True, against_reference=True, skipped=skipped))
        return BatchReport(batch_id, len(batch), checks, window, accept_shift, len(reference))
    if len(batch) < min_drift_rows:
        skipped = f"skipped: {len(batch)} rows < {min_drift_rows} (monitoring.min_rows), too few to compare"
        checks.append(Check("drift", True, against_reference=True, skipped=skipped))
    else:
        drift = drift_gate(reference, batch, gates, contract, labels=False)
        checks.append(Check("drift", drift.passed, list(drift.failures), drift.metrics, against_reference=True))
    ood = ood_gate(reference, batch, gates, contract)
    checks.append(Check("ood", ood.passed, list(ood.failures), ood.metrics, against_reference=True))
    return BatchReport(batch_id, len(batch), checks, window, accept_shift, len(reference))
