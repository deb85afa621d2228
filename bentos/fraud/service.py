"""BentoML service of the fraud model: the released MLflow version behind typed HTTP APIs.

Configuration comes from the environment (set by the ModelService component or `loopform up`):
LOOPFORM_TRACKING_URI + LOOPFORM_MODEL_URI (e.g. models:/fraud@production) name the release;
LOOPFORM_FEAST_REPO (a local Feast repo) or LOOPFORM_FEAST_CONFIG (the platform's
feature_store.yaml) enables scoring by card_id from the online store; LOOPFORM_PAYLOAD_URI
is the payload log (local path, file:// or object-store URI). APIs:

- POST /predict        raw features of one transaction
- POST /predict_batch  {"transactions": [...]} many at once
- POST /predict_card   {"card_id": ..., <the transaction's own fields, all required>}: the card's
                       aggregates (txn_count_24h, avg_amount_30d, card_age_days) from the online store

The card path never takes a transaction field from the store (that would score the card's previous
transaction) and never takes an aggregate from the request; its payload record is the vector scored.

Malformed input is a 400 from the typed schema (BentoML answers pydantic errors itself), an unknown
card a 404, a missing feature store a 503; the server keeps serving. APIs share logic through the plain
`Scorer` object: one API calling another would go over HTTP and deadlock.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import NotFound, ServiceUnavailable

from loopform import data
from loopform.serving import (
    ENV_FEAST_REPO,
    ENV_PAYLOAD_FLUSH_ROWS,
    ENV_PAYLOAD_FLUSH_SECONDS,
    ENV_PAYLOAD_URI,
    Prediction,
    Scorer,
    UnknownEntity,
    batch_model,
    online_store_from_env,
    release_from_env,
    request_models,
    torch_threads,
)

Transaction, CardTransaction = request_models(data.FEATURES, entity=data.ENTITY)
TransactionBatch = batch_model(Transaction)

_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "fraud"


def _payload_log(model: str) -> Any:
    from loopform.payloads import PayloadLog

    return PayloadLog(
        os.environ.get(ENV_PAYLOAD_URI, "payloads"),
        model,
        flush_rows=int(os.environ.get(ENV_PAYLOAD_FLUSH_ROWS, "1000")),
        flush_seconds=float(os.environ.get(ENV_PAYLOAD_FLUSH_SECONDS, "10")),
    )


@bentoml.service(name="fraud", traffic={"timeout": 30})
class FraudService:
    """Scores card transactions with the released fraud model."""

    def __init__(self) -> None:
        torch_threads()
        release = release_from_env()
        self.scorer = Scorer(
            release,
            data.FEATURE_NAMES,
            payloads=_payload_log(release.name),
            online=online_store_from_env(_MODEL_DIR),
            entity=data.ENTITY,
            stored=data.CARD_FEATURES,
        )

    @bentoml.on_shutdown
    def close_payload_log(self) -> None:
        """Graceful shutdown: write every queued payload record before the worker exits."""
        if self.scorer.payloads is not None:
            self.scorer.payloads.close()

    @bentoml.api(input_spec=Transaction, output_spec=Prediction)
    def predict(self, **transaction: Any) -> Prediction:
        """Score one transaction given its raw features."""
        return Prediction(**self.scorer.score_rows([transaction], "predict")[0])

    @bentoml.api(input_spec=TransactionBatch)
    def predict_batch(self, transactions: list[Any]) -> list[Prediction]:
        """Score many transactions in one call (one forward pass); body {"transactions": [...]}."""
        rows = [t.model_dump() for t in transactions]
        return [Prediction(**answer) for answer in self.scorer.score_rows(rows, "predict_batch")]

    @bentoml.api(input_spec=CardTransaction, output_spec=Prediction)
    def predict_card(self, **request: Any) -> Prediction:
        """Score a transaction of a card: its own fields from the request, the card's aggregates from the store."""
        if self.scorer.online is None:
            raise ServiceUnavailable(f"scoring by {data.ENTITY} needs the online feature store: set {ENV_FEAST_REPO}")
        try:
            return Prediction(**self.scorer.score_entity(request, "predict_card"))
        except UnknownEntity as error:
            raise NotFound(str(error)) from None
