"""Per-feature drift statistics with Evidently's decisions, at close to the cost of sorting the columns.

Evidently 0.7.23's DataDriftPreset needs about 200 s and 1.6 GB for 1,000,000 x 20 numeric columns;
sorting those columns takes about a second. This module computes the same statistics Evidently's
default method selection picks, with the same thresholds and comparisons, but from sorted arrays
and value counts, one column per thread (numpy's sort and ufuncs release the GIL). Evidently is
still used for the HTML report, only when one is asked for.

Evidently's default selection (evidently/legacy/calculations/stattests/registry.py,
`_get_default_stattest`), after NaN and +-inf are dropped from both sides; n_values counts the
distinct values of reference and current together:

    reference rows <= 1000: numeric   -> n_values <= 5 ? (chisquare if n_values > 2 else z) : ks
                            categorical -> chisquare if n_values > 2 else z
    reference rows  > 1000: numeric   -> n_values <= 5 ? jensenshannon : wasserstein
                            categorical -> jensenshannon

p-value methods (ks, chisquare, z) use `gates.drift.p_value` (ks drifts when p <= threshold,
chisquare and z when p < threshold); distance methods (wasserstein normed by the reference
standard deviation, floored at 0.001; Jensen-Shannon over value shares) use
`gates.drift.feature_threshold` and drift when score >= threshold. With the spec's defaults
these are exactly Evidently's default thresholds; the HTML report is given the same
thresholds per column so that both always agree.

The drift share is the share of these per-feature decisions (Evidently's ValueDrift metrics).
Evidently's own DriftedColumnsCount takes a legacy path that keeps +-inf in a column without
NaN, so on data with infinities its count can differ from its ValueDrift decisions; ours follows
ValueDrift. On data without infinities both agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from loopform.data import BY_NAME, FEATURE_NAMES, LABEL
from loopform.gates.result import GateResult
from loopform.spec import GatesSpec

Kind = Literal["numeric", "categorical"]

# Evidently's StatTest.name -> display_name (what its snapshots report as a ValueDrift's method).
METHOD_DISPLAY: dict[str, str] = {
    "ks": "K-S p_value",
    "chisquare": "chi-square p_value",
    "z": "Z-test p_value",
    "wasserstein": "Wasserstein distance (normed)",
    "jensenshannon": "Jensen-Shannon distance",
}
P_VALUE_METHODS = frozenset({"ks", "chisquare", "z"})
SMALL_REFERENCE_ROWS = 1000  # Evidently switches from tests to distances above this many reference rows
FEW_VALUES = 5  # numeric columns with at most this many distinct values are treated as discrete
_INTEGER_CARDINALITY_LIMIT = 10  # evidently.core.datasets.INTEGER_CARDINALITY_LIMIT


class DriftInputError(ValueError):
    """The data cannot be compared: a column is missing, empty, or of the wrong type."""


@dataclass(frozen=True)
class ColumnProfile:
    """What drift needs to know about one column of one side, reusable across comparisons."""

    column: str
    kind: Kind
    n: int  # values left after dropping NaN and +-inf
    sorted: np.ndarray | None  # numeric: the finite values, ascending
    keys: np.ndarray | None  # distinct values (categorical, or numeric with few distinct values)
    counts: np.ndarray | None
    n_unique: int  # exact when <= FEW_VALUES or categorical, else a lower bound > FEW_VALUES
    std: float  # numeric: population std (ddof=0), as numpy's np.std; 0 for categorical


@dataclass(frozen=True)
class Profile:
    """Column profiles of one data set (e.g. the training data, profiled once and reused by the monitor)."""

    rows: int
    columns: dict[str, ColumnProfile]


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's drift: the method Evidently would pick, its score, threshold and decision."""

    column: str
    kind: Kind
    method: str  # Evidently StatTest name: ks, chisquare, z, wasserstein, jensenshannon
    score: float
    threshold: float
    drifted: bool
    n_reference: int
    n_current: int

    @property
    def method_display(self) -> str:
        return METHOD_DISPLAY[self.method]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "method_display": self.method_display}


