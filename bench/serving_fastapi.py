"""Baseline for bench/serving.py: the same Scorer (model, payload log, metrics) behind a plain FastAPI app.

Run: LOOPFORM_TRACKING_URI=... LOOPFORM_MODEL_URI=... python -m uvicorn bench.serving_fastapi:app --port 8000
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from loopform.serving.release import payload_log_from_env, release_from_env
from loopform.serving.schemas import schemas
from loopform.serving.scorer import Scorer, torch_threads
from models.fraud.contract import CONTRACT

api = schemas(CONTRACT)
Request, Prediction = api.request, api.response
state: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    torch_threads()
    release = release_from_env()
    payloads = payload_log_from_env(release.name)
    state["scorer"] = Scorer(release, CONTRACT, payloads=payloads)
    yield
    payloads.close()


app = FastAPI(lifespan=lifespan)


@app.post("/predict")
def predict(event: Request) -> Prediction:  # type: ignore[valid-type]
    return Prediction(**state["scorer"].score_rows([event.model_dump()], "predict")[0])
