"""The sample generators' shared pieces: entity windows strictly before each event, the event frame and the faults."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from loopform import sample
from models.fraud.contract import CONTRACT  # any contract: the pieces read only its declarations

HOUR, DAY = 3_600, 86_400
START = datetime(2024, 1, 1, tzinfo=UTC)
NO_FAULTS = sample.Faults()
ID, TIMESTAMP, LABEL = CONTRACT.id, CONTRACT.timestamp, CONTRACT.label


def toy_columns(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Unsorted columns of `n` events within the contract's declarations (categories as codes), and their seconds."""
    rng = np.random.default_rng(seed)
    cols = {CONTRACT.entity: rng.integers(1, 5, n), LABEL: rng.integers(0, 2, n)}
    for f in CONTRACT.features:
        if f.kind == "categorical":
            cols[f.name] = rng.integers(0, len(f.categories or ()), n)
        elif f.dtype == "int64":
            cols[f.name] = rng.integers(int(f.min or 0), int(f.max or 0) + 1, n)
        else:
            cols[f.name] = np.round(rng.uniform(f.min, f.max, n), 2)
    return cols, rng.permutation(n) * 60


def test_trailing_by_hand() -> None:
    """Windows are [t - w, t): never the event itself, a tie or the future, whatever the input order."""
    entities = np.array([1, 1, 1, 1, 1, 2, 1])
    seconds = np.array([0, 1_800, HOUR, HOUR, 30 * DAY + 1_800, 600, 40 * DAY])
    values = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 99.9, 60.0])
    hour, month = sample.trailing(entities, seconds, values, (HOUR, 30 * DAY), decimals=1, empty=-1.0)
    # Entity 1: the two events at 1 h see 0 (exactly 1 h back) and 0.5 h but not each other; the one 30 days
    # after 0.5 h sees 0.5 h (exactly 30 days back) and the two at 1 h; the last sees only that one.
    assert hour.count.tolist() == [0, 1, 2, 2, 0, 0, 0]
    assert month.count.tolist() == [0, 1, 2, 2, 3, 0, 1]
    assert month.total.tolist() == [0.0, 10.0, 30.0, 30.0, 90.0, 0.0, 50.0]
    assert month.mean.tolist() == [-1.0, 10.0, 15.0, 15.0, 30.0, -1.0, 50.0]
    flip = np.arange(len(entities))[::-1]
    flipped = sample.trailing(entities[flip], seconds[flip], values[flip], (HOUR, 30 * DAY), decimals=1, empty=-1.0)
    for window, again in zip((hour, month), flipped, strict=True):
        for name in ("count", "total", "mean"):
            assert getattr(again, name)[flip].tolist() == getattr(window, name).tolist()


def test_trailing_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    n = 600
    entities = rng.choice(np.array([-7, 0, 5, 2**40]), n)  # any int64 ids, far apart or negative
    seconds = rng.integers(-5 * DAY, 5 * DAY, n) // 600 * 600  # many ties
    values = np.round(rng.normal(0.0, 50.0, n), 2)
    windows = (HOUR, DAY, 3 * DAY)
    result = sample.trailing(entities, seconds, values, windows, decimals=2)
    for width, window in zip(windows, result, strict=True):
        for i in range(n):
            inside = (entities == entities[i]) & (seconds >= seconds[i] - width) & (seconds < seconds[i])
            assert window.count[i] == inside.sum()
            assert window.total[i] == pytest.approx(values[inside].sum(), abs=1e-9)
            assert window.mean[i] == pytest.approx(values[inside].mean() if inside.any() else 0.0, abs=1e-9)
    (counts,) = sample.trailing(entities, seconds, None, (DAY,))
    assert counts.count.tolist() == result[1].count.tolist() and not counts.total.any()


def test_trailing_edges() -> None:
    empty = sample.trailing(np.zeros(0, np.int64), np.zeros(0, np.int64), None, (HOUR, DAY))
    assert [len(w.count) for w in empty] == [0, 0]
    with pytest.raises(ValueError, match="windows"):
        sample.trailing(np.ones(2), np.arange(2), None, (0,))


def toy_frame(n: int, faults: sample.Faults = NO_FAULTS, **options) -> pd.DataFrame:
    """`toy_columns` as an events frame (seed 7, ids `toy-...`) with `faults`."""
    cols, seconds = toy_columns(n)
    return sample.events_frame(CONTRACT, cols, seconds, seed=7, start=START, id_prefix="toy", faults=faults, **options)


