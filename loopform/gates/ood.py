"""Out-of-distribution gate: the share of rows the model has never seen anything like.

Drift compares distributions; this counts individual rows. A row is out of distribution when any
numeric feature lies outside the reference's envelope, or any categorical feature holds a value
the reference never had. The envelope of a numeric feature is the reference's
[q(quantile), q(1 - quantile)] interval widened by `margin` times its width on each side, so a
clean sample from the reference distribution flags well under 1 % of rows, while corrupt values,
unseen categories and strong shifts are flagged. Missing values are not OOD (the validation gate
owns missing values).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from loopform.gates.drift import Kind, Profile, column_kind
from loopform.gates.result import GateResult
from loopform.spec import GatesSpec

if TYPE_CHECKING:
    from loopform.contract import Contract

DEFAULT_QUANTILE = 0.001
DEFAULT_MARGIN = 0.1
_TAIL_MIN_ROWS = 20_000  # smaller columns take np.quantile directly
_TAIL_SAMPLE = 2_000  # about this many values of a column set the tails' thresholds


@dataclass(frozen=True)
class Envelope:
    """Per feature: numeric (low, high) bounds, or the set of categories seen in the reference."""

    bounds: dict[str, tuple[float, float]]
    categories: dict[str, frozenset[Any]]
    quantile: float
    margin: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantile": self.quantile,
            "margin": self.margin,
            "bounds": {c: list(b) for c, b in self.bounds.items()},
            "categories": {c: sorted(map(str, v)) for c, v in self.categories.items()},
        }


def fit_envelope(
    reference: pd.DataFrame | Profile,
    columns: Sequence[str],
    *,
    quantile: float = DEFAULT_QUANTILE,
    margin: float = DEFAULT_MARGIN,
    kinds: dict[str, Kind] | None = None,
) -> Envelope:
    """The envelope of the reference data (fit once, reuse for every window of traffic).

    From a drift Profile (its sorted columns: the stored reference of a release) the envelope is the
    same as from the data it was made of: quantiles do not depend on the order of the values."""
    if not 0 <= quantile < 0.5:
        raise ValueError(f"quantile must be in [0, 0.5), got {quantile}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    absent = [c for c in columns if c not in reference.columns]
    if absent:
        raise ValueError(f"reference data lacks column(s) {', '.join(map(repr, absent))}")
    bounds: dict[str, tuple[float, float]] = {}
    categories: dict[str, frozenset[Any]] = {}
    if isinstance(reference, Profile):
        for column in columns:
            stored = reference.columns[column]
            if stored.kind == "categorical":
                assert stored.keys is not None
                categories[column] = frozenset(stored.keys.tolist())
            else:
                assert stored.sorted is not None
                bounds[column] = _widened(stored.sorted, quantile, margin)
        return Envelope(bounds, categories, quantile, margin)
    for column in columns:
        series = reference[column]
        if column_kind(column, series, kinds) == "categorical":
            categories[column] = frozenset(series.value_counts(sort=False, dropna=True).index.tolist())
            continue
        if not pd.api.types.is_numeric_dtype(series.dtype):
            raise ValueError(f"reference column {column!r} should be numeric but has dtype {series.dtype}")
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = np.isfinite(values)
        values = values if finite.all() else values[finite]
        if values.size == 0:
            raise ValueError(f"reference column {column!r} has no finite values")
        bounds[column] = _widened(values, quantile, margin)
    return Envelope(bounds, categories, quantile, margin)


def _widened(values: np.ndarray, quantile: float, margin: float) -> tuple[float, float]:
    """The [quantile, 1 - quantile] interval of finite values, widened by margin times its width on each side."""
    low, high = tail_quantiles(values, quantile)
    width = high - low
    return float(low - margin * width), float(high + margin * width)


def tail_quantiles(values: np.ndarray, quantile: float) -> tuple[float, float]:
    """np.quantile(values, [quantile, 1 - quantile]) bit for bit, without partitioning the whole column.

    Each order statistic the linear interpolation needs lies among the values beyond a threshold read
    off a strided sample, so only those few are partitioned (exact whatever the sample; when the
    threshold leaves too few values, the whole column is). Numpy's virtual index and interpolation
    are repeated term by term, so the result equals np.quantile's.
    """
    n = values.size
    if n < _TAIL_MIN_ROWS:
        low, high = np.quantile(values, [quantile, 1 - quantile])
        return float(low), float(high)
    sample = np.sort(values[:: n // _TAIL_SAMPLE])
    share = min(0.5, 2 * quantile + 0.01)
    out = []
    for q, lower in ((quantile, True), (1 - quantile, False)):
        virtual = (n - 1) * q  # numpy's virtual index of the linear method
        first = n - 1 if virtual >= n - 1 else math.floor(virtual)
        second = min(first + 1, n - 1)
        if lower:
            cut = sample[min(sample.size - 1, math.ceil(share * sample.size))]
            candidates, offset = values[values <= cut], 0
        else:
            cut = sample[max(0, math.floor((1 - share) * sample.size))]
            candidates = values[values >= cut]
            offset = n - candidates.size
        enough = candidates.size > second if lower else offset <= first  # the statistics needed lie among them
        if enough:
            part = np.partition(candidates, [first - offset, second - offset])
            a, b = part[first - offset], part[second - offset]
        else:
            ordered = np.partition(values, [first, second])
            a, b = ordered[first], ordered[second]
        gamma = virtual - first
        difference = b - a
        out.append(float(b - difference * (1 - gamma) if gamma >= 0.5 else a + difference * gamma))  # numpy's _lerp
    return out[0], out[1]


def ood_gate(
    reference: pd.DataFrame | Profile | Envelope,
    current: pd.DataFrame,
    gates: GatesSpec,
    contract: Contract,
    *,
    columns: Sequence[str] | None = None,
    quantile: float = DEFAULT_QUANTILE,
    margin: float = DEFAULT_MARGIN,
) -> GateResult:
    """Fail when more than gates.max_ood_rate of the current rows fall outside the reference envelope.

    Columns default to the contract's features, with the contract's kinds."""
    columns = list(columns or contract.feature_names)
    kinds = contract.kinds
    envelope = (
        reference
        if isinstance(reference, Envelope)
        else fit_envelope(reference, columns, quantile=quantile, margin=margin, kinds=kinds)
    )
    columns = [c for c in columns if c in envelope.bounds or c in envelope.categories]
    metrics: dict[str, Any] = {"ood_rate": None, "max_ood_rate": gates.max_ood_rate, "rows": len(current)}
    if len(current) == 0:
        return GateResult("ood", False, metrics, ["current data is empty"])
    failures = [f"current data lacks column {c!r}" for c in columns if c not in current.columns]
    for column in envelope.bounds:
        if column in current.columns and not pd.api.types.is_numeric_dtype(current[column].dtype):
            failures.append(f"column {column!r} should be numeric but has dtype {current[column].dtype}")
    if failures:
        return GateResult("ood", False, metrics, failures)

    flagged = np.zeros(len(current), dtype=bool)
    per_feature: dict[str, float] = {}
    for column in columns:
        series = current[column]
        if column in envelope.bounds:
            low, high = envelope.bounds[column]
            values = series.to_numpy(dtype=np.float64, na_value=np.nan)
            outside = (values < low) | (values > high) | np.isinf(values)
        else:
            outside = ~series.isin(envelope.categories[column]).to_numpy()
            unseen = np.flatnonzero(outside)
            outside[unseen] = series.iloc[unseen].notna().to_numpy()  # missing is not OOD (checked where unseen)
        per_feature[column] = float(outside.mean())
        flagged |= outside
    return ood_decision(int(flagged.sum()), len(current), per_feature, envelope, gates, metrics)


def ood_decision(
    flagged: int,
    rows: int,
    per_feature: dict[str, float],
    envelope: Envelope,
    gates: GatesSpec,
    metrics: dict[str, Any],
) -> GateResult:
    """The gate's verdict from its counts: in memory (a row mask) and out of core (SQL counts) decide alike."""
    rate = flagged / rows
    metrics.update(ood_rate=rate, ood_rows=flagged, per_feature=per_feature, envelope=envelope.to_dict())
    failures = []
    if rate > gates.max_ood_rate:
        worst = sorted(per_feature.items(), key=lambda kv: -kv[1])[:3]
        detail = ", ".join(f"{c} {s:.2%}" for c, s in worst if s > 0)
        failures.append(
            f"{rate:.2%} of rows ({flagged} of {rows}) are out of distribution, above "
            f"gates.max_ood_rate={gates.max_ood_rate} (most: {detail})"
        )
    return GateResult("ood", not failures, metrics, failures)
