"""Per-feature drift statistics with Evidently's decisions, at close to the cost of sorting the columns.

Evidently 0.7.23's DataDriftPreset needs about 200 s and 1.6 GB for 1,000,000 x 20 numeric columns;
sorting those columns takes about a second. This module computes the same statistics Evidently's
default method selection picks, with the same thresholds and comparisons, but from sorted arrays
and value counts, one column per thread (numpy's sort and ufuncs release the GIL). Evidently is
not run here: tests/test_gates.py and bench/drift.py check that its decisions equal these.

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
these are exactly Evidently's default thresholds. The HTML report (loopform.gates.report) shows
these statistics and draws the distributions from the same sorted columns: Evidently's own report
would compute everything again on the full data (10-150x the statistics).

The drift share is the share of these per-feature decisions (Evidently's ValueDrift metrics).
Evidently's own DriftedColumnsCount takes a legacy path that keeps +-inf in a column without
NaN, so on data with infinities its count can differ from its ValueDrift decisions; ours follows
ValueDrift. On data without infinities both agree.

Those fixed thresholds ignore the current window's sampling noise: on clean traffic a normed
Wasserstein distance of 0.1 is routine at 200 rows and rare at 5,000. So the decision that gates
and triggers retraining is calibrated to the window's size (`compute_drift(..., calibrate=True)`,
which `drift_gate` and the monitor use); Evidently's statistics and decisions stay in every result
(`features[...]`, `evidently`) and in the HTML report, for people.

The calibrated decision, per feature: the distance Evidently uses above 1000 reference rows
(normed Wasserstein, or Jensen-Shannon for categorical and few-valued columns), its p-value from a
bootstrap null (windows of the current window's own size drawn from the reference, scaled by
sqrt(1 + n/m) for the reference's own noise; simulated once per reference and window size and
cached), and "drifted" when p <= level and the distance is at least `gates.drift.feature_threshold`
(so large windows keep Evidently's effect size: a significant but tiny shift is not drift). The
window triggers when the share of drifted features exceeds `gates.drift.max_drift_share`, i.e. when
at least k of the p features drifted. With level = false_alarm_rate * k / p, Markov's inequality
bounds the chance that clean traffic triggers, whatever the dependence between features:

    P(at least k features drift) <= E[drifted features] / k <= p * level / k = false_alarm_rate.

The bound takes each feature's bootstrap p-value as valid, i.e. rows drawn independently. Traffic
clustered by card (a card's transactions share its traits) spreads more than that: on the
generator's traffic the per-feature rate of p <= level is about 3x nominal, yet clean windows
still trigger far below false_alarm_rate, because k features must drift together
(`bench/drift_null.py` prints both).

Label shift is a separate check (`label_shift`): a two-sided Fisher exact test of equal positive
rates at `gates.drift.label_shift_p_value`, firing when it rejects and the rate moved at least
halfway (geometrically) towards `gates.drift.label_shift_ratio`, up or down.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from loopform.gates.result import GateResult
from loopform.spec import GatesSpec

if TYPE_CHECKING:
    from loopform.contract import Contract

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
    calibrated: CalibratedDrift | None = None  # the window-size-aware decision, when asked for
    # (reference, current) column profiles, kept when asked for: the report draws from them.
    profiles: dict[str, tuple[ColumnProfile, ColumnProfile]] | None = field(default=None, repr=False, compare=False)

    @property
    def drifted(self) -> list[str]:
        """Features Evidently's fixed thresholds call drifted."""
        return [name for name, f in self.features.items() if f.drifted]

    @property
    def drift_share(self) -> float:
        """Evidently's drift share (fixed thresholds); the calibrated one is `calibrated.drift_share`."""
        return len(self.drifted) / len(self.features)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "drift_share": self.drift_share,
            "drifted_count": len(self.drifted),
            "drifted": self.drifted,
            "n_features": len(self.features),
            "rows_reference": self.rows_reference,
            "rows_current": self.rows_current,
            "features": {name: f.to_dict() for name, f in self.features.items()},
        }
        if self.calibrated is not None:
            out["calibrated"] = self.calibrated.to_dict()
        return out


