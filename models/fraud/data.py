"""Synthetic card-transaction fraud data: the fraud model's sample-data generator (its contract is contract.py).

The generator is the loop's stand-in for a data lake: deterministic for a seed at any size,
with a learnable label and switches that inject the faults the gates must catch (covariate
drift, out-of-range values, missing values, a missing column, wrong types, label shift).
Everything is vectorised numpy so a million rows take a few seconds, and nothing is downloaded.

Features come at two levels (`Feature.scope`: "event" and "entity"). A transaction's own fields (amount, hour,
distance, merchant, channel, is_foreign) arrive with the transaction: in the request at
serving, in the labelled event at training. Card-level features (txn_count_24h,
avg_amount_30d, card_age_days) describe the card as of the transaction and are computed from
the card's own earlier transactions, strictly before the event time: they are what the
feature store serves by card id and joins point-in-time for training.

Each card transacts as a Poisson stream at about `RATE_PER_DAY` (scaled by a per-card
activity trait), so the aggregates have the same distribution at any frame size. A frame is
a window of a longer history: `WARM_UP_DAYS` of earlier transactions are generated, used for
the aggregates, and not returned, so the first rows of a frame see a full 30-day past.

Labels are drawn first (fraud rate `BASE_FRAUD_RATE`, moved by `label_shift`), then the
transaction given the label: fraud comes in short episodes on (preferably young) cards, a
few transactions minutes apart, so the card's own history carries signal (txn_count_24h)
without being drawn from the label. That keeps `label_shift` a prior shift of the
transaction fields (P(y) changes, P(x | y) of the transaction's own fields does not) and
`covariate_drift` a change of P(x) for both classes. Each fault draws from its own random
stream, so switching one on leaves the clean draws identical.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd

from loopform import sample
from loopform.contract import fingerprint  # noqa: F401  (re-exported for callers of the generator)
from models.fraud.contract import CONTRACT

ENTITY = CONTRACT.entity
TIMESTAMP = CONTRACT.timestamp
LABEL = CONTRACT.label
ID = CONTRACT.id
FEATURES = CONTRACT.features
FEATURE_NAMES = CONTRACT.feature_names
NUMERIC = CONTRACT.numeric
CATEGORICAL = CONTRACT.categorical
BY_NAME = CONTRACT.by_name
#: The transaction's own fields: in the request at serving, in the labelled event at training.
TRANSACTION_FEATURES = CONTRACT.event_features
#: The card as of the transaction, from its earlier transactions: read from the feature store by card id.
CARD_FEATURES = CONTRACT.entity_features
COLUMNS = CONTRACT.columns

BASE_FRAUD_RATE = 0.03
DEFAULT_START = datetime(2024, 1, 1, tzinfo=UTC)
MIN_CARDS = 2000
RATE_PER_DAY = 0.5  # transactions per active card and day (times the card's activity trait, mean 1)
WARM_UP_DAYS = 30  # history generated before `start` (not returned) so every row sees a full 30-day past
AVG_AMOUNT_NO_HISTORY = 0.0  # avg_amount_30d of a card with no transaction in the previous 30 days
_DAY = 86_400
_EPISODE_EXTRA = 1.0  # a fraud episode has 1 + Poisson(_EPISODE_EXTRA) transactions ...
_EPISODE_GAP_S = 1_800.0  # ... about half an hour apart
# Card traits come from a fixed population (not from `seed`): two data sets of different seeds are
# two samples of the same bank's cards, so clean samples do not drift against each other.
_POPULATION_SEED = 20240101


# Class-conditional mixes (legitimate, fraud) and the mix covariate drift moves towards.
_MERCHANT_P = {
    "legit": (0.24, 0.17, 0.12, 0.08, 0.08, 0.09, 0.05, 0.12, 0.04, 0.01),
    "fraud": (0.07, 0.06, 0.06, 0.03, 0.02, 0.08, 0.12, 0.28, 0.19, 0.09),
    "drift": (0.08, 0.10, 0.05, 0.05, 0.05, 0.12, 0.15, 0.25, 0.12, 0.03),
}
_CHANNEL_P = {
    "legit": (0.40, 0.30, 0.10, 0.17, 0.03),
    "fraud": (0.15, 0.12, 0.13, 0.45, 0.15),
    "drift": (0.15, 0.20, 0.05, 0.55, 0.05),
}
_TESTING_MERCHANT, _TESTING_CHANNEL = 2, 2  # where card testing happens once fraud changes tactics (drift)
_HOURS = np.arange(24)
_DAY_CURVE = np.exp(-0.5 * ((_HOURS - 14.0) / 4.5) ** 2) + 0.05
_NIGHT_CURVE = np.exp(-0.5 * ((np.minimum(_HOURS, 24 - _HOURS) - 2.0) / 3.0) ** 2) + 0.15
_HOUR_P = {"legit": _DAY_CURVE / _DAY_CURVE.sum(), "fraud": (0.55 * _NIGHT_CURVE / _NIGHT_CURVE.sum())}
_HOUR_P["fraud"] = _HOUR_P["fraud"] + 0.45 * _HOUR_P["legit"]
_HOUR_P["drift"] = _NIGHT_CURVE / _NIGHT_CURVE.sum()
_UNLISTED = {"merchant_category": "crypto_exchange", "channel": "telephone"}  # out-of-list values


def generate(
    rows: int,
    seed: int,
    *,
    start: datetime | None = None,
    days: int = 30,
    cards: int | None = None,
    covariate_drift: float = 0.0,
    out_of_range: float = 0.0,
    missing_column: str | None = None,
    wrong_types: str | None = None,
    label_shift: float = 0.0,
    missing_values: float = 0.0,
) -> pd.DataFrame:
    """Card transactions sorted by time, several per card, with the requested faults injected.

    cards: size of the card population (default max(2000, rows / (days * RATE_PER_DAY))); card k
        has the same traits in every data set, whatever the seed. The frame's active cards are a
        seeded sample of it, as many as give each about RATE_PER_DAY transactions a day (all of a
        smaller population, which then transacts more often).

    txn_count_24h, avg_amount_30d and card_age_days are computed from each card's own history,
    strictly before each transaction (see `card_aggregates`), including WARM_UP_DAYS of history
    before `start` that is generated but not returned.

    covariate_drift: strength >= 0 (0.5 is a clear shift): amount x(1+s), distance x(1+2s), cards
        transacting (1+s) times as often (more 24 h transactions), more night hours, more foreign
        merchants, merchant/channel mix moved towards online (mix moves fully at s >= 1). The
        card-level features follow from the drifted history (avg_amount_30d grows with amounts).
        Fraud also changes tactics (a concept shift): half the frauds become card testing, small amounts near
        home at one merchant category through one channel, which a model of the old fraud does not know.
    out_of_range: share of values of every feature put outside its schema range (numeric) or
        outside its category list (categorical).
    missing_column: a column to drop. wrong_types: a column to store with the wrong type
        (numbers as strings, strings as integer codes, timestamps as ISO strings).
    label_shift: added to the fraud rate (0.03 + label_shift must stay in (0, 1)).
    missing_values: share of values of every feature set missing (int features become float64).
    """
    start = start or DEFAULT_START
    sample.check_options(rows, days, start, covariate_drift)
    faults = sample.Faults(
        out_of_range=out_of_range, missing_values=missing_values, missing_column=missing_column, wrong_types=wrong_types
    )
    rate = BASE_FRAUD_RATE + label_shift
    if not 0.0 < rate < 1.0:
        raise ValueError(f"label_shift {label_shift} moves the fraud rate to {rate}, outside (0, 1)")
    nominal = max(1, round(rows / (days * RATE_PER_DAY)))  # active cards at the nominal rate
    n_cards = cards if cards is not None else max(MIN_CARDS, nominal)
    if n_cards < 1:
        raise ValueError(f"cards must be >= 1, got {n_cards}")

    rngs = sample.streams(seed)
    # Drift makes the active cards (a prefix of the clean frame's) transact (1 + s) times as often.
    n_active = max(1, round(min(n_cards, nominal) / (1.0 + covariate_drift)))
    cols = _base(rngs["base"], rows, n_cards, n_active, rate, days)
    if covariate_drift > 0:
        _drift(rngs["drift"], cols, covariate_drift)
    _history_features(cols)
    window = cols.pop("_window")
    cols = {name: values[window] for name, values in cols.items()}
    return sample.events_frame(
        CONTRACT, cols, cols["_ts_seconds"], seed=seed, start=start, id_prefix="tx", faults=faults, unlisted=_UNLISTED
    )


def card_aggregates(cards: np.ndarray, seconds: np.ndarray, amounts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(txn_count_24h, avg_amount_30d) of each transaction from its card's transactions strictly before it.

    cards: card ids; seconds: event times in seconds (any common origin); amounts: amounts with at most
    two decimals. A transaction counts for another of its card at time t when its own time is in
    [t - 24 h, t) (respectively [t - 30 days, t)): never itself, nor one at the same instant or later.
    avg_amount_30d is AVG_AMOUNT_NO_HISTORY without such a transaction (see `loopform.sample.trailing`).
    """
    day, month = sample.trailing(cards, seconds, amounts, (_DAY, 30 * _DAY), decimals=2, empty=AVG_AMOUNT_NO_HISTORY)
    return day.count, np.round(month.mean, 2)


