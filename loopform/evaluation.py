"""Evaluation of a trained model on a later holdout, with the metrics of its task and their uncertainty.

`evaluate(model, holdout, contract, champion)` picks the task's metrics:

- classification (`evaluate_classifier`): AUC with a stratified bootstrap interval and the
  holdout's number of positives; Brier score against always predicting the training base rate
  (the Brier skill score: 0 for a base-rate model, 1 for a perfect one); expected calibration
  error, reported; precision and recall at a fixed alert rate (the share of traffic people can
  review) and at the operating threshold, with the threshold's own alert rate and its bootstrap
  interval on the validation rows it was chosen on; with a champion, its AUC on the same rows
  and a paired bootstrap interval of challenger minus champion AUC;
- regression (`evaluate_regressor`): RMSE, MAE and R² with bootstrap intervals; R² is the skill
  against always predicting the training mean; with a champion, its RMSE on the same rows and a
  paired bootstrap interval of challenger RMSE / champion RMSE - 1.

The bootstraps are vectorised over resamples (counts per row, not copies of rows) and seeded:
the same inputs give the same intervals. A classifier supplies `predict_proba(frame)` and
`threshold`, a regressor `predict(frame)`; both may record training facts in `info`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from loopform.contract import Contract

#: Share of the newest events held out for evaluation: the model is judged on data after its training data.
HOLDOUT_SHARE = 0.2


def time_split(
    frame: pd.DataFrame, timestamp: str, holdout_share: float = HOLDOUT_SHARE
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(older, newest `holdout_share`) by event time, as in production: the holdout comes after the training data."""
    ordered = frame.sort_values(timestamp, kind="stable").reset_index(drop=True)
    cut = round(len(ordered) * (1 - holdout_share))
    return ordered.iloc[:cut].reset_index(drop=True), ordered.iloc[cut:].reset_index(drop=True)