@dataclass(frozen=True)
class CalibratedFeature:
    """One feature's calibrated decision: its distance against a bootstrap null at the window's size."""

    column: str
    statistic: str  # wasserstein (normed) | jensenshannon
    score: float
    p_value: float  # (1 + null draws >= score) / (draws + 1)
    null_threshold: float  # scores above this have p_value <= level at this window size (inf: never)
    effect_threshold: float  # gates.drift.feature_threshold: the least distance that counts as drift
    level: float
    drifted: bool  # p_value <= level and score >= effect_threshold
    n_reference: int
    n_current: int
    null_draws: int
    null_rows: int  # window size the null was simulated at (n_current, or CALIBRATION_MAX_ROWS above it)

    @property
    def threshold(self) -> float:
        """The distance this window must exceed: the larger of the null's and Evidently's thresholds."""
        return max(self.null_threshold, self.effect_threshold)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "threshold": self.threshold}


@dataclass(frozen=True)
class CalibratedDrift:
    """All features' calibrated decisions and the window's: retraining when more than max_drift_share drift."""

    features: dict[str, CalibratedFeature]
    false_alarm_rate: float
    max_drift_share: float
    features_needed: int  # k: this many drifted features exceed max_drift_share
    feature_level: float  # false_alarm_rate * k / p: each feature's significance level

    @property
    def drifted(self) -> list[str]:
        return [name for name, f in self.features.items() if f.drifted]

    @property
    def drift_share(self) -> float:
        return len(self.drifted) / len(self.features)

    @property
    def detected(self) -> bool:
        """The share exceeds gates.drift.max_drift_share: the decision that gates and triggers retraining."""
        return self.drift_share > self.max_drift_share

    @property
    def null_draws(self) -> int:
        return max((f.null_draws for f in self.features.values()), default=0)

    def rule(self) -> str:
        p = len(self.features)
        return (
            f"a feature drifts when its distance's bootstrap p-value at the window's size is <= "
            f"{self.feature_level:.3g} (= false_alarm_rate {self.false_alarm_rate} x {self.features_needed} / {p}) "
            f"and the distance is >= its effect threshold; the window drifts when more than "
            f"max_drift_share={self.max_drift_share} of the features drift (at least {self.features_needed} of {p}), "
            f"so clean traffic triggers with probability <= {self.false_alarm_rate}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "drift_share": self.drift_share,
            "drifted_count": len(self.drifted),
            "drifted": self.drifted,
            "detected": self.detected,
            "false_alarm_rate": self.false_alarm_rate,
            "max_drift_share": self.max_drift_share,
            "features_needed": self.features_needed,
            "feature_level": self.feature_level,
            "null_draws": self.null_draws,
            "rule": self.rule(),
            "features": {name: f.to_dict() for name, f in self.features.items()},
        }


@dataclass(frozen=True)
class LabelShift:
    """Positive rate of the current labels against the reference's, with a Fisher exact test."""

    column: str
    reference_rate: float
    current_rate: float
    ratio: float | None  # current / reference; None when the reference has no positives and neither has current
    p_value: float  # two-sided Fisher exact test of equal rates
    shifted: bool
    label_shift_ratio: float  # gates.drift.label_shift_ratio: the change this check exists to catch
    decision_ratio: float  # the observed ratio must reach it (or its inverse): sqrt(label_shift_ratio) by default
    p_value_threshold: float  # gates.drift.label_shift_p_value
    n_reference: int
    n_current: int
    positives_reference: int
    positives_current: int
    test: str = "Fisher exact, two-sided"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- profiling -------------------------------------------------------------------------------------


def column_kind(column: str, series: pd.Series, kinds: Mapping[str, Kind] | None = None) -> Kind:
    """Kind of a column: given (from the model's contract), else inferred as Evidently does."""
    if kinds and column in kinds:
        return kinds[column]
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype):
        return "categorical"
    if pd.api.types.is_float_dtype(dtype):
        return "numeric"
    if pd.api.types.is_integer_dtype(dtype):
        return "categorical" if series.nunique() <= _INTEGER_CARDINALITY_LIMIT else "numeric"
    return "categorical"


def numeric_profile(column: str, values: np.ndarray) -> ColumnProfile:
    """The profile of a numeric column from its finite values, sorted ascending (at least one)."""
    n = int(values.size)
    changes = np.flatnonzero(values[1:] != values[:-1])
    n_unique = int(changes.size) + 1
    keys = counts = None
    if n_unique <= FEW_VALUES:
        starts = np.concatenate(([0], changes + 1))
        keys, counts = values[starts], np.diff(np.concatenate((starts, [n])))
    return ColumnProfile(column, "numeric", n, values, keys, counts, n_unique, float(np.std(values)))


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
        if values.size == 0:
            raise DriftInputError(f"column {column!r} in {side} data has no values (all missing or infinite)")
        return numeric_profile(column, values)
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
    columns: Sequence[str],
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


