"""The delivery-time regressor: its generator, its restaurant features, training, evaluation and storage."""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from loopform import registry
from loopform.contract import fingerprint
from loopform.evaluation import evaluate, time_split
from models.delivery import data
from models.delivery.contract import CONTRACT
from models.delivery.model import DeliveryModel
from models.delivery.train import train

LABEL, TIMESTAMP, ENTITY = CONTRACT.label, CONTRACT.timestamp, CONTRACT.entity


@pytest.fixture(scope="module")
def split() -> tuple[pd.DataFrame, pd.DataFrame]:
    return time_split(data.generate(20_000, 11), TIMESTAMP)


@pytest.fixture(scope="module")
def model(split) -> DeliveryModel:
    return train(split[0], seed=5)


def _same_weights(a: DeliveryModel, b: DeliveryModel) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_generator_is_deterministic_and_within_the_contract(split):
    df = data.generate(3_000, 4)
    assert fingerprint(df) == fingerprint(data.generate(3_000, 4))
    assert fingerprint(df) != fingerprint(data.generate(3_000, 5))
    assert tuple(df.columns) == CONTRACT.columns and len(df) == 3_000
    assert df[CONTRACT.id].is_unique and df[ENTITY].dtype == np.int64
    assert isinstance(df[TIMESTAMP].dtype, pd.DatetimeTZDtype) and df[TIMESTAMP].is_monotonic_increasing
    assert (df[TIMESTAMP].dt.hour == df["hour_of_day"]).all()
    for f in CONTRACT.features:
        column = df[f.name]
        assert column.notna().all()
        if f.kind == "numeric":
            assert column.dtype == np.dtype(f.dtype) and column.min() >= f.min and column.max() <= f.max
        else:
            assert set(column) == set(f.categories or ())
    low, high = CONTRACT.label_range or (0, 0)
    assert df[LABEL].between(low, high).all() and 25 < df[LABEL].mean() < 45
    # Clean samples of different seeds are the same restaurants: their features do not drift apart.
    other = data.generate(3_000, 9)
    assert set(other[ENTITY]) == set(df[ENTITY])
    assert abs(other["avg_delivery_30d"].mean() / df["avg_delivery_30d"].mean() - 1) < 0.05


def test_restaurant_features_use_strictly_earlier_orders():
    """On a generated frame: once 30 days of the frame lie behind an order, its features are the brute-force ones."""
    df = data.generate(1_200, 3, days=31)
    seconds = (df[TIMESTAMP] - df[TIMESTAMP].min()).dt.total_seconds().to_numpy()
    origin = (df[TIMESTAMP].min() - pd.Timestamp(data.DEFAULT_START)).total_seconds()
    late = np.flatnonzero(seconds + origin >= 30 * 86_400)
    assert len(late) > 20
    for i in late:
        same = df[ENTITY].to_numpy() == df[ENTITY].iat[i]
        earlier = same & (seconds < seconds[i])
        hour = earlier & (seconds >= seconds[i] - 3_600)
        month = earlier & (seconds >= seconds[i] - 30 * 86_400)
        assert df["orders_last_1h"].iat[i] == hour.sum()
        assert df["avg_delivery_30d"].iat[i] == pytest.approx(df[LABEL].to_numpy()[month].mean(), abs=0.006)


def test_drift_and_label_shift_change_the_distribution():
    clean = data.generate(6_000, 2)
    drifted = data.generate(6_000, 2, covariate_drift=0.8)
    assert drifted["distance_km"].mean() > 1.3 * clean["distance_km"].mean()
    assert drifted["items"].mean() > clean["items"].mean() + 0.25
    assert drifted["orders_last_1h"].mean() > 1.4 * clean["orders_last_1h"].mean()
    wet = ("rain", "snow")
    assert drifted["weather"].isin(wet).mean() > clean["weather"].isin(wet).mean() + 0.1
    assert (drifted["vehicle"] == "bicycle").mean() > (clean["vehicle"] == "bicycle").mean() + 0.07
    assert drifted[LABEL].mean() > 1.2 * clean[LABEL].mean()
    shifted = data.generate(6_000, 2, label_shift=0.2)
    assert shifted[LABEL].mean() - clean[LABEL].mean() == pytest.approx(0.2 * data.MEAN_MINUTES, rel=0.05)
    assert shifted[list(CONTRACT.event_features)].equals(clean[list(CONTRACT.event_features)])


def test_faults():
    clean = data.generate(4_000, 6)
    broken = data.generate(4_000, 6, out_of_range=0.05)
    for f in CONTRACT.features:
        if f.kind == "numeric":
            outside = ((broken[f.name] < f.min) | (broken[f.name] > f.max)).mean()
        else:
            outside = (~broken[f.name].isin(f.categories or ())).mean()
        assert 0.03 < outside < 0.07, f.name
    holes = data.generate(4_000, 6, missing_values=0.1)
    assert all(0.07 < holes[name].isna().mean() < 0.13 for name in CONTRACT.feature_names)
    assert holes[LABEL].equals(clean[LABEL])
    assert "items" not in data.generate(500, 6, missing_column="items").columns
    assert data.generate(500, 6, wrong_types="distance_km")["distance_km"].dtype == object
    for kwargs in ({"rows": 0}, {"covariate_drift": -1}, {"label_shift": -1.5}, {"missing_values": 2}):
        with pytest.raises(ValueError):
            data.generate(**{"rows": 100, "seed": 1, **kwargs})
    with pytest.raises(ValueError, match="timezone"):
        data.generate(100, 1, start=datetime(2024, 1, 1))


