"""Training and evaluation of the fraud model.

`train` fits the MLP with fixed seeds (same data + seed -> same weights) and early stopping
on a stratified validation split, then picks the operating threshold on that split (max
F1). `evaluate` scores a holdout set: AUC, precision and recall at the threshold, expected
calibration error, and the same holdout scored by the current champion for comparison.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from models.fraud.model import FraudModel


def _default_columns() -> tuple[tuple[str, ...], tuple[str, ...], str, dict[str, tuple[str, ...]]]:
    from loopform import data

    declared = {f.name: tuple(f.categories or ()) for f in data.FEATURES if f.kind == "categorical"}
    return tuple(data.NUMERIC), tuple(data.CATEGORICAL), data.LABEL, declared


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present, else CPU (an explicit choice wins)."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def time_split(
    df: pd.DataFrame, holdout_share: float = 0.2, timestamp: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout) with the latest `holdout_share` of rows by event time as holdout, as in production."""
    if timestamp is None:
        from loopform import data

        timestamp = data.TIMESTAMP
    ordered = df.sort_values(timestamp, kind="stable").reset_index(drop=True)
    cut = round(len(ordered) * (1 - holdout_share))
    return ordered.iloc[:cut].reset_index(drop=True), ordered.iloc[cut:].reset_index(drop=True)


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Score threshold that maximises F1 on these labels."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(thresholds[best]) if len(thresholds) else 0.5


def train(
    df: pd.DataFrame,
    seed: int,
    *,
    numeric: Sequence[str] | None = None,
    categorical: Sequence[str] | None = None,
    label: str | None = None,
    validation_share: float = 0.2,
    hidden: Sequence[int] = (64, 32),
    dropout: float = 0.1,
    lr: float = 5e-3,
    weight_decay: float = 1e-5,
    batch_size: int = 1024,
    max_epochs: int = 100,
    patience: int = 6,
    device: str | None = None,
    cpu_threads: int = 1,
) -> FraudModel:
    """Fit a FraudModel on `df` (features + label); early stopping on validation log-loss.

    Columns default to loopform.data's NUMERIC, CATEGORICAL and LABEL. The result is on the
    CPU whatever device trained it, so it pickles and loads anywhere. On the CPU it trains
    on `cpu_threads` threads: for a network this small, thread hand-offs cost more than they
    save, above all on a shared machine.
    """
    d_numeric, d_categorical, d_label, declared = _default_columns() if numeric is None else ((), (), "", {})
    numeric = tuple(numeric if numeric is not None else d_numeric)
    categorical = tuple(categorical if categorical is not None else d_categorical)
    label = label or d_label or "is_fraud"
    if df[label].nunique() < 2:
        raise ValueError(f"training data needs both classes in {label!r}; got only {df[label].unique().tolist()}")

    y_all = df[label].to_numpy(dtype=np.float32)
    fit_idx, val_idx = stratified_split(y_all.astype(np.int64), validation_share, seed)
    fit_df = df.iloc[fit_idx]
    num = fit_df[list(numeric)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    mean = np.nan_to_num(np.nanmean(num, axis=0)) if len(num) else np.zeros(len(numeric))
    std = np.nan_to_num(np.nanstd(num, axis=0))
    std = np.where(std > 1e-9, std, 1.0)
    vocab = {}
    for name in categorical:
        seen = set(fit_df[name].dropna().astype(str))
        vocab[name] = sorted(seen | set(declared.get(name, ())))

    target = pick_device(device)
    devices = [target.index or 0] if target.type == "cuda" else []
    threads = torch.get_num_threads()
    if target.type == "cpu":
        torch.set_num_threads(max(1, min(cpu_threads, threads)))
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model = FraudModel(numeric, vocab, mean, std, hidden=hidden, dropout=dropout)
            x_all = torch.from_numpy(model.encode(df))
            x_fit, y_fit = x_all[fit_idx].to(target), torch.from_numpy(y_all[fit_idx]).to(target)
            x_val, y_val = x_all[val_idx].to(target), torch.from_numpy(y_all[val_idx]).to(target)
            model.to(target)
            optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
            loss_fn = nn.BCEWithLogitsLoss()
            shuffle = torch.Generator().manual_seed(seed)

            best_loss, best_state, best_epoch, waited, epochs = math.inf, copy.deepcopy(model.state_dict()), 0, 0, 0
            for epoch in range(1, max_epochs + 1):
                epochs = epoch
                model.train()
                order = torch.randperm(len(x_fit), generator=shuffle).to(target)
                for start in range(0, len(order), batch_size):
                    batch = order[start : start + batch_size]
                    optimiser.zero_grad(set_to_none=True)
                    loss = loss_fn(model(x_fit[batch]), y_fit[batch])
                    loss.backward()
                    optimiser.step()
                model.eval()
                with torch.no_grad():
                    val_loss = float(loss_fn(model(x_val), y_val))
                if val_loss < best_loss - 1e-5:
                    best_loss, best_state, best_epoch, waited = val_loss, copy.deepcopy(model.state_dict()), epoch, 0
                else:
                    waited += 1
                    if waited >= patience:
                        break
            model.load_state_dict(best_state)
    finally:
        torch.set_num_threads(threads)
    model.to("cpu").eval()

    val_scores = model.predict_proba(df.iloc[val_idx])
    model.threshold = best_f1_threshold(y_all[val_idx].astype(np.int64), val_scores)
    model.info = {
        "seed": seed,
        "rows": len(df),
        "fit_rows": len(fit_idx),
        "validation_rows": len(val_idx),
        "epochs": epochs,
        "best_epoch": best_epoch,
        "best_validation_loss": best_loss,
        "device": str(target),
        "hidden": list(hidden),
        "dropout": dropout,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "patience": patience,
        "threshold_rule": "max F1 on validation",
    }
    return model


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


def evaluate(
    model: FraudModel,
    df: pd.DataFrame,
    champion: FraudModel | None = None,
    *,
    champion_version: int | str | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Holdout metrics at the model's operating threshold, and the champion's AUC on the same rows."""
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    if label is None:
        from loopform import data

        label = data.LABEL
    labels = df[label].to_numpy(dtype=np.int64)
    if len(np.unique(labels)) < 2:
        raise ValueError(f"holdout needs both classes in {label!r} to compute AUC; got {np.unique(labels).tolist()}")
    scores = model.predict_proba(df)
    predicted = (scores >= model.threshold).astype(np.int64)
    result: dict[str, Any] = {
        "auc": float(roc_auc_score(labels, scores)),
        "precision": float(precision_score(labels, predicted, zero_division=0)),
        "recall": float(recall_score(labels, predicted, zero_division=0)),
        "ece": expected_calibration_error(labels, scores),
        "threshold": float(model.threshold),
        "rows": len(df),
        "positive_rate": float(labels.mean()),
        "champion_version": None,
        "champion_auc": None,
        "auc_delta": None,
    }
    if champion is not None:
        champion_auc = float(roc_auc_score(labels, champion.predict_proba(df)))
        result.update(
            champion_version=int(champion_version) if champion_version is not None else None,
            champion_auc=champion_auc,
            auc_delta=result["auc"] - champion_auc,
        )
    return result