def feature_decision(
    column: str, kind: Kind, method: str, score: float, gates: GatesSpec, n_reference: int, n_current: int
) -> FeatureDrift:
    """Evidently's threshold and comparison for a method's score (shared with `loopform.gates.out_of_core`)."""
    threshold = gates.drift.p_value if method in P_VALUE_METHODS else gates.drift.feature_threshold
    if method == "ks":
        drifted = score <= threshold
    elif method in P_VALUE_METHODS:
        drifted = score < threshold
    else:
        drifted = score >= threshold
    return FeatureDrift(column, kind, method, float(score), float(threshold), bool(drifted), n_reference, n_current)


def compare(ref: ColumnProfile, cur: ColumnProfile, gates: GatesSpec) -> FeatureDrift:
    """Drift of one column, with Evidently's method, score and comparison."""
    if ref.kind != cur.kind:
        raise DriftInputError(f"column {ref.column!r} is {ref.kind} in reference but {cur.kind} in current")
    method = select_method(ref, cur)
    if method == "ks":
        from scipy.stats import ks_2samp

        score = float(ks_2samp(ref.sorted, cur.sorted)[1])
    elif method in ("chisquare", "z", "jensenshannon"):
        score = counts_score(method, ref, cur)
    else:
        assert ref.sorted is not None and cur.sorted is not None
        score = wasserstein_sorted(ref.sorted, cur.sorted) / max(ref.std, 0.001)
    return feature_decision(ref.column, ref.kind, method, score, gates, ref.n, cur.n)


def counts_score(method: str, ref: ColumnProfile, cur: ColumnProfile) -> float:
    """The score of a method that reads only value counts (chisquare, z, jensenshannon)."""
    return {"chisquare": _chisquare, "z": _z_test, "jensenshannon": _jensenshannon}[method](ref, cur)


# --- the calibrated decision ------------------------------------------------------------------------

CALIBRATION_MAX_ROWS = 500
"""Windows up to this size get a null simulated at their own size. Larger windows reuse this size's
null, rescaled by the sqrt(1/n + 1/m) law both distances follow under no drift (a bootstrap at 500
rows rescaled to 1000 gives slightly larger thresholds than one at 1000: conservative)."""
NULL_TAIL = 5  # null draws at or beyond a feature's threshold, at least: sets the number of draws
MIN_NULL_DRAWS = 499
_DISCRETE_VALUES = 256  # numeric references with at most this many distinct values draw value counts
_CHUNK_WINDOWS = 64  # bootstrap windows per vectorised block (keeps the temporaries in cache)
_NULL_CACHE_SIZE = 512
_null_cache: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
_null_lock = threading.Lock()


def decision_rule(gates: GatesSpec, n_features: int) -> tuple[int, float]:
    """(k, level): k drifted features exceed max_drift_share; each feature is tested at level.

    level = false_alarm_rate * k / p bounds P(at least k of p features drift | no drift) by
    false_alarm_rate through Markov's inequality, whatever the dependence between features.
    """
    max_share = gates.drift.max_drift_share
    needed = next((k for k in range(1, n_features + 1) if k / n_features > max_share), n_features + 1)
    return needed, gates.drift.false_alarm_rate * min(needed, n_features) / max(n_features, 1)


def null_draws(level: float) -> int:
    """Bootstrap draws for a test at `level`: enough that NULL_TAIL of them lie beyond the threshold."""
    return max(MIN_NULL_DRAWS, math.ceil(NULL_TAIL / level - 1e-9) - 1)


def calibrated_statistic(ref: ColumnProfile, cur: ColumnProfile) -> str:
    """The distance of the calibrated decision: Evidently's large-reference choice, whatever the reference size."""
    if ref.kind == "numeric" and _n_values(ref, cur) > FEW_VALUES:
        return "wasserstein"
    return "jensenshannon"


def _distance(ref: ColumnProfile, cur: ColumnProfile, statistic: str) -> float:
    if statistic == "wasserstein":
        assert ref.sorted is not None and cur.sorted is not None
        return wasserstein_sorted(ref.sorted, cur.sorted) / max(ref.std, 0.001)
    return _jensenshannon(ref, cur)


