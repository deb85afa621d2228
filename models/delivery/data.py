"""Synthetic food-delivery orders: the delivery model's sample-data generator (its contract is contract.py).

Deterministic for a seed at any size, with a learnable label and the same fault switches as the
fraud generator (covariate drift, label shift, out-of-range values, missing values, a missing
column, wrong types). Vectorised numpy; nothing is downloaded.

An order's own fields (distance, items, hour, vehicle, weather) arrive with the order.
The restaurant's features (orders_last_1h, avg_delivery_30d, restaurant_age_days) describe the
restaurant as of the order and are computed from its own earlier orders, strictly before the
order's time (`loopform.sample.trailing`): what the feature store serves by restaurant id.

Each active restaurant takes orders as a Poisson stream at about `RATE_PER_DAY` (scaled by a
popularity trait) with lunch and dinner peaks. A frame is a window of a longer history:
`WARM_UP_DAYS` of earlier orders are generated, used for the aggregates, and not returned.
Restaurant traits (kitchen speed, delivery radius, popularity, time on the platform) come from a
fixed population, so two seeds are two samples of the same restaurants.

The delivery time is the kitchen's time (the restaurant's speed, slower while new, per item and
with each order of the last hour) plus the ride (distance over the vehicle's speed,
slowed by weather and by rush hours for motor vehicles) plus a handover, with a noise factor and
some minutes of noise on top.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd

from loopform import sample
from models.delivery.contract import CONTRACT

ENTITY = CONTRACT.entity
LABEL = CONTRACT.label
FEATURES = CONTRACT.features
assert CONTRACT.label_range is not None  # a regression contract declares its label's range
LABEL_LOW, LABEL_HIGH = CONTRACT.label_range

DEFAULT_START = datetime(2024, 1, 1, tzinfo=UTC)
RATE_PER_DAY = 2.0  # orders per active restaurant and day (times its popularity trait, mean 1)
WARM_UP_DAYS = 30  # history generated before `start` (not returned) so every row sees a full 30-day past
AVG_DELIVERY_NO_HISTORY = 0.0  # avg_delivery_30d of a restaurant without an order in the previous 30 days
MEAN_MINUTES = 32.0  # about the clean mean delivery time: label_shift s adds s x MEAN_MINUTES minutes
_DAY = 86_400
_HOUR = 3_600
_POPULATION_SEED = 20240102  # restaurant traits: the same restaurants whatever the seed
_HOURS = np.arange(24)
_HOUR_P = 0.03 + np.exp(-0.5 * ((_HOURS - 12.5) / 1.5) ** 2) + 1.3 * np.exp(-0.5 * ((_HOURS - 19.0) / 1.8) ** 2)
_RUSH_HOURS = (12, 13, 18, 19, 20)
_WEATHER_P = {"clean": (0.45, 0.30, 0.18, 0.07), "drift": (0.15, 0.25, 0.40, 0.20)}
_VEHICLE_DRIFT_P = (0.6, 0.3, 0.1)  # drift: more bicycles
_SPEED_KMH = np.array([14.0, 24.0, 30.0])  # by vehicle (the contract's order), in clear weather
_WEATHER_SLOWDOWN = np.array([[1.0, 1.0, 1.0], [0.97, 0.97, 0.97], [0.75, 0.85, 0.85], [0.5, 0.65, 0.65]])
_HANDOVER_MIN = 3.0
_PER_ITEM = 0.10  # share of the kitchen time each item beyond the first adds
_PER_RECENT_ORDER_MIN = 2.0  # minutes each order of the last hour adds (the kitchen's queue)
_UNLISTED = {"vehicle": "drone", "weather": "hail"}  # out-of-list values


def generate(
    rows: int,
    seed: int,
    *,
    start: datetime | None = None,
    days: int = 30,
    restaurants: int | None = None,
    covariate_drift: float = 0.0,
    label_shift: float = 0.0,
    out_of_range: float = 0.0,
    missing_values: float = 0.0,
    missing_column: str | None = None,
    wrong_types: str | None = None,
) -> pd.DataFrame:
    """Orders sorted by time, many per restaurant, with the contract's columns and the requested faults.

    restaurants: size of the restaurant population (default: as many as give each about RATE_PER_DAY
        orders a day, so the aggregates have the same distribution at any frame size); restaurant k
        has the same traits in every data set, so clean frames of one size hold the same restaurants
        whatever the seed. The active restaurants are a seeded sample of a larger population.
    covariate_drift: strength s >= 0 (0.8 is a clear shift; mixes move fully at s >= 1): distances
        x(1+s/2), more items, restaurants busier ((1+s) times the orders each, so more orders in the
        last hour), wetter weather, more bicycles. The relationship changes too (a concept shift a
        retrained model can learn): congestion slows cars and scooters (by 1/1.4 at s >= 1) and
        kitchens take longer per item.
    label_shift: adds label_shift x MEAN_MINUTES minutes to every delivery (the restaurants' 30-day
        averages follow, since they are computed from the deliveries).
    out_of_range: share of values of every feature put outside its range or category list.
    missing_values: share of values of every feature set missing (int features become float64).
    missing_column: a column to drop. wrong_types: a column stored with the wrong type.
    """
    start = start or DEFAULT_START
    sample.check_options(rows, days, start, covariate_drift)
    faults = sample.Faults(
        out_of_range=out_of_range, missing_values=missing_values, missing_column=missing_column, wrong_types=wrong_types
    )
    if not LABEL_LOW < MEAN_MINUTES * (1.0 + label_shift) < LABEL_HIGH:
        raise ValueError(f"label_shift {label_shift} moves the mean delivery outside {CONTRACT.label_range}")
    nominal = max(1, round(rows / (days * RATE_PER_DAY)))
    n_restaurants = restaurants if restaurants is not None else nominal
    if n_restaurants < 1:
        raise ValueError(f"restaurants must be >= 1, got {n_restaurants}")

    rngs = sample.streams(seed)
    n_active = max(1, round(min(n_restaurants, nominal) / (1.0 + covariate_drift)))
    cols = _base(rngs["base"], rows, n_restaurants, n_active, days)
    if covariate_drift > 0:
        _drift(rngs["drift"], cols, covariate_drift)
    _label(cols, covariate_drift, label_shift)
    window = cols.pop("_window")
    cols = {name: values[window] for name, values in cols.items()}
    return sample.events_frame(
        CONTRACT, cols, cols["_seconds"], seed=seed, start=start, id_prefix="ord", faults=faults, unlisted=_UNLISTED
    )


def _population(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Restaurant traits (days on the platform at the default start, kitchen minutes, radius km, popularity)."""
    age_rng, kitchen_rng, radius_rng, popularity_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(_POPULATION_SEED).spawn(4)
    )
    age = np.minimum(np.floor(age_rng.gamma(1.5, 300.0, n)), 15_000).astype(np.int64)
    return (
        age,
        kitchen_rng.gamma(6.0, 2.5, n),
        radius_rng.lognormal(np.log(3.0), 0.3, n),
        popularity_rng.gamma(2, 0.5, n),
    )


