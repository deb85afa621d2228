"""The synthetic fraud data: schema, determinism, learnability and every fault switch."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from models.fraud.data import (
    AVG_AMOUNT_NO_HISTORY,
    BASE_FRAUD_RATE,
    BY_NAME,
    CARD_FEATURES,
    CATEGORICAL,
    COLUMNS,
    ENTITY,
    FEATURE_NAMES,
    FEATURES,
    ID,
    LABEL,
    NUMERIC,
    TIMESTAMP,
    TRANSACTION_FEATURES,
    card_aggregates,
    fingerprint,
    generate,
)


@pytest.fixture(scope="module")
def clean() -> pd.DataFrame:
    return generate(20_000, 7)


def test_schema_and_dtypes(clean: pd.DataFrame) -> None:
    assert tuple(clean.columns) == COLUMNS
    assert clean[ID].is_unique
    assert clean[ENTITY].dtype == np.int64
    assert isinstance(clean[TIMESTAMP].dtype, pd.DatetimeTZDtype) and str(clean[TIMESTAMP].dt.tz) == "UTC"
    assert clean[TIMESTAMP].is_monotonic_increasing
    assert set(clean[LABEL].unique()) == {0, 1}
    assert set(NUMERIC) | set(CATEGORICAL) == set(FEATURE_NAMES) and 8 <= len(FEATURES) <= 10
    for f in FEATURES:
        column = clean[f.name]
        assert column.notna().all()
        if f.kind == "numeric":
            assert column.dtype == np.dtype(f.dtype)
            assert column.min() >= f.min and column.max() <= f.max
        else:
            assert set(column.unique()) <= set(f.categories or ())
    assert (clean[TIMESTAMP].dt.hour == clean["hour_of_day"]).all()
    # Two levels: the transaction's own fields, and the card as of the transaction.
    assert set(TRANSACTION_FEATURES) | set(CARD_FEATURES) == set(FEATURE_NAMES)
    assert not set(TRANSACTION_FEATURES) & set(CARD_FEATURES)
    assert set(CARD_FEATURES) == {"txn_count_24h", "avg_amount_30d", "card_age_days"}


def test_deterministic_for_a_seed() -> None:
    a, b = generate(3_000, 42), generate(3_000, 42)
    pd.testing.assert_frame_equal(a, b)
    assert fingerprint(a) == fingerprint(b)
    other = generate(3_000, 43)
    assert fingerprint(other) != fingerprint(a)
    assert not set(other[ID]) & set(a[ID])


def test_fingerprint_sees_every_change(clean: pd.DataFrame) -> None:
    base = fingerprint(clean)
    changed = clean.copy()
    changed.loc[5, "amount"] += 0.01
    assert fingerprint(changed) != base
    assert fingerprint(clean.astype({"hour_of_day": "float64"})) != base
    assert fingerprint(clean.rename(columns={"channel": "chan"})) != base
    assert fingerprint(clean.copy()) == base


def test_many_rows_per_card_over_time(clean: pd.DataFrame) -> None:
    per_card = clean.groupby(ENTITY).size()
    assert per_card.median() >= 5
    span = clean[TIMESTAMP].max() - clean[TIMESTAMP].min()
    assert pd.Timedelta(days=25) < span <= pd.Timedelta(days=30)
    start = datetime(2025, 6, 1, tzinfo=UTC)
    later = generate(500, 1, start=start, days=2)
    assert later[TIMESTAMP].min() >= pd.Timestamp(start) and later[TIMESTAMP].max() < pd.Timestamp(
        start
    ) + pd.Timedelta(days=2)


def test_fraud_rate_and_learnable_label(clean: pd.DataFrame) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    assert 0.02 <= clean[LABEL].mean() <= 0.05

    def matrix(df: pd.DataFrame) -> pd.DataFrame:
        x = df[list(NUMERIC)].astype(float)
        return x.join(
            pd.DataFrame({c: pd.Categorical(df[c], categories=BY_NAME[c].categories).codes for c in CATEGORICAL})
        )

    test = generate(20_000, 8)
    model = HistGradientBoostingClassifier(random_state=0).fit(matrix(clean), clean[LABEL])
    auc = roc_auc_score(test[LABEL], model.predict_proba(matrix(test))[:, 1])
    assert 0.85 <= auc <= 0.97


def test_faults_leave_the_rest_identical() -> None:
    base = generate(5_000, 3)
    drifted = generate(5_000, 3, covariate_drift=0.5)
    # Drift changes how the cards behave (fewer cards, each more often), not who is fraud.
    assert drifted[LABEL].sum() == base[LABEL].sum()
    assert drifted[ENTITY].nunique() < 0.8 * base[ENTITY].nunique()
    assert drifted["amount"].mean() > 1.3 * base["amount"].mean()
    assert drifted["distance_from_home_km"].mean() > 1.5 * base["distance_from_home_km"].mean()
    assert (drifted["channel"] == "online").mean() > (base["channel"] == "online").mean() + 0.1
    # The card-level features follow from the drifted history: more 24 h transactions, larger amounts.
    assert drifted["txn_count_24h"].mean() > 1.3 * base["txn_count_24h"].mean()
    assert drifted["avg_amount_30d"].median() > 1.3 * base["avg_amount_30d"].median()
    pd.testing.assert_frame_equal(
        generate(5_000, 3, wrong_types="channel").drop(columns="channel"), base.drop(columns="channel")
    )


def test_card_aggregates_count_only_the_past() -> None:
    """By hand: windows are [t - 24 h, t) and [t - 30 days, t): never the transaction itself, a tie or the future."""
    hour, day = 3_600, 86_400
    cards = np.array([1, 1, 1, 1, 1, 2, 1])
    seconds = np.array([0, 10 * hour, 24 * hour, 24 * hour, 31 * day, 5 * hour, 40 * day])
    amounts = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 99.99, 60.0])
    count, mean = card_aggregates(cards, seconds, amounts)
    # Card 1: t=0 has no past; t=10h sees t=0; the two at t=24h see t=0 (exactly 24 h back) and t=10h but
    # not each other; t=31d sees nothing within 24 h and, over 30 days, only the two at t=24h; t=40d sees t=31d.
    assert count.tolist() == [0, 1, 2, 2, 0, 0, 0]
    assert mean.tolist() == [AVG_AMOUNT_NO_HISTORY, 10.0, 15.0, 15.0, 35.0, AVG_AMOUNT_NO_HISTORY, 50.0]
    # Order of the input does not matter.
    flip = np.arange(len(cards))[::-1]
    count_flipped, mean_flipped = card_aggregates(cards[flip], seconds[flip], amounts[flip])
    assert count_flipped[flip].tolist() == count.tolist() and mean_flipped[flip].tolist() == mean.tolist()


def test_card_features_do_not_depend_on_the_frame_size() -> None:
    """A day of traffic and a month of history show the same card-level distributions (warm-up history)."""
    month = generate(20_000, 7)
    day = generate(2_000, 9, start=datetime(2024, 3, 1, tzinfo=UTC), days=1)
    assert abs(month["txn_count_24h"].mean() - day["txn_count_24h"].mean()) < 0.1
    assert abs(month["avg_amount_30d"].median() / day["avg_amount_30d"].median() - 1) < 0.1
    # Almost every transaction has a 30-day past, also on the first day of a frame.
    assert (day["avg_amount_30d"] == AVG_AMOUNT_NO_HISTORY).mean() < 0.01
    assert 0.5 < month["txn_count_24h"].mean() < 1.2


def test_fraud_shows_in_the_card_history() -> None:
    """Fraud comes in episodes on young cards: the card-level features carry signal without being drawn from y."""
    df = generate(40_000, 12)
    fraud, legit = df[df[LABEL] == 1], df[df[LABEL] == 0]
    assert fraud["txn_count_24h"].mean() > 1.4 * legit["txn_count_24h"].mean()
    assert fraud["card_age_days"].median() < 0.8 * legit["card_age_days"].median()


def test_out_of_range_values() -> None:
    df = generate(10_000, 4, out_of_range=0.05)
    for f in FEATURES:
        if f.kind == "numeric":
            share = ((df[f.name] < f.min) | (df[f.name] > f.max)).mean()
        else:
            share = (~df[f.name].isin(f.categories or ())).mean()
        assert 0.03 < share < 0.07, f.name
        assert df[f.name].dtype == (np.dtype(f.dtype) if f.kind == "numeric" else np.dtype(object))


def test_missing_column_and_wrong_types() -> None:
    assert "amount" not in generate(100, 1, missing_column="amount").columns
    wrong = generate(100, 1, wrong_types="amount")
    assert wrong["amount"].dtype == object and isinstance(wrong["amount"].iloc[0], str)
    assert float(wrong["amount"].iloc[0]) == generate(100, 1)["amount"].iloc[0]
    assert pd.api.types.is_integer_dtype(generate(100, 1, wrong_types="channel")["channel"])
    assert generate(100, 1, wrong_types=TIMESTAMP)[TIMESTAMP].dtype == object
    with pytest.raises(ValueError, match="not a column"):
        generate(100, 1, missing_column="nope")
    with pytest.raises(ValueError, match="not a column"):
        generate(100, 1, wrong_types="nope")


def test_label_shift_is_a_prior_shift() -> None:
    base = generate(40_000, 5)
    shifted = generate(40_000, 5, label_shift=0.1)
    assert abs(base[LABEL].mean() - BASE_FRAUD_RATE) < 0.005
    assert abs(shifted[LABEL].mean() - (BASE_FRAUD_RATE + 0.1)) < 0.01
    # P(x | y) unchanged: the fraud rows look alike in both sets.
    for column in ("amount", "distance_from_home_km"):
        a, b = base.loc[base[LABEL] == 1, column].median(), shifted.loc[shifted[LABEL] == 1, column].median()
        assert abs(a - b) / a < 0.15, column


def test_missing_values() -> None:
    df = generate(10_000, 6, missing_values=0.1)
    for f in FEATURES:
        assert 0.08 < df[f.name].isna().mean() < 0.12
    assert df["hour_of_day"].dtype == np.float64


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rows": 0},
        {"days": 0},
        {"covariate_drift": -1},
        {"out_of_range": 1.5},
        {"label_shift": 0.98},
        {"label_shift": -0.03},
    ],
)
def test_bad_arguments(kwargs: dict) -> None:
    args = {"rows": 10, "seed": 1, **kwargs}
    with pytest.raises(ValueError):
        generate(**args)


def test_naive_start_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        generate(10, 1, start=datetime(2024, 1, 1))