def _history_features(cols: dict[str, np.ndarray]) -> None:
    """The card-level columns from the (drifted) history: aggregates before each transaction, card age."""
    seconds = cols["_ts_seconds"]
    count_24h, avg_30d = card_aggregates(cols[ENTITY], seconds, cols["amount"])
    cols["txn_count_24h"] = np.minimum(count_24h, 499)
    cols["avg_amount_30d"] = np.minimum(avg_30d, 49_999.0)
    cols["card_age_days"] = cols.pop("_issue_age") + np.floor_divide(seconds, _DAY)


def _base(
    rng: np.random.Generator, rows: int, n_cards: int, n_active: int, rate: float, days: int
) -> dict[str, np.ndarray]:
    """Clean transaction columns (unsorted) of the window and its warm-up history; categorical as codes.

    The window's draws come first, so its labels do not depend on anything else (drift included).
    """
    card_age, usual, travel, activity = _population(n_cards)
    y = (rng.random(rows) < rate).astype(np.int64)
    warm_rows = round(rows * WARM_UP_DAYS / days)
    y_warm = (rng.random(warm_rows) < rate).astype(np.int64)
    active = rng.permutation(n_cards)[:n_active]
    y_all = np.concatenate([y, y_warm])
    first_day = np.concatenate([np.zeros(rows, np.int64), np.full(warm_rows, -WARM_UP_DAYS, np.int64)])
    span = np.concatenate([np.full(rows, days, np.int64), np.full(warm_rows, WARM_UP_DAYS, np.int64)])
    n = rows + warm_rows
    fraud = y_all == 1
    n_fraud = int(fraud.sum())

    # Legitimate transactions: active cards in proportion to their activity, any day, daytime hours.
    card = active[_inverse_cdf(activity[active], rng.random(n))]
    day = first_day + np.floor(rng.random(n) * span).astype(np.int64)
    hour = _choice_by_class(rng, fraud, _HOUR_P["legit"], _HOUR_P["fraud"])
    seconds = day * _DAY + hour * 3_600 + rng.integers(0, 3_600, n)

    # Fraud comes in episodes: a (preferably young) card, a few transactions about half an hour apart.
    young = 1.0 / (1.0 + card_age[active] / 120.0)
    sizes = 1 + rng.poisson(_EPISODE_EXTRA, n_fraud)
    episode_card = active[_inverse_cdf(young, rng.random(n_fraud))]
    gaps = rng.exponential(_EPISODE_GAP_S, n_fraud).astype(np.int64)
    if n_fraud:
        where = np.flatnonzero(fraud)
        # Fraud rows of the window and of the warm-up form separate episodes (their order in `where`).
        segment = (where >= rows).astype(np.int64)
        ends = np.cumsum(sizes)
        episode = np.searchsorted(ends, np.arange(n_fraud), side="right")
        # A new episode also starts where the segment changes.
        boundary = np.r_[True, (episode[1:] != episode[:-1]) | (segment[1:] != segment[:-1])]
        episode = np.cumsum(boundary) - 1
        head = np.flatnonzero(boundary)  # first fraud row of each episode
        offset = np.cumsum(gaps) - gaps  # time since the episode's first transaction
        offset = offset - offset[head][episode]
        starts = seconds[where][head][episode]
        end = (first_day[where] + span[where]) * _DAY - 1
        fraud_seconds = np.minimum(starts + offset, end)
        card[where] = episode_card[episode]
        seconds[where] = fraud_seconds
        hour[where] = (fraud_seconds % _DAY) // 3_600

    amount = usual[card] * rng.lognormal(0.0, 0.55, n)
    amount[fraud] = usual[card[fraud]] * rng.lognormal(0.5, 0.9, n_fraud)
    near = rng.exponential(6.0, n)
    far = rng.lognormal(np.log(250.0), 1.3, n)
    far_p = np.where(fraud, 0.28, 0.03 + travel[card])
    distance = np.where(rng.random(n) < far_p, far, near)
    foreign_p = np.where(distance > 600.0, 0.7, np.where(fraud, 0.08, travel[card] / 2))
    is_foreign = (rng.random(n) < foreign_p).astype(np.int64)
    merchant = _choice_by_class(rng, fraud, _MERCHANT_P["legit"], _MERCHANT_P["fraud"])
    channel = _choice_by_class(rng, fraud, _CHANNEL_P["legit"], _CHANNEL_P["fraud"])

    # No transaction before the card was issued (only warm-up days can precede it).
    issued = card_age[card] + np.floor_divide(seconds, _DAY) >= 0
    cols = {
        ENTITY: card.astype(np.int64) + 100_000,
        "_ts_seconds": seconds,
        "_window": np.arange(n) < rows,
        "_issue_age": card_age[card],
        "amount": np.round(np.clip(amount, 0.01, 49_999.0), 2),
        "hour_of_day": hour.astype(np.int64),
        "distance_from_home_km": np.round(np.clip(distance, 0.0, 19_999.0), 3),
        "is_foreign": is_foreign,
        "merchant_category": merchant,
        "channel": channel,
        LABEL: y_all,
    }
    return {name: values[issued] for name, values in cols.items()}