def _base(rng: np.random.Generator, rows: int, n_restaurants: int, n_active: int, days: int) -> dict[str, np.ndarray]:
    """Clean order columns (unsorted) of the window and its warm-up history; categorical as codes."""
    age, kitchen, radius, popularity = _population(n_restaurants)
    warm_rows = round(rows * WARM_UP_DAYS / days)
    n = rows + warm_rows
    active = rng.permutation(n_restaurants)[:n_active]
    first_day = np.concatenate([np.zeros(rows, np.int64), np.full(warm_rows, -WARM_UP_DAYS, np.int64)])
    span = np.concatenate([np.full(rows, days, np.int64), np.full(warm_rows, WARM_UP_DAYS, np.int64)])
    cdf = np.cumsum(popularity[active]) / popularity[active].sum()
    restaurant = active[np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), n_active - 1)]
    day = first_day + np.floor(rng.random(n) * span).astype(np.int64)
    hour = sample.draw(rng, _HOUR_P, n)
    seconds = day * _DAY + hour * _HOUR + rng.integers(0, _HOUR, n)
    distance = np.minimum(radius[restaurant] * rng.lognormal(0.0, 0.6, n), 25.0)  # the delivery area
    items = 1 + rng.poisson(1.2, n)
    weather = sample.draw(rng, _WEATHER_P["clean"], n)
    p_car = 0.7 / (1.0 + np.exp(-(distance - 4.0) / 1.5))
    p_bicycle = (1.0 - p_car) * np.where(distance < 3.0, 0.6, 0.25)
    u = rng.random(n)
    vehicle = np.where(u < p_car, 2, np.where(u < p_car + p_bicycle, 0, 1))
    noise = rng.lognormal(0.0, 0.08, n)
    jitter = rng.normal(0.0, 2.5, n)
    opened = age[restaurant] + day >= 0  # no order before the restaurant joined (only warm-up days precede it)
    cols = {
        ENTITY: restaurant.astype(np.int64) + 10_000,
        "_seconds": seconds,
        "_window": np.arange(n) < rows,
        "_kitchen": kitchen[restaurant],
        "_noise": noise,
        "_jitter": jitter,
        "distance_km": distance,
        "items": items,
        "hour_of_day": hour,
        "restaurant_age_days": age[restaurant] + day,
        "vehicle": vehicle.astype(np.int64),
        "weather": weather,
    }
    return {name: values[opened] for name, values in cols.items()}