@dataclass(frozen=True)
class DriftStats:
    """All features' drift and the share of drifted features."""

    features: dict[str, FeatureDrift]
    rows_reference: int
    rows_current: int

    @property
    def drifted(self) -> list[str]:
        return [name for name, f in self.features.items() if f.drifted]

    @property
    def drift_share(self) -> float:
        return len(self.drifted) / len(self.features)

    def to_dict(self) -> dict[str, Any]:
        return {
            "drift_share": self.drift_share,
            "drifted_count": len(self.drifted),
            "drifted": self.drifted,
            "n_features": len(self.features),
            "rows_reference": self.rows_reference,
            "rows_current": self.rows_current,
            "features": {name: f.to_dict() for name, f in self.features.items()},
        }


# --- profiling -------------------------------------------------------------------------------------


def column_kind(column: str, series: pd.Series, kinds: Mapping[str, Kind] | None = None) -> Kind:
    """Kind of a column: given, from the schema (loopform.data.FEATURES), else inferred as Evidently does."""
    if kinds and column in kinds:
        return kinds[column]
    if column in BY_NAME:
        return BY_NAME[column].kind
    if column == LABEL:
        return "categorical"
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype):
        return "categorical"
    if pd.api.types.is_float_dtype(dtype):
        return "numeric"
    if pd.api.types.is_integer_dtype(dtype):
        return "categorical" if series.nunique() <= _INTEGER_CARDINALITY_LIMIT else "numeric"
    return "categorical"


def profile_column(series: pd.Series, column: str, kind: Kind, side: str = "reference") -> ColumnProfile:
    """Profile one column; NaN and +-inf are dropped first, as Evidently does."""
    if kind == "numeric":
        if not pd.api.types.is_numeric_dtype(series.dtype):
            raise DriftInputError(
                f"column {column!r} in {side} data should be numeric but has dtype {series.dtype} "
                f"(e.g. {series.dropna().iloc[0]!r})"
                if series.notna().any()
                else f"column {column!r} in {side} data should be numeric but has dtype {series.dtype}"
            )
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = np.isfinite(values)
        values = np.sort(values if finite.all() else values[finite])
        n = int(values.size)
        if n == 0:
            raise DriftInputError(f"column {column!r} in {side} data has no values (all missing or infinite)")
        changes = np.flatnonzero(values[1:] != values[:-1])
        n_unique = int(changes.size) + 1
        keys = counts = None
        if n_unique <= FEW_VALUES:
            starts = np.concatenate(([0], changes + 1))
            keys, counts = values[starts], np.diff(np.concatenate((starts, [n])))
        return ColumnProfile(column, kind, n, values, keys, counts, n_unique, float(np.std(values)))
    clean = series.replace([np.inf, -np.inf], np.nan) if pd.api.types.is_float_dtype(series.dtype) else series
    counted = clean.value_counts(dropna=True, sort=False)
    counted = counted[counted > 0]  # unused categories of a Categorical
    n = int(counted.sum())
    if n == 0:
        raise DriftInputError(f"column {column!r} in {side} data has no values (all missing)")
    keys = np.asarray(counted.index.to_numpy(dtype=object))
    return ColumnProfile(column, kind, n, None, keys, counted.to_numpy(dtype=np.int64), int(keys.size), 0.0)


def profile(
    data: pd.DataFrame,
    columns: Sequence[str] = FEATURE_NAMES,
    *,
    kinds: Mapping[str, Kind] | None = None,
    side: str = "reference",
    workers: int | None = None,
) -> Profile:
    """Profile the given columns of a data set, one column per thread."""
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise DriftInputError(f"{side} data lacks column(s) {', '.join(map(repr, missing))}")
    if not columns:
        raise DriftInputError("no columns to compare")

    def one(column: str) -> ColumnProfile:
        series = data[column]
        return profile_column(series, column, column_kind(column, series, kinds), side)

    with ThreadPoolExecutor(_workers(workers, len(columns))) as pool:
        profiles = list(pool.map(one, columns))
    return Profile(len(data), {p.column: p for p in profiles})


def _workers(workers: int | None, n: int) -> int:
    return max(1, min(n, workers or os.cpu_count() or 1))


# --- the statistics ------------------------------------------------------------------------------