def evaluate(
    model: Any,
    holdout: pd.DataFrame,
    contract: Contract,
    champion: Any | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The holdout metrics of the contract's task (see the module docstring); options go to the task's evaluator."""
    if contract.classification:
        return evaluate_classifier(model, holdout, champion, label=contract.label, **options)
    options.pop("alert_rate", None)
    return evaluate_regressor(model, holdout, champion, label=contract.label, **options)


def stratified_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (fit, validation) with the same positive rate in both; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    fit: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        rng.shuffle(idx)
        cut = max(1, round(len(idx) * share)) if len(idx) > 1 else 0
        val.append(idx[:cut])
        fit.append(idx[cut:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Score threshold that maximises F1 on these labels."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(thresholds[best]) if len(thresholds) else 0.5


def validation_rows(df: pd.DataFrame, model: Any, label: str) -> pd.DataFrame | None:
    """The rows of `df` (the model's training frame) that `train` validated on and chose the threshold on.

    None when the model does not record its split or `df` is not the frame it was trained on.
    """
    info = getattr(model, "info", None) or {}
    if "seed" not in info or "validation_share" not in info or info.get("rows") != len(df):
        return None
    labels = df[label].to_numpy(dtype=np.int64)
    _, val_idx = stratified_split(labels, float(info["validation_share"]), int(info["seed"]))
    return df.iloc[val_idx]


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> float:
    """Share-weighted mean |observed fraud rate - mean score| over equal-width score bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            error += mask.mean() * abs(float(labels[mask].mean()) - float(scores[mask].mean()))
    return float(error)


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of bootstrap values at `confidence`."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def _counts(seed: int, stratum: int, resamples: range, n: int) -> np.ndarray:
    """(len(resamples), n): how often each of n rows is drawn when a resample draws n rows with replacement.

    Each resample has its own random stream (seed, stratum, resample number), so the draws do
    not depend on how the resamples are chunked.
    """
    draws = np.stack([np.random.default_rng((seed, stratum, b)).integers(0, n, size=n) for b in resamples])
    draws += (np.arange(len(resamples)) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=len(resamples) * n).reshape(len(resamples), n).astype(np.float64)


def _chunks(samples: int, rows: int) -> list[range]:
    """Resamples in chunks small enough that a chunk's (resamples x rows) arrays stay a few MB."""
    size = max(1, BOOTSTRAP_CELLS // max(rows, 1))
    return [range(start, min(start + size, samples)) for start in range(0, samples, size)]


BOOTSTRAP_CELLS = 2_000_000
"""Cells (resamples x rows) per bootstrap chunk: bounds memory on large holdouts."""


class _Ranks:
    """One model's scores, arranged so the AUC of any weighted resample is a few array operations.

    With w the number of times each row is drawn, AUC = sum over positives of w_p times the
    weight of negatives scored below it (ties count half), over (sum w_pos)(sum w_neg): the
    Mann-Whitney statistic of the resample, without building it.
    """

    def __init__(self, positives: np.ndarray, negatives: np.ndarray) -> None:
        self.order = np.argsort(negatives, kind="stable")
        ranked = negatives[self.order]
        self.below = np.searchsorted(ranked, positives, side="left")
        self.up_to = np.searchsorted(ranked, positives, side="right")

    def auc(self, w_pos: np.ndarray, w_neg: np.ndarray) -> np.ndarray:
        cumulative = np.zeros((len(w_neg), w_neg.shape[1] + 1))
        np.cumsum(w_neg[:, self.order], axis=1, out=cumulative[:, 1:])
        below = cumulative[:, self.below]
        ties = cumulative[:, self.up_to] - below
        return (w_pos * (below + 0.5 * ties)).sum(axis=1) / (w_pos.sum(axis=1) * w_neg.sum(axis=1))


def bootstrap_aucs(labels: np.ndarray, *score_sets: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """(len(score_sets), samples) AUCs on stratified bootstrap resamples; every score set sees the same rows.

    Stratified: each resample draws as many positives (and negatives) as the data has, so
    no resample lacks a class and the base rate stays fixed. Same rows for every score set:
    differences between them are paired.
    """
    labels = np.asarray(labels).astype(bool)
    ranks = [
        _Ranks(np.asarray(s, dtype=np.float64)[labels], np.asarray(s, dtype=np.float64)[~labels]) for s in score_sets
    ]
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    out = []
    for chunk in _chunks(samples, len(labels)):
        w_pos, w_neg = _counts(seed, 1, chunk, n_pos), _counts(seed, 0, chunk, n_neg)
        out.append(np.stack([r.auc(w_pos, w_neg) for r in ranks]))
    return np.concatenate(out, axis=1)


def bootstrap_thresholds(labels: np.ndarray, scores: np.ndarray, *, samples: int, seed: int = 0) -> np.ndarray:
    """The max-F1 threshold (as `best_f1_threshold` picks it) on each of `samples` stratified resamples."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranked, positive = np.asarray(scores, dtype=np.float64)[order], labels[order]
    ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # last row of each group of equal scores
    values = ranked[ends]
    pos_at, neg_at = np.flatnonzero(positive), np.flatnonzero(~positive)
    out = []
    for chunk in _chunks(samples, len(labels)):
        weights = np.zeros((len(chunk), len(labels)))
        weights[:, pos_at] = _counts(seed, 1, chunk, len(pos_at))
        weights[:, neg_at] = _counts(seed, 0, chunk, len(neg_at))
        flagged = np.cumsum(weights, axis=1)[:, ends]  # rows scored at or above each candidate threshold
        caught = np.cumsum(weights * positive, axis=1)[:, ends]
        drawn = np.diff(flagged, axis=1, prepend=0.0) > 0  # a candidate is a score the resample holds
        f1 = np.where(drawn, 2 * caught / (flagged + len(pos_at)), -1.0)
        best = f1.shape[1] - 1 - np.argmax(f1[:, ::-1], axis=1)  # ties: the lowest threshold
        out.append(values[best])
    return np.concatenate(out)


def brier(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean squared difference between score and label."""
    return float(np.mean((np.asarray(scores, dtype=np.float64) - labels) ** 2))


def at_alert_rate(labels: np.ndarray, scores: np.ndarray, alert_rate: float) -> dict[str, float]:
    """Precision and recall when the `alert_rate` share of highest scores is flagged (the team's review budget).

    k = alert_rate x rows are flagged; rows tied at the cut count in proportion (the expected
    result of breaking ties at random), so a model that scores everyone the same gets the
    base rate as precision and the alert rate as recall, not a flag on every row.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    k = min(len(scores), max(1, round(alert_rate * len(scores))))
    cut = float(np.sort(scores)[::-1][k - 1])
    above, tied = scores > cut, scores == cut
    caught = labels[above].sum() + (k - above.sum()) * labels[tied].mean()
    positives = labels.sum()
    return {
        "alert_threshold": cut,
        "precision_at_alert_rate": float(caught / k),
        "recall_at_alert_rate": float(caught / positives) if positives else 0.0,
    }


def evaluate_classifier(
    model: Any,
    df: pd.DataFrame,
    champion: Any | None = None,
    *,
    label: str,
    champion_version: int | str | None = None,
    training: pd.DataFrame | None = None,
    confidence: float = 0.95,
    bootstrap_samples: int = 1000,
    alert_rate: float = 0.01,
    base_rate: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Holdout metrics with bootstrap intervals at `confidence`, and the champion compared on the same rows.

    `training` is the frame the model was trained on: its positive rate is the base rate
    the Brier skill is measured against, and its validation rows (the ones the threshold
    was chosen on) give the threshold's interval. Without it the base rate is the one
    `train` recorded (else the holdout's, which only makes the skill harder to earn) and
    the threshold has no interval. `base_rate` overrides both.
    """
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    labels = df[label].to_numpy(dtype=np.int64)
    if len(np.unique(labels)) < 2:
        raise ValueError(f"holdout needs both classes in {label!r} to compute AUC; got {np.unique(labels).tolist()}")
    info = getattr(model, "info", None) or {}
    if base_rate is None:
        if training is not None:
            base_rate = float(training[label].to_numpy(dtype=np.float64).mean())
        elif isinstance(info.get("base_rate"), int | float):
            base_rate = float(info["base_rate"])
        else:
            base_rate = float(labels.mean())
    scores = model.predict_proba(df)
    predicted = (scores >= model.threshold).astype(np.int64)
    model_brier = brier(labels, scores)
    base_brier = brier(labels, np.full(len(labels), base_rate))
    champion_scores = champion.predict_proba(df) if champion is not None else None
    aucs = bootstrap_aucs(
        labels,
        scores,
        *([champion_scores] if champion_scores is not None else []),
        samples=bootstrap_samples,
        seed=seed,
    )
    auc_low, auc_high = _interval(aucs[0], confidence)
    threshold_low = threshold_high = None
    validation = validation_rows(training, model, label) if training is not None else None
    if validation is not None:
        val_labels = validation[label].to_numpy(dtype=np.int64)
        if len(np.unique(val_labels)) == 2:
            thresholds = bootstrap_thresholds(
                val_labels, model.predict_proba(validation), samples=bootstrap_samples, seed=seed
            )
            threshold_low, threshold_high = _interval(thresholds, confidence)
    result: dict[str, Any] = {
        "task": "classification",
        "auc": float(roc_auc_score(labels, scores)),
        "auc_low": auc_low,
        "auc_high": auc_high,
        "confidence": float(confidence),
        "bootstrap_samples": int(bootstrap_samples),
        "rows": len(df),
        "positives": int(labels.sum()),
        "positive_rate": float(labels.mean()),
        "base_rate": base_rate,
        "brier": model_brier,
        "brier_base": base_brier,
        "brier_skill": 1.0 - model_brier / base_brier if base_brier > 0 else 0.0,
        "ece": expected_calibration_error(labels, scores),
        "threshold": float(model.threshold),
        "threshold_low": threshold_low,
        "threshold_high": threshold_high,
        "threshold_alert_rate": float(predicted.mean()),
        "precision": float(precision_score(labels, predicted, zero_division=0)),
        "recall": float(recall_score(labels, predicted, zero_division=0)),
        "alert_rate": float(alert_rate),
        **at_alert_rate(labels, scores, alert_rate),
        "champion_version": None,
        "champion_auc": None,
        "auc_delta": None,
        "auc_delta_low": None,
        "auc_delta_high": None,
    }
    if champion_scores is not None:
        champion_auc = float(roc_auc_score(labels, champion_scores))
        delta_low, delta_high = _interval(aucs[0] - aucs[1], confidence)
        result.update(
            champion_version=int(champion_version) if champion_version is not None else None,
            champion_auc=champion_auc,
            auc_delta=result["auc"] - champion_auc,
            auc_delta_low=delta_low,
            auc_delta_high=delta_high,
        )
    return result


def _row_counts(seed: int, chunk: range, n: int) -> np.ndarray:
    """Row bootstrap weights of each resample in `chunk` (one random stream per resample, as for classifiers)."""
    return _counts(seed, 2, chunk, n)


def _weighted_errors(weights: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(RMSE, MAE) of each weighted resample of per-row errors."""
    total = weights.sum(axis=1)
    rmse = np.sqrt((weights * errors**2).sum(axis=1) / total)
    mae = (weights * np.abs(errors)).sum(axis=1) / total
    return rmse, mae


def regression_metrics(labels: np.ndarray, predictions: np.ndarray, mean: float) -> dict[str, float]:
    """RMSE, MAE and R² against always predicting `mean` (the training mean: R² 0 is no skill)."""
    errors = np.asarray(predictions, dtype=np.float64) - labels
    baseline = float(np.mean((labels - mean) ** 2))
    mse = float(np.mean(errors**2))
    return {
        "rmse": math.sqrt(mse),
        "mae": float(np.mean(np.abs(errors))),
        "r2": 1.0 - mse / baseline if baseline > 0 else 0.0,
        "rmse_base": math.sqrt(baseline),
    }


def evaluate_regressor(
    model: Any,
    df: pd.DataFrame,
    champion: Any | None = None,
    *,
    label: str,
    champion_version: int | str | None = None,
    training: pd.DataFrame | None = None,
    confidence: float = 0.95,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Holdout RMSE, MAE and R² with bootstrap intervals at `confidence`; the champion compared on the same rows.

    R² is measured against always predicting the training mean (`training`'s label mean, else the
    mean `train` recorded in `info`, else the holdout's own, which only makes the skill harder to
    earn). With a champion, `rmse_ratio_high` is the upper bound of the paired interval of
    challenger RMSE / champion RMSE - 1: both models scored on the same resampled rows.
    """
    labels = df[label].to_numpy(dtype=np.float64)
    if len(labels) < 2 or not np.isfinite(labels).all():
        raise ValueError(f"holdout needs at least 2 finite labels in {label!r}; got {len(labels)} rows")
    info = getattr(model, "info", None) or {}
    if training is not None:
        mean = float(training[label].to_numpy(dtype=np.float64).mean())
    elif isinstance(info.get("label_mean"), int | float):
        mean = float(info["label_mean"])
    else:
        mean = float(labels.mean())
    predictions = np.asarray(model.predict(df), dtype=np.float64)
    errors = predictions - labels
    champion_errors = np.asarray(champion.predict(df), dtype=np.float64) - labels if champion is not None else None
    rmse_b, mae_b, ratio_b = [], [], []
    for chunk in _chunks(bootstrap_samples, len(labels)):
        weights = _row_counts(seed, chunk, len(labels))
        rmse, mae = _weighted_errors(weights, errors)
        rmse_b.append(rmse)
        mae_b.append(mae)
        if champion_errors is not None:
            champion_rmse, _ = _weighted_errors(weights, champion_errors)
            ratio_b.append(rmse / np.maximum(champion_rmse, 1e-12) - 1.0)
    rmse_low, rmse_high = _interval(np.concatenate(rmse_b), confidence)
    mae_low, mae_high = _interval(np.concatenate(mae_b), confidence)
    result: dict[str, Any] = {
        "task": "regression",
        **regression_metrics(labels, predictions, mean),
        "rmse_low": rmse_low,
        "rmse_high": rmse_high,
        "mae_low": mae_low,
        "mae_high": mae_high,
        "label_mean": mean,
        "rows": len(df),
        "confidence": float(confidence),
        "bootstrap_samples": int(bootstrap_samples),
        "champion_version": None,
        "champion_rmse": None,
        "rmse_ratio": None,
        "rmse_ratio_low": None,
        "rmse_ratio_high": None,
    }
    if champion_errors is not None:
        champion_rmse = math.sqrt(float(np.mean(champion_errors**2)))
        low, high = _interval(np.concatenate(ratio_b), confidence)
        result.update(
            champion_version=int(champion_version) if champion_version is not None else None,
            champion_rmse=champion_rmse,
            rmse_ratio=result["rmse"] / max(champion_rmse, 1e-12) - 1.0,
            rmse_ratio_low=low,
            rmse_ratio_high=high,
        )
    return result
