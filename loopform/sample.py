"""What the sample-data generators of the model folders share: random streams, option checks, entity windows, faults.

A model's `data.py` stands in for its data lake: deterministic for a seed, vectorised numpy,
nothing downloaded. The pieces every generator needs live here, driven by the model's contract:

- `streams`: one independent random stream per purpose, so switching a fault on leaves the
  clean draws identical;
- `trailing`: an entity's count, sum and mean over [t - w, t) before each event, the
  point-in-time aggregates the feature store serves by entity id (never the event itself, a
  tie or the future);
- `events_frame`: the labelled events sorted by time with the contract's columns and the
  `Faults` the data gates must catch (out-of-range values, missing values, a wrong column type,
  a missing column).

Only generators import this module (numpy and pandas only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from loopform.contract import Contract, Feature

#: The random streams of a generator: base data first, then one per fault switch.
STREAMS = ("base", "drift", "out_of_range", "missing_values")
#: A categorical value outside every list, for a feature whose generator names none.
UNLISTED = "unlisted"


def streams(seed: int, names: Sequence[str] = STREAMS) -> dict[str, np.random.Generator]:
    """One independent generator per name, all from `seed` (adding a name leaves the earlier streams alone)."""
    spawned = np.random.SeedSequence(seed).spawn(len(names))
    return {name: np.random.default_rng(stream) for name, stream in zip(names, spawned, strict=True)}


def check_options(rows: int, days: int, start: datetime, covariate_drift: float = 0.0) -> None:
    """Raise ValueError, naming the option, for an option no generator can honour (see `Faults` for the faults)."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    if covariate_drift < 0:
        raise ValueError(f"covariate_drift must be >= 0, got {covariate_drift}")
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware (UTC)")


def draw(rng: np.random.Generator, p: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """n category codes drawn with probabilities p (unnormalised), one uniform per draw."""
    cdf = np.cumsum(p) / np.sum(p)
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(p) - 1).astype(np.int64)


@dataclass(frozen=True)
class Window:
    """Per event: its entity's events in [t - w, t) (`count`), the sum of their values and its mean."""

    count: np.ndarray
    total: np.ndarray
    mean: np.ndarray


def trailing(
    entities: np.ndarray,
    seconds: np.ndarray,
    values: np.ndarray | None,
    windows: Sequence[int],
    *,
    decimals: int = 0,
    empty: float = 0.0,
) -> tuple[Window, ...]:
    """One `Window` per width w in `windows` (seconds): each event's entity's earlier events in [t - w, t).

    An event counts for another of its entity at time t when its own time is in [t - w, t): never
    itself, nor one at the same instant or later, whatever the input order. `values` (None: counts
    only) are summed as integers in units of 10**-decimals, so sums are exact and a value with more
    decimals is rounded to `decimals`; `mean` is `empty` where the window holds no event.
    Vectorised: one sort and a binary search per window, whatever the number of entities.
    """
    seconds = np.asarray(seconds, dtype=np.int64)
    n = seconds.shape[0]
    if min(windows, default=1) < 1:
        raise ValueError(f"windows must be >= 1 second, got {list(windows)}")
    scale = 10.0**decimals
    units = (
        np.zeros(n, dtype=np.int64)
        if values is None
        else np.round(np.asarray(values, dtype=np.float64) * scale).astype(np.int64)
    )
    if n == 0:
        return tuple(Window(np.zeros(0, np.int64), np.zeros(0), np.zeros(0)) for _ in windows)
    _, entity = np.unique(np.asarray(entities), return_inverse=True)
    origin = int(seconds.min())
    # One sorted key per (entity, time): a window of one entity never reaches another entity's keys.
    stride = int(seconds.max()) - origin + max(windows) + 1
    key = entity.astype(np.int64) * stride + (seconds - origin)
    order = np.argsort(key, kind="stable")
    ordered = key[order]  # queries in sorted order too: binary searches stay in cache
    prefix = np.concatenate([[0], np.cumsum(units[order])])
    before = np.searchsorted(ordered, ordered, side="left")  # the entity's first event at this instant
    result = []
    for width in windows:
        first = np.searchsorted(ordered, ordered - width, side="left")
        inside = before - first
        summed = prefix[before] - prefix[first]
        count, total, mean = np.empty(n, np.int64), np.empty(n), np.empty(n)
        count[order] = inside
        total[order] = summed / scale
        mean[order] = np.divide(summed, scale * inside, out=np.full(n, empty), where=inside > 0)
        result.append(Window(count, total, mean))
    return tuple(result)


