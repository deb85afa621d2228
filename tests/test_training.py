"""Fraud model training and evaluation: determinism, early stopping, metrics, self-contained preprocessing."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from loopform import data
from models.fraud.model import FraudModel
from models.fraud.train import evaluate, expected_calibration_error, stratified_split, time_split, train


@pytest.fixture(scope="module")
def split():
    return time_split(data.generate(8000, seed=11), holdout_share=0.25)


@pytest.fixture(scope="module")
def model(split) -> FraudModel:
    return train(split[0], seed=5)


def _same_weights(a: FraudModel, b: FraudModel) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_training_is_deterministic_for_a_seed(split, model):
    again = train(split[0], seed=5)
    assert _same_weights(model, again)
    assert again.threshold == model.threshold
    assert np.array_equal(again.predict_proba(split[1]), model.predict_proba(split[1]))
    other = train(split[0], seed=6)
    assert not _same_weights(model, other)


def test_training_leaves_the_global_rng_alone(split):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(split[0].iloc[:2000], seed=1, max_epochs=2)
    assert torch.equal(torch.rand(3), expected)


def test_early_stopping_stops_after_patience(model):
    info = model.info
    assert info["epochs"] < 100, "early stopping never triggered"
    assert info["epochs"] - info["best_epoch"] == info["patience"]
    assert info["fit_rows"] + info["validation_rows"] == info["rows"]
    assert info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_model_learns_and_evaluation_is_consistent(split, model):
    holdout = split[1]
    result = evaluate(model, holdout)
    labels = holdout[data.LABEL].to_numpy()
    scores = model.predict_proba(holdout)
    assert result["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["auc"] > 0.85
    predicted = scores >= model.threshold
    assert result["precision"] == pytest.approx(labels[predicted].mean())
    assert result["recall"] == pytest.approx(predicted[labels == 1].mean())
    assert 0.0 < model.threshold < 1.0
    assert result["ece"] < 0.05  # plain BCE on the true prior keeps scores calibrated
    assert result["champion_auc"] is None and result["auc_delta"] is None


def test_threshold_maximises_f1_on_validation(split, model):
    train_df = split[0]
    _, val_idx = stratified_split(train_df[data.LABEL].to_numpy(), 0.2, seed=5)
    val = train_df.iloc[val_idx]
    labels = val[data.LABEL].to_numpy()
    scores = model.predict_proba(val)

    def f1(threshold: float) -> float:
        hit = scores >= threshold
        tp = (hit & (labels == 1)).sum()
        return 2 * tp / max(hit.sum() + (labels == 1).sum(), 1)

    best = f1(model.threshold)
    assert all(f1(t) <= best + 1e-12 for t in np.unique(scores))


def test_champion_comparison_scores_the_same_holdout(split, model):
    holdout = split[1]
    weak = train(split[0].iloc[:1500], seed=2, max_epochs=2)
    result = evaluate(model, holdout, champion=weak, champion_version=4)
    weak_auc = roc_auc_score(holdout[data.LABEL], weak.predict_proba(holdout))
    assert result["champion_version"] == 4
    assert result["champion_auc"] == pytest.approx(weak_auc)
    assert result["auc_delta"] == pytest.approx(result["auc"] - weak_auc)
    assert evaluate(model, holdout, champion=model)["auc_delta"] == 0.0


def test_preprocessing_lives_in_the_model(split, model):
    holdout = split[1].head(200)
    expected = model.predict_proba(holdout)
    shuffled = holdout[list(reversed(holdout.columns))].assign(extra=1)
    assert np.array_equal(model.predict_proba(shuffled), expected)
    restored = pickle.loads(pickle.dumps(model))
    assert np.array_equal(restored.predict_proba(holdout), expected)
    assert restored.threshold == model.threshold

    odd = holdout.copy()
    odd.loc[odd.index[0], "merchant_category"] = "never_seen"
    odd.loc[odd.index[1], "amount"] = np.nan
    scores = model.predict_proba(odd)
    assert np.isfinite(scores).all()
    assert np.array_equal(scores[2:], expected[2:])
    with pytest.raises(KeyError, match="amount"):
        model.predict_proba(holdout.drop(columns=["amount"]))


def test_expected_calibration_error():
    rng = np.random.default_rng(0)
    scores = rng.random(200_000)
    labels = (rng.random(200_000) < scores).astype(int)
    assert expected_calibration_error(labels, scores) < 0.01
    assert expected_calibration_error(np.zeros(10, dtype=int), np.full(10, 0.9)) == pytest.approx(0.9)


def test_single_class_data_is_a_clear_error(split):
    clean = split[0][split[0][data.LABEL] == 0]
    with pytest.raises(ValueError, match="both classes"):
        train(clean, seed=1)
    with pytest.raises(ValueError, match="both classes"):
        evaluate(train(split[0].iloc[:2000], seed=1, max_epochs=1), clean)
