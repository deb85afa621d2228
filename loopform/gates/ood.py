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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from loopform.gates.drift import Kind, column_kind
from loopform.gates.result import GateResult
from loopform.spec import GatesSpec

if TYPE_CHECKING:
    from loopform.contract import Contract

DEFAULT_QUANTILE = 0.001
DEFAULT_MARGIN = 0.1


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
    reference: pd.DataFrame,
    columns: Sequence[str],
    *,
    quantile: float = DEFAULT_QUANTILE,
    margin: float = DEFAULT_MARGIN,
    kinds: dict[str, Kind] | None = None,
) -> Envelope:
    """The envelope of the reference data (fit once, reuse for every window of traffic)."""
    if not 0 <= quantile < 0.5:
        raise ValueError(f"quantile must be in [0, 0.5), got {quantile}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    absent = [c for c in columns if c not in reference.columns]
    if absent:
        raise ValueError(f"reference data lacks column(s) {', '.join(map(repr, absent))}")
    bounds: dict[str, tuple[float, float]] = {}
    categories: dict[str, frozenset[Any]] = {}
    for column in columns:
        series = reference[column]
        if column_kind(column, series, kinds) == "categorical":
            categories[column] = frozenset(series.dropna().unique().tolist())
            continue
        if not pd.api.types.is_numeric_dtype(series.dtype):
            raise ValueError(f"reference column {column!r} should be numeric but has dtype {series.dtype}")
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError(f"reference column {column!r} has no finite values")
        low, high = np.quantile(values, [quantile, 1 - quantile])
        width = high - low
        bounds[column] = (float(low - margin * width), float(high + margin * width))
    return Envelope(bounds, categories, quantile, margin)


def ood_gate(
    reference: pd.DataFrame | Envelope,
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
            outside = (series.notna() & ~series.isin(envelope.categories[column])).to_numpy()
        per_feature[column] = float(outside.mean())
        flagged |= outside
    rate = float(flagged.mean())
    metrics.update(ood_rate=rate, ood_rows=int(flagged.sum()), per_feature=per_feature, envelope=envelope.to_dict())
    if rate > gates.max_ood_rate:
        worst = sorted(per_feature.items(), key=lambda kv: -kv[1])[:3]
        detail = ", ".join(f"{c} {s:.2%}" for c, s in worst if s > 0)
        failures.append(
            f"{rate:.2%} of rows ({int(flagged.sum())} of {len(current)}) are out of distribution, above "
            f"gates.max_ood_rate={gates.max_ood_rate} (most: {detail})"
        )
    return GateResult("ood", not failures, metrics, failures)