def test_training_is_deterministic_for_a_seed(split):
    frame = split[0].iloc[:4_000]
    first = train(frame, seed=5, max_epochs=5)
    again = train(frame, seed=5, max_epochs=5)
    assert _same_weights(first, again)
    assert np.array_equal(first.predict(split[1]), again.predict(split[1]))
    assert not _same_weights(first, train(frame, seed=6, max_epochs=5))


def test_training_records_its_facts(split, model):
    info = model.info
    assert info["epochs"] - info["best_epoch"] == info["patience"] < info["epochs"] < 100
    assert (info["seed"], info["validation_share"], info["rows"]) == (5, 0.2, len(split[0]))
    assert info["fit_rows"] + info["validation_rows"] == info["rows"]
    assert info["label_mean"] == model.label_mean and 25 < model.label_mean < 45 and model.label_std > 5


def test_evaluation_gives_rmse_mae_r2_and_a_paired_interval(split, model):
    train_df, holdout = split
    weak = train(train_df.iloc[:1_500], seed=2, max_epochs=2)
    result = evaluate(model, holdout, CONTRACT, champion=weak, champion_version=3, bootstrap_samples=500)
    labels, predicted = holdout[LABEL].to_numpy(), model.predict(holdout)
    assert result["task"] == "regression" and result["rows"] == len(holdout)
    assert result["rmse"] == pytest.approx(math.sqrt(np.mean((predicted - labels) ** 2)))
    assert result["mae"] == pytest.approx(np.mean(np.abs(predicted - labels)))
    assert result["label_mean"] == model.info["label_mean"]
    assert result["rmse_low"] < result["rmse"] < result["rmse_high"] < 7.0
    assert result["mae_low"] < result["mae"] < result["mae_high"]
    assert result["r2"] > 0.7
    # The weak champion scored on the same rows: a paired interval of RMSE / champion RMSE - 1 clearly below 0.
    weak_rmse = math.sqrt(np.mean((weak.predict(holdout) - labels) ** 2))
    assert result["champion_version"] == 3 and result["champion_rmse"] == pytest.approx(weak_rmse)
    assert result["rmse_ratio"] == pytest.approx(result["rmse"] / weak_rmse - 1)
    assert result["rmse_ratio_low"] < result["rmse_ratio"] < result["rmse_ratio_high"] < 0
    same = evaluate(model, holdout, CONTRACT, champion=model, bootstrap_samples=200)
    assert same["rmse_ratio"] == same["rmse_ratio_low"] == same["rmse_ratio_high"] == 0.0


def test_a_model_retrained_on_drifted_data_beats_the_old_one_there(model):
    drifted_train, drifted_holdout = time_split(data.generate(12_000, 21, covariate_drift=0.8), TIMESTAMP)
    retrained = train(drifted_train, seed=5)
    result = evaluate(retrained, drifted_holdout, CONTRACT, champion=model, bootstrap_samples=300)
    assert result["rmse_ratio_high"] < -0.15
    assert result["r2"] > 0.7


def test_preprocessing_lives_in_the_model(split, model):
    holdout = split[1].head(200)
    expected = model.predict(holdout)
    assert np.array_equal(model.predict(holdout[list(reversed(holdout.columns))].assign(extra=1)), expected)
    odd = holdout.copy()
    odd.loc[odd.index[0], "vehicle"] = "drone"
    odd.loc[odd.index[1], "distance_km"] = np.nan
    minutes = model.predict(odd)
    assert np.isfinite(minutes).all() and np.array_equal(minutes[2:], expected[2:])
    with pytest.raises(KeyError, match="items"):
        model.predict(holdout.drop(columns=["items"]))


def test_round_trip_through_the_pickle_free_model_folder(split, model, tmp_path):
    holdout = split[1]
    folder = registry.save_model_folder(model, tmp_path / "model")
    assert not [path for path in folder.rglob("*") if path.suffix in (".pkl", ".pth") or "pickle" in path.name]
    # MLflow's pytorch flavour in the pt2 format: its model data is the torch.export archive alone, no code.
    flavour = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["pytorch"]
    assert flavour["code"] is None
    assert [path.name for path in (folder / flavour["model_data"]).iterdir()] == ["model.pt2"]
    restored = registry.load_model_folder(folder)
    assert type(restored) is DeliveryModel
    assert np.array_equal(restored.predict(holdout), model.predict(holdout))
    assert (restored.label_mean, restored.label_std, restored.info) == (model.label_mean, model.label_std, model.info)
    assert restored.preprocessing()["class"] == "models.delivery.model:DeliveryModel"