def reference_digest(kind: Kind, n: int) -> Any:
    """The content hash of a reference column, before its contents: fed the sorted values (numeric, zeros
    as +0.0), in any number of pieces, or the keys and counts (categorical). Seeds and keys the column's null."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{kind}\x00{n}\x00".encode())
    return digest


def _digest(ref: ColumnProfile) -> bytes:
    """Content key of a reference column (the null depends on nothing else)."""
    digest = reference_digest(ref.kind, ref.n)
    if ref.sorted is not None:
        # The buffer itself, no copy, but zeros as +0.0: -0.0 sorts equal to it in an order no sort fixes.
        low, high = (int(np.searchsorted(ref.sorted, 0.0, side=side)) for side in ("left", "right"))
        digest.update(np.ascontiguousarray(ref.sorted[:low]))
        digest.update(np.zeros(high - low))
        digest.update(np.ascontiguousarray(ref.sorted[high:]))
    else:
        assert ref.keys is not None and ref.counts is not None
        digest.update(repr(ref.keys.tolist()).encode())
        digest.update(np.ascontiguousarray(ref.counts))
    return digest.digest()


def null_scores(ref: ColumnProfile, statistic: str, rows: int, draws: int) -> np.ndarray:
    """Ascending distances between `ref` and `draws` bootstrap windows of `rows` rows drawn from it.

    Cached per (reference content, statistic, rows, draws) and seeded by them, so the same window
    always gets the same decision. Read-only array.
    """

    def simulate(rng: np.random.Generator) -> np.ndarray:
        return (_null_wasserstein if statistic == "wasserstein" else _null_jensenshannon)(ref, rows, draws, rng)

    return cached_null(_digest(ref), statistic, rows, draws, simulate)


def cached_null(
    digest: bytes, statistic: str, rows: int, draws: int, simulate: Callable[[np.random.Generator], np.ndarray]
) -> np.ndarray:
    """`simulate`'s null, seeded by and cached under (reference digest, statistic, rows, draws)."""
    key = (digest, statistic, rows, draws)
    with _null_lock:
        found = _null_cache.get(key)
        if found is not None:
            _null_cache.move_to_end(key)
            return found
    scores = simulate(np.random.default_rng([int.from_bytes(digest[:8], "little"), rows, draws]))
    scores.sort()
    scores.flags.writeable = False
    with _null_lock:
        _null_cache[key] = scores
        while len(_null_cache) > _NULL_CACHE_SIZE:
            _null_cache.popitem(last=False)
    return scores