def _aligned(ref: ColumnProfile, cur: ColumnProfile) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Counts of reference and current over the union of their distinct values."""
    assert ref.keys is not None and ref.counts is not None and cur.keys is not None and cur.counts is not None
    ref_map = dict(zip(ref.keys.tolist(), ref.counts.tolist(), strict=True))
    cur_map = dict(zip(cur.keys.tolist(), cur.counts.tolist(), strict=True))
    keys = list(ref_map) + [k for k in cur_map if k not in ref_map]
    ref_counts = np.array([ref_map.get(k, 0) for k in keys], dtype=np.float64)
    cur_counts = np.array([cur_map.get(k, 0) for k in keys], dtype=np.float64)
    return ref_counts, cur_counts, keys


def _n_values(ref: ColumnProfile, cur: ColumnProfile) -> int:
    """Distinct values of both sides together, exact whenever it can matter (<= FEW_VALUES)."""
    if ref.kind == "categorical" or (ref.keys is not None and cur.keys is not None):
        return len(_aligned(ref, cur)[2])
    return max(ref.n_unique, cur.n_unique)  # > FEW_VALUES: one side alone already has more


def select_method(ref: ColumnProfile, cur: ColumnProfile) -> str:
    """Evidently 0.7.23's default stattest for this pair of columns."""
    n_values = _n_values(ref, cur)
    if ref.n <= SMALL_REFERENCE_ROWS:
        if ref.kind == "numeric" and n_values > FEW_VALUES:
            return "ks"
        return "chisquare" if n_values > 2 else "z"
    if ref.kind == "numeric" and n_values > FEW_VALUES:
        return "wasserstein"
    return "jensenshannon"


def wasserstein_sorted(u: np.ndarray, v: np.ndarray) -> float:
    """First Wasserstein distance of two sorted samples, in O(n + m) after sorting.

    Integrates |F_u^-1(t) - F_v^-1(t)| over t: the quantile functions are step functions with
    breaks at j/n and k/m, which on the integer grid L = n*m are j*m and k*n. Merging two sorted
    runs is linear (timsort), so no binary searches are needed. Equal to scipy's CDF form.
    """
    n, m = u.size, v.size
    if n == m:  # every piece has width 1/n: the mean distance of matched order statistics
        diff = u - v
        return float(np.abs(diff, out=diff).sum() / n)
    total = n * m
    breaks = np.empty(n + m - 1, dtype=np.int64)
    np.multiply(np.arange(n, dtype=np.int64), m, out=breaks[:n])
    np.multiply(np.arange(1, m, dtype=np.int64), n, out=breaks[n:])
    breaks.sort(kind="stable")  # two sorted runs: one linear merge
    widths = np.diff(breaks, append=total).astype(np.float64)
    diff = u[breaks // m]
    diff -= v[breaks // n]
    np.abs(diff, out=diff)
    # einsum, not BLAS dot: no thread pool to wake while the column threads are busy.
    return float(np.einsum("i,i->", widths, diff) / total)


def _z_test(ref: ColumnProfile, cur: ColumnProfile) -> float:
    """Evidently's two-proportion z-test (evidently ... stattests/z_stattest.py)."""
    from scipy.stats import norm

    ref_counts, cur_counts, keys = _aligned(ref, cur)
    if len(keys) == 1:  # both sides hold the same single value
        return 1.0
    try:
        first = keys.index(sorted(keys)[0])
    except TypeError:  # unorderable mix; the two-sided p-value does not depend on which key is first
        first = 0
    n1, n2 = ref.n, cur.n
    p1 = float(n1 - ref_counts[first]) / n1
    p2 = float(n2 - cur_counts[first]) / n2
    pooled = float(p1 * n1 + p2 * n2) / (n1 + n2)
    z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1.0 / n1 + 1.0 / n2))
    return float(2 * (1 - norm.cdf(np.abs(z))))


def _chisquare(ref: ColumnProfile, cur: ColumnProfile) -> float:
    from scipy.stats import chisquare

    ref_counts, cur_counts, _ = _aligned(ref, cur)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(chisquare(cur_counts, ref_counts * (cur.n / ref.n))[1])


