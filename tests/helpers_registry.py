"""Shared set-up of the registry and promotion tests: a small trained model and versions with evidence."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loopform import registry
from loopform.evaluation import evaluate_classifier, time_split
from loopform.gates.result import GateResult
from models.fraud import data
from models.fraud.model import FraudModel
from models.fraud.train import train


def small_model(seed: int = 3) -> tuple[FraudModel, Any, Any, dict[str, Any]]:
    """(model, train frame, holdout, evaluation): trains on 4000 synthetic rows in about a second.

    The holdout is the later 8000 rows, so it holds about 200 positives: enough for every
    stack's gates.min_positives (100).
    """
    train_df, holdout = time_split(data.generate(12000, seed=seed), data.TIMESTAMP, holdout_share=2 / 3)
    model = train(train_df, seed=seed)
    return model, train_df, holdout, evaluate_classifier(model, holdout, label=data.LABEL, training=train_df)


def base_rate_model(model: FraudModel) -> FraudModel:
    """A copy of `model` that scores every row with its training base rate: it has learnt nothing."""
    constant = copy.deepcopy(model)
    rate = float(model.info["base_rate"])
    last = constant.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(math.log(rate / (1 - rate)))
    return constant


def gate_results(report_dir: Path | None = None, **overrides: GateResult) -> dict[str, GateResult]:
    """Passing validation, drift and OOD results (a drift HTML report when report_dir is given)."""
    report = None
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        report = report_dir / "drift.html"
        report.write_text("<html><body>drift report</body></html>")
    results = {
        "validation": GateResult("validation", True, {"worst_missing_share": 0.0, "worst_out_of_range_share": 0.0}),
        "drift": GateResult(
            "drift",
            True,
            {"drift_share": 0.0, "features": {"amount": {"score": 0.01}}},
            [],
            str(report) if report else None,
        ),
        "ood": GateResult("ood", True, {"ood_rate": 0.002}),
    }
    results.update(overrides)
    return results


def make_version(
    uri: str,
    name: str,
    model: FraudModel,
    evaluation: Mapping[str, Any],
    *,
    gates: Mapping[str, Any] | None = None,
    fingerprint: str = "0" * 64,
    record_dir: Path | None = None,
) -> registry.ReleaseRecord:
    """Log a training run and register it: a version whose tags hold sealed evidence."""
    run = registry.log_training_run(
        uri,
        name,
        model,
        gate_results=gates if gates is not None else gate_results(),
        training_data_fingerprint=fingerprint,
        evaluation=evaluation,
    )
    return registry.register_version(uri, name, run.run_id, record_dir=record_dir)


def stored_weights(uri: str, name: str, version: int) -> tuple[Path, str]:
    """The largest file of a version's model (its weights) where the store keeps it, and its path in the model."""
    import mlflow

    client = registry.client(uri)
    source = client.get_model_version(name, str(version)).source
    location = Path(client.get_logged_model(source.removeprefix("models:/")).artifact_location.removeprefix("file://"))
    weights = max((p for p in location.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    assert mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri)  # the store serves it
    return weights, weights.relative_to(location).as_posix()