def _null_jensenshannon(ref: ColumnProfile, rows: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    assert ref.counts is not None
    return null_jensenshannon(ref.counts, rows, draws, rng)


def null_jensenshannon(counts: np.ndarray, rows: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Jensen-Shannon distances between the reference's value shares and bootstrap windows' (unsorted)."""
    from scipy.spatial import distance

    shares = counts / counts.sum()
    drawn = rng.multinomial(rows, shares, size=draws) / rows
    return np.asarray(distance.jensenshannon(np.broadcast_to(shares, drawn.shape), drawn, axis=1), dtype=np.float64)


def _null_wasserstein(ref: ColumnProfile, rows: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Normed W1 between the sorted reference and bootstrap windows drawn from it (`null_wasserstein_runs`
    when it has few distinct values, else `null_wasserstein_windows`)."""
    assert ref.sorted is not None
    r, m, norm = ref.sorted, ref.sorted.size, max(ref.std, 0.001)
    starts = np.concatenate(([0], np.flatnonzero(r[1:] != r[:-1]) + 1))
    counts = np.diff(np.concatenate((starts, [m])))
    if starts.size <= _DISCRETE_VALUES:
        return null_wasserstein_runs(r[starts], counts, norm, rows, draws, rng)
    upper = np.repeat(np.cumsum(counts), counts)  # reference values <= r[i]
    prefix = np.concatenate(([0.0], np.cumsum(r)))
    area = (upper * r - prefix[upper]) / m  # A(r[i])
    return null_wasserstein_windows(lambda at: (r[at], area[at]), m, norm, rows, draws, rng)


def null_wasserstein_runs(
    values: np.ndarray, counts: np.ndarray, norm: float, rows: int, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """Few distinct reference values (`values`, ascending, with `counts`): draw counts per value, W1 from the
    two CDFs."""
    m = int(counts.sum())
    cdf = np.cumsum(counts)[:-1] / m
    gaps = np.diff(values)
    drawn = np.cumsum(rng.multinomial(rows, counts / m, size=draws)[:, :-1], axis=1) / rows
    return np.einsum("ij,j->i", np.abs(drawn - cdf), gaps) / norm


def null_wasserstein_windows(
    lookup: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    m: int,
    norm: float,
    rows: int,
    draws: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Normed W1 between a sorted reference of `m` values and bootstrap windows, in O(rows) per window.

    `lookup(positions)` gives the sorted reference's values r[i] and A(r[i]) at those positions (any
    shape): every window's positions are drawn first, so a reference that does not fit in memory is read
    once for all of them (`loopform.gates.out_of_core`).

    A window of `rows` values drawn from the reference has an empirical CDF G that is constant (c_j =
    j/rows) between its sorted values x_j and x_j+1. On each such piece, |F - c_j| splits where the
    reference's CDF F crosses c_j, at a reference value q_j known in advance for each j, and integrates
    through A(x) = integral of F up to x, precomputed at every reference value:

        W1 = 2 sum_j h_j(y_j) - sum_j c_j (x_j + x_j+1) + 2 sum_i A(x_i) + max(r) - x_rows - A(max(r))

    with h_j(t) = c_j t - A(t) and y_j = clip(q_j, x_j, x_j+1): h_j(q_j) is a constant, the rest is linear.
    """
    j = np.arange(1, rows, dtype=np.int64)
    level = j / rows
    cross = (j * m + rows - 1) // rows - 1  # smallest reference position with F >= j / rows
    index_type = np.int32 if m < 2**31 else np.int64
    blocks = []
    for start in range(0, draws, _CHUNK_WINDOWS):
        index = rng.integers(0, m, (min(_CHUNK_WINDOWS, draws - start), rows), dtype=index_type)
        index.sort(axis=1)
        blocks.append(index)
    fixed = np.concatenate((cross, [m - 1]))
    values, areas = lookup(np.concatenate([fixed, *(b.ravel() for b in blocks)]))
    q, area_cross = values[: rows - 1], areas[: rows - 1]
    peak = level * q - area_cross  # h_j(q_j)
    weights = np.zeros(rows)
    weights[:-1] += level
    weights[1:] += level
    constant = values[rows - 1] - areas[rows - 1]
    out = np.empty(draws, dtype=np.float64)
    offset = rows
    for n, start in enumerate(range(0, draws, _CHUNK_WINDOWS)):
        k = blocks[n].shape[0]
        x = values[offset : offset + k * rows].reshape(k, rows)
        a = areas[offset : offset + k * rows].reshape(k, rows)
        offset += k * rows
        lo, hi = x[:, :-1], x[:, 1:]
        h = np.where(q < lo, level * lo - a[:, :-1], np.where(q > hi, level * hi - a[:, 1:], peak))
        linear = np.einsum("ij,j->i", x, weights)
        out[start : start + k] = 2 * h.sum(axis=1) - linear + 2 * a.sum(axis=1) - x[:, -1] + constant
    return out / norm


def calibrate_feature(
    ref: ColumnProfile,
    cur: ColumnProfile,
    gates: GatesSpec,
    *,
    level: float,
    draws: int | None = None,
    evidently: FeatureDrift | None = None,
) -> CalibratedFeature:
    """One feature's decision at the current window's own size (see the module docstring)."""
    statistic = calibrated_statistic(ref, cur)
    draws = draws or null_draws(level)
    if evidently is not None and evidently.method == statistic:
        score = evidently.score
    else:
        score = _distance(ref, cur, statistic)
    rows = null_rows(cur.n)
    scores = null_scores(ref, statistic, rows, draws)
    return calibrated_decision(ref.column, statistic, score, scores, ref.n, cur.n, gates, level)


def null_rows(n_current: int) -> int:
    """The window size a feature's null is simulated at."""
    return min(n_current, CALIBRATION_MAX_ROWS)


def calibrated_decision(
    column: str,
    statistic: str,
    score: float,
    scores: np.ndarray,
    n_reference: int,
    n_current: int,
    gates: GatesSpec,
    level: float,
) -> CalibratedFeature:
    """A feature's calibrated decision from its distance and its null's ascending `scores` (simulated at
    `null_rows(n_current)` rows): shared by the in-memory and out-of-core gates."""
    draws, rows = scores.size, null_rows(n_current)
    # The bootstrap's spread is that of a window of `rows` rows against a fixed reference; a clean
    # window of n rows against a reference of m rows spreads as sqrt(1/n + 1/m).
    scale = math.sqrt(rows * (1.0 / n_current + 1.0 / n_reference))
    exceed = int(draws - np.searchsorted(scores, score / scale, side="left"))
    allowed = math.floor(level * (draws + 1) * (1 + 1e-12)) - 1  # p <= level <=> at most this many exceed
    null_threshold = float(scores[draws - 1 - allowed] * scale) if allowed >= 0 else math.inf
    effect = float(gates.drift.feature_threshold)
    return CalibratedFeature(
        column=column,
        statistic=statistic,
        score=float(score),
        p_value=(1 + exceed) / (draws + 1),
        null_threshold=null_threshold,
        effect_threshold=effect,
        level=float(level),
        drifted=bool(exceed <= allowed and score >= effect),
        n_reference=n_reference,
        n_current=n_current,
        null_draws=draws,
        null_rows=rows,
    )


def _label_counts(labels: pd.Series | ColumnProfile, column: str, side: str) -> tuple[int, int]:
    """(positives, labelled rows) of a 0/1 label; missing labels are dropped."""
    if isinstance(labels, ColumnProfile):  # distinct labels and their counts (a stored or out-of-core profile)
        assert labels.keys is not None and labels.counts is not None
        values, counts = pd.Series(labels.keys), np.asarray(labels.counts, dtype=np.int64)
    else:
        values = labels.dropna()
        counts = np.ones(len(values), dtype=np.int64)
    if values.empty:
        raise DriftInputError(f"label {column!r} in {side} data has no values")
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any() or not numbers.isin([0, 1]).all():
        raise DriftInputError(f"label {column!r} in {side} data is not binary (0/1)")
    return int(counts[(numbers == 1).to_numpy()].sum()), int(counts.sum())


def label_shift(
    reference: pd.Series | ColumnProfile,
    current: pd.Series | ColumnProfile,
    gates: GatesSpec,
    column: str,
    *,
    dispersion: float = 1.0,
    decision_ratio: float | None = None,
) -> LabelShift:
    """Did the positive rate move by gates.drift.label_shift_ratio? Fisher's exact test on the 2x2 table.

    Fires when the test rejects equal rates at gates.drift.label_shift_p_value and the observed ratio
    is at least `decision_ratio` (or at most its inverse); a significant but small change in a large
    window is not called a shift. The monitor's default, sqrt(label_shift_ratio), is halfway on the log
    scale between no change and the change to catch, so a doubling is caught once the window can see it
    (bench/drift_null.py: 82% at 500 rows, 98% at 1000). Ingest, which refuses data rather than starting
    a retraining, passes label_shift_ratio itself: a batch is refused only when it shows the doubling (a
    clean day with a fraud burst must pass). Missing labels are dropped.

    dispersion: variance of the positive count over the binomial's (>= 1), when positives come in bursts
    (fraud episodes within a time window); the table's counts are divided by it before the test.
    """
    if dispersion < 1.0:
        raise ValueError(f"dispersion must be >= 1, got {dispersion}")
    from scipy.stats import fisher_exact

    pos_ref, n_ref = _label_counts(reference, column, "reference")
    pos_cur, n_cur = _label_counts(current, column, "current")
    rate_ref, rate_cur = pos_ref / n_ref, pos_cur / n_cur
    table = [[pos_ref, n_ref - pos_ref], [pos_cur, n_cur - pos_cur]]
    p_value = float(fisher_exact([[round(count / dispersion) for count in row] for row in table])[1])
    if rate_ref > 0:
        ratio: float | None = rate_cur / rate_ref
    else:
        ratio = math.inf if rate_cur > 0 else None
    drift = gates.drift
    decision_ratio = decision_ratio if decision_ratio is not None else math.sqrt(drift.label_shift_ratio)
    moved = ratio is not None and (ratio >= decision_ratio or ratio <= 1 / decision_ratio)
    return LabelShift(
        column=column,
        reference_rate=rate_ref,
        current_rate=rate_cur,
        ratio=ratio,
        p_value=p_value,
        shifted=bool(moved and p_value < drift.label_shift_p_value),
        label_shift_ratio=drift.label_shift_ratio,
        decision_ratio=decision_ratio,
        p_value_threshold=drift.label_shift_p_value,
        n_reference=n_ref,
        n_current=n_cur,
        positives_reference=pos_ref,
        positives_current=pos_cur,
    )


def compute_drift(
    reference: pd.DataFrame | Profile,
    current: pd.DataFrame,
    columns: Sequence[str],
    gates: GatesSpec | None = None,
    *,
    kinds: Mapping[str, Kind] | None = None,
    workers: int | None = None,
    calibrate: bool = False,
    keep_profiles: bool = False,
) -> DriftStats:
    """Per-feature drift of `current` against `reference` (a DataFrame, or a Profile made once).

    Evidently's methods, scores, thresholds and decisions; with `calibrate`, also the decision
    calibrated to the window's size (`DriftStats.calibrated`, see the module docstring); with
    `keep_profiles`, the sorted columns both sides were compared on (`DriftStats.profiles`, for the report).
    Raises DriftInputError when a column is missing, empty or of the wrong type.
    """
    gates = gates or GatesSpec()
    columns = list(columns)
    needed, level = decision_rule(gates, len(columns))
    draws = null_draws(level)
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

    # One bootstrap at a time: it works on small blocks, where threads contend for the GIL; the
    # other threads keep profiling (sorting) their columns meanwhile.
    one_at_a_time = threading.Lock()

    def one(column: str) -> tuple[FeatureDrift, CalibratedFeature | None, tuple[ColumnProfile, ColumnProfile]]:
        kind = kinds[column]
        ref = (
            reference.columns[column]
            if isinstance(reference, Profile)
            else profile_column(reference[column], column, kind, "reference")
        )
        cur = profile_column(current[column], column, kind, "current")
        drift = compare(ref, cur, gates)
        if not calibrate:
            return drift, None, (ref, cur)
        with one_at_a_time:
            return drift, calibrate_feature(ref, cur, gates, level=level, draws=draws, evidently=drift), (ref, cur)

    with ThreadPoolExecutor(_workers(workers, len(columns))) as pool:
        results = list(pool.map(one, columns))
    rows_reference = reference.rows if isinstance(reference, Profile) else len(reference)
    calibrated = None
    if calibrate:
        calibrated = CalibratedDrift(
            {c.column: c for _, c, _ in results if c is not None},
            false_alarm_rate=gates.drift.false_alarm_rate,
            max_drift_share=gates.drift.max_drift_share,
            features_needed=needed,
            feature_level=level,
        )
    profiles = {r.column: pair for r, _, pair in results} if keep_profiles else None
    return DriftStats({r.column: r for r, _, _ in results}, rows_reference, len(current), calibrated, profiles)


# --- the gate ------------------------------------------------------------------------------------


def regression_label_shift(
    reference: pd.Series | ColumnProfile, current: pd.Series, gates: GatesSpec, column: str
) -> CalibratedFeature:
    """Did a numeric label's distribution move? The features' calibrated test, at gates.drift.label_shift_p_value.

    The normed Wasserstein distance of the current labels against the reference's, with its bootstrap
    p-value at the current window's size; a shift needs p <= label_shift_p_value and a distance of at
    least gates.drift.feature_threshold, so a significant but tiny change in a large window is not one.
    """
    ref = (
        reference if isinstance(reference, ColumnProfile) else profile_column(reference, column, "numeric", "reference")
    )
    cur = profile_column(current, column, "numeric", "current")
    return calibrate_feature(ref, cur, gates, level=gates.drift.label_shift_p_value)


def label_shift_failure(
    reference: pd.Series | ColumnProfile, current: pd.Series, gates: GatesSpec, column: str, task: str
) -> tuple[dict[str, Any], str | None]:
    """(metrics, failure line or None) of the label check of the task: class balance or label distribution."""
    if task == "classification":
        return label_check(label_shift(reference, current, gates, column), column)
    return label_check(regression_label_shift(reference, current, gates, column), column)


def label_check(shift: LabelShift | CalibratedFeature, column: str) -> tuple[dict[str, Any], str | None]:
    """(metrics, failure line or None) of a label check's outcome: a classifier's `label_shift`, a regressor's
    `regression_label_shift` (shared with `loopform.gates.out_of_core`)."""
    if isinstance(shift, LabelShift):
        if not shift.shifted:
            return shift.to_dict(), None
        ratio = "none before" if shift.ratio in (None, math.inf) else f"{shift.ratio:.2f}x"
        return shift.to_dict(), (
            f"label {column!r} shifted: positive rate {shift.current_rate:.4f} over {shift.n_current} "
            f"rows against {shift.reference_rate:.4f} in the reference ({ratio}; Fisher exact "
            f"p={shift.p_value:.2g} < gates.drift.label_shift_p_value={shift.p_value_threshold}): "
            "the class balance moved (label shift)"
        )
    moved = shift
    metrics = {**moved.to_dict(), "test": "calibrated normed Wasserstein"}
    if not moved.drifted:
        return metrics, None
    return metrics, (
        f"label {column!r} shifted: normed Wasserstein distance {moved.score:.3g} over {moved.n_current} rows "
        f"(p={moved.p_value:.2g} <= gates.drift.label_shift_p_value={moved.level:g}, and >= "
        f"gates.drift.feature_threshold={moved.effect_threshold:g}): the label's distribution moved (label shift)"
    )


def drift_gate(
    reference: pd.DataFrame | Profile,
    current: pd.DataFrame,
    gates: GatesSpec,
    contract: Contract,
    report_path: Path | None = None,
    *,
    columns: Sequence[str] | None = None,
    labels: bool = True,
    workers: int | None = None,
) -> GateResult:
    """Fail when the calibrated drift share exceeds gates.drift.max_drift_share, or the labels shifted.

    The decision is the one calibrated to the window's size (false-alarm rate
    gates.drift.false_alarm_rate on clean data): metrics `drift_share`, `drifted` and each feature's
    `calibrated`. Evidently's fixed-threshold view stays beside it: metrics `evidently` and each
    feature's method, score, threshold and drifted. Columns default to the contract's features, with
    the contract's kinds. With `labels`, the contract's label is compared when both sides carry
    labelled rows (training data, labelled feedback): a classifier's positive rate with `label_shift`'s
    proportion test, a regressor's label distribution with `regression_label_shift`. With
    report_path, the HTML report of these statistics (`loopform.gates.report.write_drift_report`) goes
    there: drawn from the sorted columns already computed, so it adds little to the gate's time.
    """
    columns = list(columns or contract.feature_names)
    kinds = contract.kinds
    label = contract.label if labels else None
    try:
        stats = compute_drift(
            reference,
            current,
            columns,
            gates,
            kinds=kinds,
            workers=workers,
            calibrate=True,
            keep_profiles=report_path is not None,
        )
    except DriftInputError as error:
        return drift_input_failure(error, gates, len(current))
    label_metrics: dict[str, Any] | None = None
    label_failures: list[str] = []
    labelled = label is not None and label in current.columns and label in reference.columns
    if labelled and current[label].notna().any():
        try:
            ref_labels = reference.columns[label] if isinstance(reference, Profile) else reference[label]
            label_metrics, failure = label_shift_failure(ref_labels, current[label], gates, label, contract.task)
        except DriftInputError as error:
            label_failures.append(f"cannot compare label {label!r}: {error}")
        else:
            label_failures += [failure] if failure else []
    return drift_result(stats, gates, label_metrics, label_failures, report_path)


def drift_input_failure(error: DriftInputError, gates: GatesSpec, rows_current: int) -> GateResult:
    """The drift gate's result when the data cannot be compared."""
    metrics = {"drift_share": None, "max_drift_share": gates.drift.max_drift_share, "rows_current": rows_current}
    return GateResult("drift", False, metrics, [f"cannot compute drift: {error}"])


def drift_result(
    stats: DriftStats,
    gates: GatesSpec,
    label: dict[str, Any] | None,
    label_failures: Sequence[str],
    report_path: Path | None = None,
) -> GateResult:
    """The drift gate's decision, metrics and report from calibrated statistics and the label check's outcome
    (shared by `drift_gate` and `loopform.gates.out_of_core`)."""
    max_share = gates.drift.max_drift_share
    calibrated = stats.calibrated
    assert calibrated is not None
    metrics: dict[str, Any] = {
        "decision": "calibrated",
        "drift_share": calibrated.drift_share,
        "drifted_count": len(calibrated.drifted),
        "drifted": calibrated.drifted,
        "n_features": len(stats.features),
        "rows_reference": stats.rows_reference,
        "rows_current": stats.rows_current,
        "max_drift_share": max_share,
        "calibration": {k: v for k, v in calibrated.to_dict().items() if k != "features"},
        "evidently": {
            "drift_share": stats.drift_share,
            "drifted_count": len(stats.drifted),
            "drifted": stats.drifted,
            "note": "Evidently's fixed thresholds: for reports; not the decision (noisy on small windows)",
        },
        "features": {
            name: {**f.to_dict(), "calibrated": calibrated.features[name].to_dict()}
            for name, f in stats.features.items()
        },
        "label": label,
    }
    failures: list[str] = []
    if calibrated.detected:
        detail = ", ".join(
            f"{n} ({f.statistic}={f.score:.3g} > {f.threshold:.3g}, p={f.p_value:.2g})"
            for n, f in calibrated.features.items()
            if f.drifted
        )
        failures.append(
            f"drift share {calibrated.drift_share:.3f} ({len(calibrated.drifted)} of {len(calibrated.features)} "
            f"features at {stats.rows_current} rows: {detail}) is above gates.drift.max_drift_share={max_share} "
            f"(decision calibrated to gates.drift.false_alarm_rate={gates.drift.false_alarm_rate})"
        )
    failures += label_failures
    report = None
    if report_path is not None:
        from loopform.gates.report import write_drift_report

        report = str(write_drift_report(stats, Path(report_path), metrics["label"]))
    return GateResult("drift", not failures, metrics, failures, report)


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