@dataclass(frozen=True)
class Faults:
    """The faults of a broken upstream job that a generator injects on request (the data gates must catch each).

    out_of_range: share of every feature's values put outside its range (numeric) or category
    list (categorical). missing_values: share of every feature's values set missing (int features
    become float64, as numpy requires). wrong_types: a column stored with the wrong type (numbers
    as strings, strings as integer codes, timestamps as ISO strings). missing_column: a column dropped.
    """

    out_of_range: float = 0.0
    missing_values: float = 0.0
    missing_column: str | None = None
    wrong_types: str | None = None

    def __post_init__(self) -> None:
        for name, share in (("out_of_range", self.out_of_range), ("missing_values", self.missing_values)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be a share in [0, 1], got {share}")


def events_frame(
    contract: Contract,
    cols: Mapping[str, np.ndarray],
    seconds: np.ndarray,
    *,
    seed: int,
    start: datetime,
    id_prefix: str,
    faults: Faults = Faults(),
    unlisted: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """The events of `cols` (the entity, each feature, the label) sorted by time, with the contract's columns and `faults`.

    seconds: each event's time after `start`. Categorical features are codes into the contract's
    categories; an out-of-range one becomes the feature's value in `unlisted` (default UNLISTED).
    Ids are `<id_prefix>-<seed>-<row>`: unique within a frame and distinct between seeds. The faults
    draw from `streams(seed)`'s own streams, so switching one on leaves everything else identical.
    """
    rngs = streams(seed)
    cols = dict(cols)
    if faults.out_of_range > 0:
        _out_of_range(rngs["out_of_range"], cols, contract.features, faults.out_of_range)
    order = np.argsort(seconds, kind="stable")
    frame = {contract.id: _event_ids(id_prefix, seed, len(order)), contract.entity: cols[contract.entity][order]}
    frame[contract.timestamp] = pd.DatetimeIndex(
        pd.Timestamp(start).tz_convert("UTC") + pd.to_timedelta(seconds[order], unit="s")
    )
    for f in contract.features:
        values = cols[f.name][order]
        if f.kind == "categorical":
            outside = (unlisted or {}).get(f.name, UNLISTED)
            values = np.asarray([*(f.categories or ()), outside], dtype=object)[values]  # code -1: the last one
        frame[f.name] = values
    frame[contract.label] = cols[contract.label][order]
    return _frame_faults(pd.DataFrame(frame), rngs["missing_values"], contract.features, faults)


def _out_of_range(
    rng: np.random.Generator, cols: dict[str, np.ndarray], features: Sequence[Feature], share: float
) -> None:
    """Put `share` of every feature's values outside its range, numeric ones by value, categorical ones as code -1."""
    for f in features:
        n = cols[f.name].shape[0]
        hit = rng.random(n) < share
        if f.kind == "categorical":
            cols[f.name] = np.where(hit, -1, cols[f.name])
            continue
        assert f.min is not None and f.max is not None
        span = f.max - f.min
        low = rng.random(n) < 0.5
        offset = np.maximum(span * rng.uniform(0.01, 0.5, n), 1.0)
        bad = np.where(low, f.min - offset, f.max + offset)
        if f.dtype == "int64":
            bad = np.where(low, np.floor(bad), np.ceil(bad)).astype(np.int64)
        cols[f.name] = np.where(hit, bad, cols[f.name])


def _event_ids(prefix: str, seed: int, rows: int) -> np.ndarray:
    head = f"{prefix}-{seed & 0xFFFFFFFF:08x}-"
    return (head + pd.Series(np.arange(rows, dtype=np.int64)).astype(str).str.zfill(9)).to_numpy(dtype=object)


def _frame_faults(
    df: pd.DataFrame, rng: np.random.Generator, features: Sequence[Feature], faults: Faults
) -> pd.DataFrame:
    """`df` with the faults that act on the frame: missing values, then a wrong type, then a missing column."""
    if faults.missing_values > 0:
        for f in features:
            hit = rng.random(len(df)) < faults.missing_values
            if f.kind == "numeric":
                df[f.name] = np.where(hit, np.nan, df[f.name].to_numpy(np.float64))
            else:
                df[f.name] = df[f.name].where(~hit, None)
    for option, column in (("wrong_types", faults.wrong_types), ("missing_column", faults.missing_column)):
        if column is not None and column not in df.columns:
            raise ValueError(f"{option} {column!r} is not a column; columns: {', '.join(df.columns)}")
    if faults.wrong_types is not None:
        series = df[faults.wrong_types]
        if isinstance(series.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(series):
            df[faults.wrong_types] = series.dt.strftime("%Y-%m-%dT%H:%M:%S%z").astype(object)
        elif pd.api.types.is_numeric_dtype(series):
            df[faults.wrong_types] = series.astype(str).astype(object)
        else:
            df[faults.wrong_types] = pd.factorize(series)[0].astype(np.int64)
    if faults.missing_column is not None:
        df = df.drop(columns=[faults.missing_column])
    return df