def test_events_frame_sorts_and_decodes() -> None:
    cols, seconds = toy_columns(50)
    df = toy_frame(50)
    assert tuple(df.columns) == CONTRACT.columns and df[TIMESTAMP].is_monotonic_increasing
    assert str(df[TIMESTAMP].dt.tz) == "UTC" and df[TIMESTAMP].iloc[0] == pd.Timestamp(START)
    order = np.argsort(seconds, kind="stable")
    assert df["amount"].tolist() == cols["amount"][order].tolist()
    channels = np.asarray(CONTRACT.by_name["channel"].categories)
    assert df["channel"].tolist() == channels[cols["channel"][order]].tolist()
    assert df[ID].iloc[3] == "toy-00000007-000000003" and df[ID].is_unique
    other = sample.events_frame(CONTRACT, cols, seconds, seed=8, start=START, id_prefix="toy")
    assert not set(other[ID]) & set(df[ID])


def test_out_of_range_moves_a_share_of_every_feature() -> None:
    clean = toy_frame(4_000)
    broken = toy_frame(4_000, sample.Faults(out_of_range=0.1), unlisted={"channel": "pigeon"})
    for f in CONTRACT.features:
        moved = broken[f.name] != clean[f.name]
        assert 0.08 < moved.mean() < 0.12, f.name
        if f.kind == "numeric":
            assert ((broken[f.name][moved] < f.min) | (broken[f.name][moved] > f.max)).all()
            assert broken[f.name].dtype == clean[f.name].dtype
        else:
            assert set(broken[f.name][moved]) == {"pigeon" if f.name == "channel" else sample.UNLISTED}
    assert broken.drop(columns=list(CONTRACT.feature_names)).equals(clean.drop(columns=list(CONTRACT.feature_names)))


def test_frame_faults() -> None:
    clean = toy_frame(2_000)
    holes = toy_frame(2_000, sample.Faults(missing_values=0.2))
    for name in CONTRACT.feature_names:
        assert 0.17 < holes[name].isna().mean() < 0.23
    assert holes["hour_of_day"].dtype == np.float64 and holes[LABEL].equals(clean[LABEL])
    dropped = toy_frame(2_000, sample.Faults(missing_column="amount"))
    assert dropped.columns.tolist() == [c for c in CONTRACT.columns if c != "amount"]
    wrong = {c: toy_frame(2_000, sample.Faults(wrong_types=c))[c] for c in ("amount", "channel", TIMESTAMP)}
    assert wrong["amount"].dtype == object and float(wrong["amount"].iloc[0]) == clean["amount"].iloc[0]
    assert pd.api.types.is_integer_dtype(wrong["channel"])
    assert wrong[TIMESTAMP].iloc[0] == "2024-01-01T00:00:00+0000"
    for option in ("wrong_types", "missing_column"):
        with pytest.raises(ValueError, match=f"{option} 'nope' is not a column"):
            toy_frame(10, sample.Faults(**{option: "nope"}))
    for option in ("out_of_range", "missing_values"):
        with pytest.raises(ValueError, match=f"{option} must be a share"):
            sample.Faults(**{option: 1.5})


def test_streams_are_independent_and_deterministic() -> None:
    first, again = sample.streams(5), sample.streams(5, (*sample.STREAMS, "extra"))
    for name in sample.STREAMS:
        assert np.array_equal(first[name].random(3), again[name].random(3))
    assert not np.array_equal(sample.streams(5)["base"].random(3), sample.streams(6)["base"].random(3))
    codes = sample.draw(np.random.default_rng(0), (3, 1), 10_000)
    assert codes.dtype == np.int64 and set(codes) == {0, 1} and 0.72 < (codes == 0).mean() < 0.78


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rows": 0}, "rows"),
        ({"days": 0}, "days"),
        ({"covariate_drift": -0.1}, "covariate_drift"),
        ({"start": datetime(2024, 1, 1)}, "timezone"),
    ],
)
def test_check_options(options: dict, message: str) -> None:
    given = {"rows": 10, "days": 1, "start": START, "covariate_drift": 0.0, **options}
    with pytest.raises(ValueError, match=message):
        sample.check_options(**given)
