"""Schema gate: required columns, types, missing values, ranges and categories of the fraud data.

Runs before anything learns from or is judged on a data set, so a broken upstream job (a column
dropped, numbers shipped as strings, sentinel values out of range) stops the pipeline with a
message that names the column, instead of a model quietly training on garbage.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from loopform.data import ENTITY, FEATURES, ID, LABEL, TIMESTAMP, Feature
from loopform.gates.result import GateResult
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


def _out_of_range_share(series: pd.Series, feature: Feature) -> tuple[float, int]:
    """Share (and count) of present values outside the feature's range or category list."""
    present = series.dropna()
    if present.empty:
        return 0.0, 0
    if feature.kind == "categorical":
        bad = int((~present.isin(feature.categories or ())).sum())
    else:
        values = present.to_numpy(dtype=np.float64)
        low = -np.inf if feature.min is None else feature.min
        high = np.inf if feature.max is None else feature.max
        bad = int(np.count_nonzero(~((values >= low) & (values <= high))))  # NaN-free; inf counts as bad
    return bad / len(present), bad


def validate_data(
    df: pd.DataFrame,
    gates: GatesSpec,
    *,
    require_label: bool = False,
    features: tuple[Feature, ...] = FEATURES,
) -> GateResult:
    """Check a data set against the schema and the gates' missing/out-of-range limits.

    Required: ENTITY (integers), TIMESTAMP (timezone-aware datetimes), every feature, and LABEL
    (0/1) when require_label. Fails on a missing column, a wrong type, any column with more
    than gates.max_missing_share missing, any feature with more than gates.max_out_of_range_share
    of its present values outside its range or category list, or duplicate transaction ids.
    """
    failures: list[str] = []
    rows = len(df)
    metrics: dict[str, Any] = {"rows": rows, "columns": [str(c) for c in df.columns]}
    if rows == 0:
        return GateResult("validation", False, metrics, ["data set is empty"])

    required = [ENTITY, TIMESTAMP, *(f.name for f in features)] + ([LABEL] if require_label else [])
    missing_columns = [c for c in required if c not in df.columns]
    metrics["missing_columns"] = missing_columns
    failures += [f"missing column {c!r}" for c in missing_columns]

    type_errors: dict[str, str] = {}
    if ENTITY in df.columns and not (
        pd.api.types.is_integer_dtype(df[ENTITY].dtype) and not pd.api.types.is_bool_dtype(df[ENTITY].dtype)
    ):
        type_errors[ENTITY] = f"has dtype {df[ENTITY].dtype}, expected int64 ids"
    if TIMESTAMP in df.columns:
        dtype = df[TIMESTAMP].dtype
        if not isinstance(dtype, pd.DatetimeTZDtype):
            type_errors[TIMESTAMP] = f"has dtype {dtype}, expected timezone-aware datetimes (UTC)"
    for feature in features:
        if feature.name in df.columns:
            problem = _dtype_problem(df[feature.name], feature)
            if problem:
                type_errors[feature.name] = problem
    if LABEL in df.columns:
        label = df[LABEL]
        if pd.api.types.is_numeric_dtype(label.dtype):
            values = label.dropna()
            if not values.isin([0, 1]).all():
                type_errors[LABEL] = f"holds values other than 0/1: {sorted(set(values.unique()) - {0, 1})[:5]}"
            elif len(values):
                metrics["label_rate"] = float(values.mean())
        else:
            type_errors[LABEL] = f"has dtype {label.dtype}, expected 0/1 integers"
    metrics["type_errors"] = type_errors
    failures += [f"column {c!r} {problem}" for c, problem in type_errors.items()]

    checked = [c for c in (ID, *required) if c in df.columns]
    missing_share = {c: float(df[c].isna().mean()) for c in checked}
    metrics["missing_share"] = missing_share
    metrics["worst_missing_share"] = max(missing_share.values(), default=0.0)
    for column, share in missing_share.items():
        if share > gates.max_missing_share:
            failures.append(
                f"column {column!r} has {share:.2%} missing values, above gates.max_missing_share="
                f"{gates.max_missing_share}"
            )

    out_of_range: dict[str, float] = {}
    for feature in features:
        if feature.name in df.columns and feature.name not in type_errors:
            share, count = _out_of_range_share(df[feature.name], feature)
            out_of_range[feature.name] = share
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
    metrics["worst_out_of_range_share"] = max(out_of_range.values(), default=0.0)

    if ID in df.columns:
        duplicates = int(df[ID].duplicated().sum())
        metrics["duplicate_ids"] = duplicates
        if duplicates:
            failures.append(f"column {ID!r} has {duplicates} duplicate transaction ids")
    return GateResult("validation", not failures, metrics, failures)