def _jensenshannon(ref: ColumnProfile, cur: ColumnProfile) -> float:
    from scipy.spatial import distance

    ref_counts, cur_counts, _ = _aligned(ref, cur)
    return float(distance.jensenshannon(ref_counts / ref.n, cur_counts / cur.n))


def compare(ref: ColumnProfile, cur: ColumnProfile, gates: GatesSpec) -> FeatureDrift:
    """Drift of one column, with Evidently's method, score and comparison."""
    if ref.kind != cur.kind:
        raise DriftInputError(f"column {ref.column!r} is {ref.kind} in reference but {cur.kind} in current")
    method = select_method(ref, cur)
    threshold = gates.drift.p_value if method in P_VALUE_METHODS else gates.drift.feature_threshold
    if method == "ks":
        from scipy.stats import ks_2samp

        score = float(ks_2samp(ref.sorted, cur.sorted)[1])
        drifted = score <= threshold
    elif method == "chisquare":
        score = _chisquare(ref, cur)
        drifted = score < threshold
    elif method == "z":
        score = _z_test(ref, cur)
        drifted = score < threshold
    elif method == "wasserstein":
        assert ref.sorted is not None and cur.sorted is not None
        score = wasserstein_sorted(ref.sorted, cur.sorted) / max(ref.std, 0.001)
        drifted = score >= threshold
    else:
        score = _jensenshannon(ref, cur)
        drifted = score >= threshold
    return FeatureDrift(ref.column, ref.kind, method, score, float(threshold), bool(drifted), ref.n, cur.n)


def compute_drift(
    reference: pd.DataFrame | Profile,
    current: pd.DataFrame,
    columns: Sequence[str] = FEATURE_NAMES,
    gates: GatesSpec | None = None,
    *,
    kinds: Mapping[str, Kind] | None = None,
    workers: int | None = None,
) -> DriftStats:
    """Per-feature drift of `current` against `reference` (a DataFrame, or a Profile made once).

    Raises DriftInputError when a column is missing, empty or of the wrong type.
    """
    gates = gates or GatesSpec()
    columns = list(columns)
    if isinstance(reference, Profile):
        absent = [c for c in columns if c not in reference.columns]
        if absent:
            raise DriftInputError(f"reference profile lacks column(s) {', '.join(map(repr, absent))}")
        kinds = {**{c: reference.columns[c].kind for c in columns}, **(kinds or {})}
    else:
        missing = [c for c in columns if c not in reference.columns]
        if missing:
            raise DriftInputError(f"reference data lacks column(s) {', '.join(map(repr, missing))}")
        kinds = {**{c: column_kind(c, reference[c], kinds) for c in columns}, **(kinds or {})}
    missing = [c for c in columns if c not in current.columns]
    if missing:
        raise DriftInputError(f"current data lacks column(s) {', '.join(map(repr, missing))}")

    def one(column: str) -> FeatureDrift:
        kind = kinds[column]
        ref = (
            reference.columns[column]
            if isinstance(reference, Profile)
            else profile_column(reference[column], column, kind, "reference")
        )
        cur = profile_column(current[column], column, kind, "current")
        return compare(ref, cur, gates)

    with ThreadPoolExecutor(_workers(workers, len(columns))) as pool:
        results = list(pool.map(one, columns))
    rows_reference = reference.rows if isinstance(reference, Profile) else len(reference)
    return DriftStats({r.column: r for r in results}, rows_reference, len(current))


# --- the gate ------------------------------------------------------------------------------------


