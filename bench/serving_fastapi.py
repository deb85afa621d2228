"""Baseline for bench/serving.py: the same Scorer (model, payload log, metrics) behind a plain FastAPI app.

Run: LOOPFORM_TRACKING_URI=... LOOPFORM_MODEL_URI=... python -m uvicorn bench.serving_fastapi:app --port 8000
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from loopform import data
from loopform.payloads import PayloadLog
from loopform.serving import ENV_PAYLOAD_URI, Prediction, Scorer, release_from_env, request_models, torch_threads

Transaction, _ = request_models(data.FEATURES, entity=data.ENTITY)
state: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    torch_threads()
    release = release_from_env()
    payloads = PayloadLog(os.environ.get(ENV_PAYLOAD_URI, "payloads"), release.name)
    state["scorer"] = Scorer(release, data.FEATURE_NAMES, payloads=payloads, entity=data.ENTITY)
    yield
    payloads.close()


app = FastAPI(lifespan=lifespan)


@app.post("/predict")
def predict(transaction: Transaction) -> Prediction:  # type: ignore[valid-type]
    return Prediction(**state["scorer"].score_rows([transaction.model_dump()], "predict")[0])  # type: ignore[attr-defined]
