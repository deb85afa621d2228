"""The service's Prometheus metrics, shaped by the model's task.

Families are created on first use (not at import) so that BentoML's multiprocess directory is already set
and the values show up on the service's /metrics. They live in the process's default registry, created
once: a process serves one model, so asking for another shape (a regressor's buckets after a classifier's)
is an error rather than a silently mislabelled family.

- `loopform_predictions_total{model, version, api[, prediction]}`: answers served; a classifier's are
  labelled by the class predicted;
- `loopform_prediction_score{model, version}`: what was served: a classifier's probability (probability
  buckets), a regressor's predicted value (buckets spread over the contract's `label_range`);
- `loopform_inference_seconds`, `loopform_rejected_requests_total`, `loopform_payload_records_total`;
- `loopform_serving_model_version{model}`: the registry version this process serves (the dashboard's
  "production version").
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loopform.contract import Contract

PROBABILITY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)
#: A regressor's value histogram: this many equal-width buckets across the label range (plus one at its low end).
VALUE_BUCKETS = 20

_LOCK = threading.Lock()
_CREATED: dict[tuple[str, tuple[float, ...]], Metrics] = {}


def score_buckets(contract: Contract) -> tuple[float, ...]:
    """Histogram buckets of what the model serves: probabilities, or values across `label_range`."""
    if contract.classification:
        return PROBABILITY_BUCKETS
    assert contract.label_range is not None  # the contract requires one for regression
    low, high = contract.label_range
    step = (high - low) / VALUE_BUCKETS
    return tuple(round(low + step * i, 9) for i in range(VALUE_BUCKETS + 1))


@dataclass(frozen=True)
class Metrics:
    """The metric families of one task, and how an answered call is counted in them."""

    classification: bool
    predictions: Any
    score: Any
    inference: Any
    rejected: Any
    payloads: Any
    version: Any

    def answered(
        self, labels: dict[str, str], api: str, predictions: Sequence[float], scores: Sequence[float], seconds: float
    ) -> None:
        """Count one API call: its time, its payload records and each answer (class, score or value).

        Each labelled series is looked up once per call, not once per row: in BentoML's multiprocess mode a
        lookup takes a lock and the per-row loop was most of the metrics' cost.
        """
        self.inference.labels(api=api, **labels).observe(seconds)
        self.payloads.labels(model=labels["model"]).inc(len(scores))
        if self.classification:
            for prediction, count in Counter(str(int(p)) for p in predictions).items():
                self.predictions.labels(api=api, **labels, prediction=prediction).inc(count)
        elif predictions:
            self.predictions.labels(api=api, **labels).inc(len(predictions))
        score = self.score.labels(**labels)
        for value in scores:
            score.observe(value)

    def serving(self, model: str, version: int) -> None:
        """Record which registry version of `model` this process serves."""
        self.version.labels(model=model).set(version)

    def rejected_request(self, model: str, reason: str) -> None:
        self.rejected.labels(model=model, reason=reason).inc()


def metrics(contract: Contract) -> Metrics:
    """The process's metric families for `contract`'s task, in the default registry (created on the first call)."""
    shape = (contract.task, score_buckets(contract))
    with _LOCK:
        if not _CREATED:
            _CREATED[shape] = create_metrics(contract)
        if shape not in _CREATED:
            (created,) = _CREATED
            raise RuntimeError(
                f"this process already serves {created[0]} metrics with score buckets {created[1]}; model "
                f"{contract.model!r} ({shape[0]}, buckets {shape[1]}) needs a process of its own"
            )
        return _CREATED[shape]


def create_metrics(contract: Contract, registry: Any = None) -> Metrics:
    """New metric families for `contract`'s task in `registry` (default: prometheus_client's default registry)."""
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram

    registry = REGISTRY if registry is None else registry
    classification = contract.classification
    by = ["model", "version", "api"]
    return Metrics(
        classification=classification,
        predictions=Counter(
            "loopform_predictions",
            "Predictions served, by model, version, API" + (" and predicted class." if classification else "."),
            [*by, "prediction"] if classification else by,
            registry=registry,
        ),
        score=Histogram(
            "loopform_prediction_score",
            "Scores served: probability of the positive class."
            if classification
            else "Values served, in the label's unit.",
            ["model", "version"],
            buckets=score_buckets(contract),
            registry=registry,
        ),
        inference=Histogram(
            "loopform_inference_seconds",
            "Time of feature lookup plus forward pass of one API call (excludes HTTP and parsing).",
            by,
            registry=registry,
        ),
        rejected=Counter(
            "loopform_rejected_requests",
            "Requests refused by the service after schema validation (e.g. unknown entity).",
            ["model", "reason"],
            registry=registry,
        ),
        payloads=Counter(
            "loopform_payload_records", "Records handed to the payload log.", ["model"], registry=registry
        ),
        # Every worker serves the same version: under BentoML's multiprocess collection, their maximum.
        version=Gauge(
            "loopform_serving_model_version",
            "Registry version of the model this service serves.",
            ["model"],
            multiprocess_mode="max",
            registry=registry,
        ),
    )