def _drift(rng: np.random.Generator, cols: dict[str, np.ndarray], s: float) -> None:
    """Covariate drift of strength s: longer trips, bigger orders, wetter weather, more bicycles."""
    n = cols["distance_km"].shape[0]
    mix = min(s, 1.0)
    cols["distance_km"] = cols["distance_km"] * (1.0 + 0.5 * s)
    cols["items"] = cols["items"] + rng.poisson(0.5 * s, n)
    cols["weather"] = np.where(rng.random(n) < 0.6 * mix, sample.draw(rng, _WEATHER_P["drift"], n), cols["weather"])
    cols["vehicle"] = np.where(rng.random(n) < 0.5 * mix, sample.draw(rng, _VEHICLE_DRIFT_P, n), cols["vehicle"])


def _label(cols: dict[str, np.ndarray], drift: float, label_shift: float) -> None:
    """Delivery minutes from the (drifted) orders, then the restaurant aggregates computed from them."""
    mix = min(drift, 1.0)
    cols["distance_km"] = np.round(np.clip(cols["distance_km"], 0.1, 99.0), 2)
    cols["items"] = np.minimum(cols["items"], 49)
    (recent,) = sample.trailing(cols[ENTITY], cols["_seconds"], None, (_HOUR,))  # the kitchen's queue
    cols["orders_last_1h"] = np.minimum(recent.count, 499)
    newcomer = 1.0 + 0.3 * np.exp(-np.maximum(cols["restaurant_age_days"], 0) / 90.0)
    per_item = _PER_ITEM + 0.1 * mix  # drift: bigger, slower dishes
    kitchen = cols.pop("_kitchen") * newcomer * (1.0 + per_item * (cols["items"] - 1))
    kitchen = kitchen + _PER_RECENT_ORDER_MIN * cols["orders_last_1h"]
    vehicle, weather = cols["vehicle"], cols["weather"]
    motor = vehicle > 0
    rush = np.isin(cols["hour_of_day"], _RUSH_HOURS) & motor
    congestion = np.where(motor, 1.0 + 0.4 * mix, 1.0)  # drift: a new traffic scheme slows motor vehicles
    speed = _SPEED_KMH[vehicle] * _WEATHER_SLOWDOWN[weather, vehicle] * np.where(rush, 0.75, 1.0) / congestion
    ride = cols["distance_km"] / speed * 60.0 + _HANDOVER_MIN
    minutes = (kitchen + ride) * cols.pop("_noise") + cols.pop("_jitter") + label_shift * MEAN_MINUTES
    cols[LABEL] = np.round(np.clip(minutes, LABEL_LOW, LABEL_HIGH), 1)
    (month,) = sample.trailing(
        cols[ENTITY], cols["_seconds"], cols[LABEL], (30 * _DAY,), decimals=1, empty=AVG_DELIVERY_NO_HISTORY
    )
    cols["avg_delivery_30d"] = np.round(month.mean, 2)
