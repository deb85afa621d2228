"""Fraud model training and evaluation: determinism, early stopping, metrics, self-contained preprocessing, and
the train step's device: the spec's GPUs or a clear failure, recorded in the evidence."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from loopform import evaluation, registry, steps
from loopform import evidence as ev
from loopform.cli import main
from loopform.evaluation import expected_calibration_error, stratified_split, time_split
from loopform.spec import load_stack, stack_file
from loopform.steps import MODEL_FOLDER, StepContext, StepFailed
from models.fraud import data
from models.fraud.model import FraudModel
from models.fraud.train import train
from tests.helpers_registry import base_rate_model

ROOT = Path(__file__).resolve().parent.parent
evaluate = partial(evaluation.evaluate_classifier, label=data.LABEL)


@pytest.fixture(scope="module")
def split():
    return time_split(data.generate(8000, seed=11), data.TIMESTAMP, holdout_share=0.25)


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
    assert result["champion_auc"] is None and result["auc_delta"] is None and result["auc_delta_low"] is None
    assert result["positives"] == labels.sum() and result["rows"] == len(holdout)
    assert result["threshold_alert_rate"] == pytest.approx(predicted.mean())


def test_evaluation_reports_intervals_brier_skill_and_the_alert_rate_view(split, model):
    train_df, holdout = split
    result = evaluate(model, holdout, training=train_df, bootstrap_samples=500, alert_rate=0.02)
    labels = holdout[data.LABEL].to_numpy()
    scores = model.predict_proba(holdout)
    # AUC interval around the point estimate; seeded, so the same inputs give the same interval.
    assert result["auc_low"] < result["auc"] < result["auc_high"]
    assert 0.005 < result["auc_high"] - result["auc_low"] < 0.2
    assert evaluate(model, holdout, training=train_df, bootstrap_samples=500, alert_rate=0.02) == result
    assert evaluate(model, holdout, training=train_df, bootstrap_samples=500, seed=1)["auc_low"] != result["auc_low"]
    assert (result["confidence"], result["bootstrap_samples"]) == (0.95, 500)
    # Brier skill against always predicting the training base rate.
    base_rate = train_df[data.LABEL].mean()
    assert result["base_rate"] == pytest.approx(base_rate) == pytest.approx(model.info["base_rate"])
    assert result["brier"] == pytest.approx(np.mean((scores - labels) ** 2))
    assert result["brier_base"] == pytest.approx(np.mean((base_rate - labels) ** 2))
    assert result["brier_skill"] == pytest.approx(1 - result["brier"] / result["brier_base"])
    assert result["brier_skill"] > 0.2
    # The top 2% of scores flagged: precision and recall there.
    k = round(0.02 * len(scores))
    top = np.argsort(-scores, kind="stable")[:k]
    assert result["alert_rate"] == 0.02
    assert result["precision_at_alert_rate"] == pytest.approx(labels[top].mean())
    assert result["recall_at_alert_rate"] == pytest.approx(labels[top].sum() / labels.sum())
    assert result["alert_threshold"] == pytest.approx(scores[top].min())
    # The operating threshold's spread over bootstrap resamples of the validation rows it was chosen on.
    assert 0 < result["threshold_low"] <= result["threshold_high"] < 1
    assert result["threshold_low"] <= model.threshold <= result["threshold_high"]
    # Without the training frame: the base rate train recorded, and no threshold interval.
    alone = evaluate(model, holdout, bootstrap_samples=200)
    assert alone["base_rate"] == model.info["base_rate"] and alone["threshold_low"] is None


def test_a_base_rate_model_has_no_skill(split, model):
    """Always predicting the base rate: near-perfect calibration, AUC 0.5, Brier skill 0, precision = base rate."""
    train_df, holdout = split
    result = evaluate(base_rate_model(model), holdout, training=train_df, bootstrap_samples=200)
    assert result["auc"] == result["auc_low"] == result["auc_high"] == 0.5
    assert result["brier_skill"] == pytest.approx(0.0, abs=1e-6)
    assert result["ece"] < 0.02
    assert result["precision_at_alert_rate"] == pytest.approx(result["positive_rate"])
    assert result["recall_at_alert_rate"] == pytest.approx(result["alert_rate"], rel=0.05)


def test_bootstrap_auc_is_the_auc_of_each_resample():
    """Counts per row give exactly the AUC of the resample they stand for, ties included; paired sets share rows."""
    rng = np.random.default_rng(4)
    labels = (rng.random(3000) < 0.05).astype(int)
    scores = np.round(rng.random(3000) * 0.6 + labels * 0.25, 2)  # many ties
    other = np.round(scores + rng.normal(0, 0.1, 3000), 2)
    aucs = evaluation.bootstrap_aucs(labels, scores, other, samples=7, seed=3)
    assert aucs.shape == (2, 7)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    w_pos, w_neg = evaluation._counts(3, 1, range(7), len(pos)), evaluation._counts(3, 0, range(7), len(neg))
    for b in range(7):
        rows = np.r_[np.repeat(pos, w_pos[b].astype(int)), np.repeat(neg, w_neg[b].astype(int))]
        assert aucs[0, b] == pytest.approx(roc_auc_score(labels[rows], scores[rows]), abs=1e-12)
        assert aucs[1, b] == pytest.approx(roc_auc_score(labels[rows], other[rows]), abs=1e-12)
    # Small chunks give the same resamples as one big chunk.
    big = evaluation.bootstrap_aucs(labels, scores, samples=50, seed=8)
    original = evaluation.BOOTSTRAP_CELLS
    try:
        evaluation.BOOTSTRAP_CELLS = 3 * len(labels)
        assert np.array_equal(evaluation.bootstrap_aucs(labels, scores, samples=50, seed=8), big)
    finally:
        evaluation.BOOTSTRAP_CELLS = original


def test_bootstrap_threshold_is_the_max_f1_threshold_of_each_resample():
    rng = np.random.default_rng(5)
    labels = (rng.random(2000) < 0.05).astype(int)
    scores = rng.random(2000) * 0.6 + labels * 0.3
    scores[:40] = 0.5  # a tie group
    thresholds = evaluation.bootstrap_thresholds(labels, scores, samples=10, seed=2)
    order = np.argsort(-scores, kind="stable")
    pos, neg = order[labels[order] == 1], order[labels[order] == 0]
    w_pos, w_neg = evaluation._counts(2, 1, range(10), len(pos)), evaluation._counts(2, 0, range(10), len(neg))
    for b in range(10):
        rows = np.r_[np.repeat(pos, w_pos[b].astype(int)), np.repeat(neg, w_neg[b].astype(int))]
        assert thresholds[b] == evaluation.best_f1_threshold(labels[rows], scores[rows])


def test_alert_rate_counts_ties_in_proportion():
    labels = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    # Top 3: the 0.9 (a fraud) and two of the four rows tied at 0.5 (one fraud among them: half a fraud expected).
    view = evaluation.at_alert_rate(labels, scores, 0.3)
    assert view["alert_threshold"] == 0.5
    assert view["precision_at_alert_rate"] == pytest.approx(1.5 / 3)
    assert view["recall_at_alert_rate"] == pytest.approx(1.5 / 2)


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
    assert evaluation.validation_rows(train_df, model, data.LABEL).equals(
        val
    )  # what evaluate bootstraps the threshold on
    assert evaluation.validation_rows(train_df.iloc[1:], model, data.LABEL) is None  # not the frame it was trained on


def test_champion_comparison_scores_the_same_holdout(split, model):
    holdout = split[1]
    weak = train(split[0].iloc[:1500], seed=2, max_epochs=2)
    result = evaluate(model, holdout, champion=weak, champion_version=4)
    weak_auc = roc_auc_score(holdout[data.LABEL], weak.predict_proba(holdout))
    assert result["champion_version"] == 4
    assert result["champion_auc"] == pytest.approx(weak_auc)
    assert result["auc_delta"] == pytest.approx(result["auc"] - weak_auc)
    assert result["auc_delta_low"] < result["auc_delta"] < result["auc_delta_high"]
    assert result["auc_delta_low"] > 0  # the weak champion is clearly beaten
    same = evaluate(model, holdout, champion=model)
    assert same["auc_delta"] == same["auc_delta_low"] == same["auc_delta_high"] == 0.0  # paired: same rows


def test_paired_interval_is_narrower_than_comparing_two_intervals(split, model):
    """Both models score the same resampled rows, so the rows' shared difficulty cancels out of the difference."""
    train_df, holdout = split
    other = train(train_df, seed=6)
    paired = evaluate(other, holdout, champion=model, training=train_df)
    alone = evaluate(model, holdout, training=train_df)
    unpaired_width = np.hypot(paired["auc_high"] - paired["auc_low"], alone["auc_high"] - alone["auc_low"])
    assert paired["auc_delta_high"] - paired["auc_delta_low"] < unpaired_width / 2