def _inverse_cdf(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Indices drawn in proportion to `weights` from uniforms `u` (one uniform per draw, whatever the size)."""
    cdf = np.cumsum(weights, dtype=np.float64)
    return np.minimum(np.searchsorted(cdf / cdf[-1], u, side="right"), len(weights) - 1)


def _population(n_cards: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Card-level traits (issue age, usual spend, travel habit, activity); card k is the same at any n_cards."""
    age_rng, spend_rng, travel_rng, activity_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(_POPULATION_SEED).spawn(4)
    )
    card_age = np.minimum(np.floor(age_rng.gamma(1.6, 600.0, n_cards)), 15_000).astype(np.int64)
    activity = activity_rng.gamma(2.0, 0.5, n_cards)
    return card_age, spend_rng.lognormal(3.6, 0.7, n_cards), travel_rng.beta(1.0, 25.0, n_cards), activity


def _choice_by_class(rng: np.random.Generator, fraud: np.ndarray, p_legit: tuple | np.ndarray, p_fraud) -> np.ndarray:
    """Vectorised categorical draw with class-dependent probabilities (inverse CDF)."""
    u = rng.random(fraud.shape[0])
    legit = np.searchsorted(np.cumsum(p_legit) / np.sum(p_legit), u, side="right")
    bad = np.searchsorted(np.cumsum(p_fraud) / np.sum(p_fraud), u, side="right")
    return np.minimum(np.where(fraud, bad, legit), len(p_legit) - 1).astype(np.int64)