def drift_gate(
    reference: pd.DataFrame | Profile,
    current: pd.DataFrame,
    gates: GatesSpec,
    report_path: Path | None = None,
    *,
    columns: Sequence[str] = FEATURE_NAMES,
    label: str | None = LABEL,
    workers: int | None = None,
) -> GateResult:
    """Fail when more than gates.drift.max_drift_share of the features drift, or the label rate drifts.

    The label is compared only when both sides carry it (training data, labelled feedback); its
    drift is label (prior) shift, which moves the model's calibration and operating threshold even
    when few features drift. With report_path, Evidently writes its HTML report for the same
    features with the same thresholds; metrics.report_agrees records whether its decisions match.
    """
    max_share = gates.drift.max_drift_share
    try:
        stats = compute_drift(reference, current, columns, gates, workers=workers)
    except DriftInputError as error:
        metrics = {"drift_share": None, "max_drift_share": max_share, "rows_current": len(current)}
        return GateResult("drift", False, metrics, [f"cannot compute drift: {error}"])
    metrics: dict[str, Any] = {**stats.to_dict(), "max_drift_share": max_share, "label": None}
    failures: list[str] = []
    if stats.drift_share > max_share:
        detail = ", ".join(f"{n} ({stats.features[n].method}={stats.features[n].score:.3g})" for n in stats.drifted)
        failures.append(
            f"drift share {stats.drift_share:.3f} ({len(stats.drifted)} of {len(stats.features)} features: {detail}) "
            f"is above gates.drift.max_drift_share={max_share}"
        )
    if label is not None and label in current.columns and label in reference.columns:
        try:
            label_drift = compute_drift(reference, current, [label], gates, kinds={label: "categorical"}).features[
                label
            ]
        except DriftInputError as error:
            failures.append(f"cannot compare label {label!r}: {error}")
        else:
            metrics["label"] = label_drift.to_dict()
            if label_drift.drifted:
                failures.append(
                    f"label {label!r} drifted ({label_drift.method}={label_drift.score:.3g}, "
                    f"threshold {label_drift.threshold}): the class balance moved (label shift)"
                )
    report = None
    if report_path is not None:
        if isinstance(reference, Profile):
            raise ValueError("an HTML report needs the reference DataFrame, not a Profile")
        mismatches = write_report(reference, current, stats, gates, Path(report_path))
        metrics["report_agrees"] = not mismatches
        metrics["report_mismatches"] = mismatches
        report = str(report_path)
    return GateResult("drift", not failures, metrics, failures, report)


def write_report(
    reference: pd.DataFrame, current: pd.DataFrame, stats: DriftStats, gates: GatesSpec, path: Path
) -> list[str]:
    """Evidently's DataDriftPreset HTML report for the same columns, kinds and thresholds.

    Returns the features whose Evidently method or decision differs from `stats` (expected: none).
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    columns = list(stats.features)
    numeric = [c for c in columns if stats.features[c].kind == "numeric"]
    categorical = [c for c in columns if stats.features[c].kind == "categorical"]
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    preset = DataDriftPreset(
        columns=columns,
        drift_share=gates.drift.max_drift_share,
        per_column_threshold={c: f.threshold for c, f in stats.features.items()},
    )
    snapshot = Report([preset]).run(
        Dataset.from_pandas(current[columns], data_definition=definition),
        Dataset.from_pandas(reference[columns], data_definition=definition),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(path))
    return _mismatches(evidently_decisions(snapshot.dict()), stats)


def evidently_decisions(snapshot: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per column from an Evidently snapshot dict: method (StatTest name), score, threshold, drifted."""
    by_display = {v: k for k, v in METHOD_DISPLAY.items()}
    decisions: dict[str, dict[str, Any]] = {}
    for metric in snapshot["metrics"]:
        config = metric.get("config", {})
        if not str(config.get("type", "")).endswith(":ValueDrift"):
            continue
        method = by_display.get(config["method"], config["method"])
        score, threshold = float(metric["value"]), float(config["threshold"])
        drifted = (
            (score <= threshold if method == "ks" else score < threshold)
            if method in P_VALUE_METHODS
            else (score >= threshold)
        )
        decisions[config["column"]] = {"method": method, "score": score, "threshold": threshold, "drifted": drifted}
    return decisions


def _mismatches(decisions: Mapping[str, Mapping[str, Any]], stats: DriftStats) -> list[str]:
    problems = []
    for name, ours in stats.features.items():
        theirs = decisions.get(name)
        if theirs is None:
            problems.append(f"{name}: not in the Evidently report")
        elif theirs["method"] != ours.method or theirs["drifted"] != ours.drifted:
            problems.append(
                f"{name}: evidently {theirs['method']}={theirs['score']:.6g} drifted={theirs['drifted']}, "
                f"loopform {ours.method}={ours.score:.6g} drifted={ours.drifted}"
            )
    return problems
