"""Scoring with a released model: feature rows in, answers out, every answer a payload record.

The BentoML service (`loopform.serving.bento`) is a thin shell over `Scorer`, and the serving benchmark runs
the same `Scorer` behind a plain FastAPI app, so the two differ only in the framework. Everything the scorer
knows about the model comes from its `Contract`: the features and their order, the caller's id, the entity
and which features the online store serves by entity id, and the task (a classifier has
`predict_proba(frame)` and `threshold`, a regressor `predict(frame)` in the label's unit).

A model that also has `predict_proba_records(rows)` (a classifier) or `predict_records(rows)` (a regressor),
the same answers for rows given as mappings of raw features, is scored without a pandas DataFrame per
request (`loopform.tabular` models have them): for a small network, building the DataFrame costs more than
the forward pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from loopform.contract import Contract
from loopform.features import AS_OF
from loopform.payloads import CALLER
from loopform.serving.auth import current_caller
from loopform.serving.metrics import metrics
from loopform.serving.release import ENV_FEAST_CONFIG, ENV_FEAST_REPO, Release

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from loopform.payloads import PayloadLog

ENV_TORCH_THREADS = "LOOPFORM_TORCH_THREADS"


class UnknownEntity(LookupError):
    """The online store holds no features for a requested entity."""


class Scorer:
    """Scores feature rows with a released model, logs payloads off the request path and counts metrics."""

    def __init__(
        self,
        release: Release,
        contract: Contract,
        *,
        payloads: PayloadLog | None = None,
        online: Any | None = None,
        with_metrics: bool = True,
    ) -> None:
        method = "predict_proba" if contract.classification else "predict"
        needs = [method, "threshold"] if contract.classification else [method]
        lacking = [name for name in needs if not hasattr(release.model, name)]
        if lacking:
            raise TypeError(
                f"model {release.name!r} is a {contract.task} model by its contract but lacks {', '.join(lacking)}"
            )
        self.release = release
        self.contract = contract
        self.features = list(contract.feature_names)
        self.payloads = payloads
        self.online = online  # object with .online(ids, with_time=True) -> DataFrame (loopform.features.FeatureRepo)
        self.metrics = metrics(contract) if with_metrics else None
        self._labels = {"model": release.name, "version": str(release.version)}
        if self.metrics is not None:
            self.metrics.serving(release.name, release.version)
        self._online_lock = threading.Lock()

    @property
    def threshold(self) -> float:
        """A classifier's operating threshold (the released model's)."""
        return float(self.release.model.threshold)

    def score_rows(self, rows: Sequence[Mapping[str, Any]], api: str) -> list[dict[str, Any]]:
        """Answers for rows of raw features (already validated); one payload record per row."""
        started = time.perf_counter()
        vectors = [{name: row[name] for name in self.features} for row in rows]
        return self._finish(vectors, rows, api, started)

    def score_entity(self, request: Mapping[str, Any], api: str) -> dict[str, Any]:
        """Answer for an event of an entity: its own fields from the request, the entity's features from the store.

        The request must carry every event-scope feature; the entity-scope ones are the entity's current
        online row. The payload record holds exactly the vector scored, plus `features_as_of`, the event
        time of the online row.
        """
        import pandas as pd

        started = time.perf_counter()
        contract = self.contract
        if self.online is None:
            raise RuntimeError(f"no online feature store configured: set {ENV_FEAST_REPO} or {ENV_FEAST_CONFIG}")
        missing = [name for name in contract.event_features if request.get(name) is None]
        if missing:
            raise ValueError(f"the request lacks the event's own field(s) {missing}")
        entity_id = int(request[contract.entity])
        with self._online_lock:  # one online-store connection per process; reads are ~ms
            stored = self.online.online([entity_id], with_time=True)
        served = list(contract.entity_features)
        absent = [name for name in served if name not in stored.columns]
        if absent:
            raise RuntimeError(f"the online store's feature service does not provide {absent}")
        if stored.empty or stored[served].isna().any(axis=None):
            if self.metrics is not None:
                self.metrics.rejected_request(self.release.name, "unknown_entity")
            raise UnknownEntity(f"no online features for {contract.entity}={entity_id}")
        first = stored.iloc[0]
        row = {name: _plain(first[name]) if name in served else request[name] for name in self.features}
        as_of = first.get(AS_OF)
        context = {AS_OF: None if as_of is None or pd.isna(as_of) else as_of.to_pydatetime()}
        return self._finish([row], [request], api, started, [context])[0]

    def _predict(self, vectors: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
        """(the task's answer fields per row, predictions, what the score histogram observes)."""
        import numpy as np

        model = self.release.model
        if self.contract.classification:
            by_records = getattr(model, "predict_proba_records", None)
            scores = np.asarray(
                by_records(vectors) if by_records else model.predict_proba(self._frame(vectors)), dtype=np.float64
            )
            threshold = self.threshold
            classes = (scores >= threshold).astype(np.int64)
            fields = [
                {"prediction": int(c), "score": float(s), "threshold": threshold}
                for c, s in zip(classes, scores, strict=True)
            ]
            return fields, classes, scores
        by_records = getattr(model, "predict_records", None)
        values = by_records(vectors) if by_records else model.predict(self._frame(vectors))
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        return [{"prediction": float(v)} for v in values], values, values

    def _frame(self, vectors: list[dict[str, Any]]) -> pd.DataFrame:
        """The feature vectors as the DataFrame a model without a records method reads."""
        import pandas as pd

        return pd.DataFrame.from_records(vectors, columns=self.features)

    def _finish(
        self,
        vectors: list[dict[str, Any]],
        requests: Sequence[Mapping[str, Any]],
        api: str,
        started: float,
        contexts: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        contract = self.contract
        fields, predictions, scores = self._predict(vectors)
        elapsed = time.perf_counter() - started
        now = datetime.now(UTC)
        answers = []
        records = []
        caller = current_caller()
        contexts = contexts or [{} for _ in requests]
        for request, row, context, answer in zip(requests, vectors, contexts, fields, strict=True):
            request_id = uuid.uuid4().hex
            answers.append(
                {"request_id": request_id, **answer, "model": self.release.name, "version": self.release.version}
            )
            records.append(
                {
                    "time": now,
                    "request_id": request_id,
                    "api": api,
                    CALLER: caller,
                    contract.id: request.get(contract.id),
                    contract.entity: request.get(contract.entity),
                    **{name: _plain(row[name]) for name in self.features},
                    **{name: answer[name] for name in ("prediction", "score") if name in answer},
                    "model": self.release.name,
                    "model_version": self.release.version,
                    "request": json.dumps({k: v for k, v in request.items() if v is not None}, default=str),
                    # Entity path: when the online row served was computed (every record has the key, so the
                    # Parquet schema, inferred from a batch's first record, always has the column).
                    AS_OF: context.get(AS_OF),
                }
            )
        if self.payloads is not None:
            self.payloads.log(records)
        if self.metrics is not None:
            self.metrics.answered(self._labels, api, predictions.tolist(), scores.tolist(), elapsed)
        return answers


def _plain(value: Any) -> Any:
    """numpy scalars to Python scalars, so Arrow infers one type per column."""
    return value.item() if hasattr(value, "item") else value


def torch_threads() -> None:
    """One intra-op and one inter-op thread by default: concurrency comes from requests and workers, and a
    one-row forward pass of a small MLP gains nothing from threads (bench/SERVING.md measures it), while each
    extra thread per worker competes for the cores the other workers serve on."""
    import torch

    threads = int(os.environ.get(ENV_TORCH_THREADS, "1"))
    torch.set_num_threads(threads)
    # torch allows this only before the first inter-op work (RuntimeError after): then the pool it started stays
    if torch.get_num_interop_threads() != threads:
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)