def _drift(rng: np.random.Generator, cols: dict[str, np.ndarray], s: float) -> None:
    """Covariate drift of strength s: several numeric shifts plus a category-mix change."""
    n = cols[LABEL].shape[0]
    mix = min(s, 1.0)
    cols["amount"] = np.round(np.clip(cols["amount"] * (1.0 + s), 0.01, 49_999.0), 2)
    cols["distance_from_home_km"] = np.round(np.clip(cols["distance_from_home_km"] * (1.0 + 2.0 * s), 0, 19_999.0), 3)
    night = rng.random(n) < 0.4 * mix
    new_hour = np.searchsorted(np.cumsum(_HOUR_P["drift"]), rng.random(n), side="right").clip(0, 23)
    hour = np.where(night, new_hour, cols["hour_of_day"])
    # Keep the timestamp consistent with the new hour.
    cols["_ts_seconds"] = cols["_ts_seconds"] + (hour - cols["hour_of_day"]) * 3_600
    cols["hour_of_day"] = hour
    cols["is_foreign"] = np.where(rng.random(n) < 0.3 * mix, 1, cols["is_foreign"])
    for name, probs in (("merchant_category", _MERCHANT_P["drift"]), ("channel", _CHANNEL_P["drift"])):
        redraw = rng.random(n) < 0.6 * mix
        cols[name] = np.where(redraw, sample.draw(rng, probs, n), cols[name])
    # Fraud changes tactics too (a concept shift a retrained model can learn and the old one cannot):
    # card testing, small amounts near home at one merchant category through one channel.
    testing = (cols[LABEL] == 1) & (rng.random(n) < 0.5 * mix)
    cols["amount"] = np.where(testing, np.round(np.clip(rng.lognormal(1.5, 0.5, n), 0.01, None), 2), cols["amount"])
    cols["distance_from_home_km"] = np.where(
        testing, np.round(rng.exponential(3.0, n), 3), cols["distance_from_home_km"]
    )
    cols["is_foreign"] = np.where(testing, 0, cols["is_foreign"])
    cols["merchant_category"] = np.where(testing, _TESTING_MERCHANT, cols["merchant_category"])
    cols["channel"] = np.where(testing, _TESTING_CHANNEL, cols["channel"])