def test_preprocessing_lives_in_the_model(split, model, tmp_path):
    holdout = split[1].head(200)
    expected = model.predict_proba(holdout)
    shuffled = holdout[list(reversed(holdout.columns))].assign(extra=1)
    assert np.array_equal(model.predict_proba(shuffled), expected)
    restored = registry.load_model_folder(registry.save_model_folder(model, tmp_path / "model"))  # no pickle
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


# --- the train step's device -----------------------------------------------------------------------------


def _step_context(stack: str, run_dir: Path, tracking_uri: str | None = None) -> StepContext:
    return StepContext(
        model="fraud",
        spec=load_stack(stack_file(stack)),
        run_dir=run_dir,
        tracking_uri=tracking_uri,
        feature_repo=run_dir / "feast",
        root=ROOT,
        stack_files=ROOT / "stacks",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA device here")
def test_a_step_that_requests_gpus_fails_where_torch_sees_none(tmp_path, capsys):
    """dev trains fraud on one GPU: without CUDA the step fails, as its pod would, instead of training on the CPU."""
    assert load_stack(stack_file("dev")).models["fraud"].training.gpus == 1
    argv = ["step", "train", "--stack", "dev", "--model", "fraud", "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 1
    error = capsys.readouterr().err
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build: torch.version.cuda is None"
    assert f"models.fraud.training.gpus requests 1 GPU(s), but torch {torch.__version__} ({build})" in error
    assert "sees no CUDA device" in error and "orchestrator.gpu_pipeline_image" in error
    assert not (tmp_path / "run" / MODEL_FOLDER).exists()


def test_a_cuda_build_without_a_device_says_so(tmp_path, monkeypatch):
    """The CUDA image on a node whose GPU or driver torch cannot use: the message names the build it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(StepFailed, match=r"torch \S+ \(CUDA 13\.0 build\) sees no CUDA device"):
        steps.train(_step_context("dev", tmp_path))


@pytest.mark.slow
def test_the_device_trained_on_is_in_the_sealed_evidence(tmp_path):
    """The local stack requests no GPUs: the step trains on the CPU, and the evidence of the version says so."""
    ctx = _step_context("local", tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert ctx.spec.models["fraud"].training.gpus == 0
    data.generate(6000, seed=2).to_parquet(tmp_path / "training.parquet", index=False)
    trained = registry.load_model_folder(steps.train(ctx))
    assert trained.info["device"] == "cpu"
    steps.evaluate(ctx)
    evidence = steps.register(ctx)["evidence"]
    assert ev.verify(evidence)
    assert evidence["training"] == ev.jsonable(trained.info)
