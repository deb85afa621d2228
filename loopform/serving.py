"""What a model service does besides HTTP: request schemas, loading the release, scoring, payloads, metrics.

The BentoML service (bentos/<model>/service.py) is a thin shell over `Scorer`, and the serving benchmark
runs the same `Scorer` behind a plain FastAPI app, so the two differ only in the framework. Request schemas
are built from the feature schema (`loopform.data.FEATURES`): types are strict (a string is not a number),
categories must be known and numeric values finite and inside the schema's domain, so malformed input is
rejected as a 400 before it reaches the model. Heavy modules (mlflow, torch, pandas, prometheus_client) are
imported inside functions: BentoML sets PROMETHEUS_MULTIPROC_DIR only after the service module is imported.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from loopform.features import AS_OF

if TYPE_CHECKING:
    import pandas as pd

    from loopform.payloads import PayloadLog

log = logging.getLogger(__name__)

ENV_TRACKING_URI = "LOOPFORM_TRACKING_URI"
ENV_MODEL_URI = "LOOPFORM_MODEL_URI"
ENV_ARTIFACTS_DIGEST = "LOOPFORM_ARTIFACTS_DIGEST"
ENV_FEAST_REPO = "LOOPFORM_FEAST_REPO"
ENV_FEAST_CONFIG = "LOOPFORM_FEAST_CONFIG"
ENV_MODEL_PATH = "LOOPFORM_MODEL_PATH"
ENV_PAYLOAD_URI = "LOOPFORM_PAYLOAD_URI"
ENV_PAYLOAD_FLUSH_ROWS = "LOOPFORM_PAYLOAD_FLUSH_ROWS"
ENV_PAYLOAD_FLUSH_SECONDS = "LOOPFORM_PAYLOAD_FLUSH_SECONDS"
ENV_TORCH_THREADS = "LOOPFORM_TORCH_THREADS"

SCORE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)


class Prediction(BaseModel):
    """The answer to one transaction."""

    request_id: str = Field(description="Id of this answer; the payload log row carries the same id.")
    prediction: int = Field(description="1 when the score reaches the model's operating threshold (fraud).")
    score: float = Field(description="Fraud probability.")
    threshold: float = Field(description="Operating threshold of the released model.")
    model: str = Field(description="Registered model name.")
    version: int = Field(description="Registered model version that answered.")


class UnknownEntity(LookupError):
    """The online store holds no features for a requested entity."""


def _feature_type(feature: Any, *, optional: bool) -> tuple[Any, Any]:
    """(annotation, default) of one feature's request field: strict types, schema domain as bounds."""
    if feature.kind == "categorical":
        annotation: Any = Literal[tuple(feature.categories)]  # type: ignore[valid-type]
        field = Field(description=feature.description)
    else:
        base: type = int if feature.dtype == "int64" else float
        field = Field(
            strict=True,
            ge=feature.min,
            le=feature.max,
            allow_inf_nan=False if base is float else None,
            description=feature.description,
        )
        annotation = base
    if optional:
        return Annotated[annotation | None, field], None
    return Annotated[annotation, field], ...


def request_models(features: Sequence[Any], entity: str = "card_id") -> tuple[type[BaseModel], type[BaseModel]]:
    """(Transaction, CardTransaction) request schemas from the feature schema.

    Transaction carries every feature (the raw path). CardTransaction carries the card id and the
    transaction's own fields (features of scope "transaction"), all required: the card-level features
    (scope "card") come from the online store and are not accepted in the request. Unknown fields are
    errors, so a misspelt field, or an attempt to supply a card aggregate, is never silently ignored.
    """
    config = ConfigDict(extra="forbid", frozen=True)
    transaction = create_model(  # type: ignore[call-overload]
        "Transaction",
        __config__=config,
        __doc__="Raw features of one card transaction.",
        transaction_id=(str | None, Field(None, max_length=200, description="Caller's id, kept in the payload log.")),
        **{f.name: _feature_type(f, optional=False) for f in features},
    )
    by_entity = create_model(  # type: ignore[call-overload]
        "CardTransaction",
        __config__=config,
        __doc__="A card id and the transaction's own fields; the card's aggregates come from the online store.",
        **{
            entity: (
                Annotated[
                    int, Field(strict=True, ge=0, le=2**63 - 1, description="Entity id in the online store (int64).")
                ],
                ...,
            )
        },
        transaction_id=(str | None, Field(None, max_length=200, description="Caller's id, kept in the payload log.")),
        **{f.name: _feature_type(f, optional=False) for f in features if _scope(f) == "transaction"},
    )
    return transaction, by_entity


def _scope(feature: Any) -> str:
    """The feature's scope: "transaction" (the request's own field) or "card" (read from the online store)."""
    return str(getattr(feature, "scope", "transaction"))


def batch_model(transaction: type[BaseModel], max_rows: int = 10_000) -> type[BaseModel]:
    """The body of the batch API: `{"transactions": [...]}`."""
    return create_model(  # type: ignore[call-overload]
        "TransactionBatch",
        __config__=ConfigDict(extra="forbid", frozen=True),
        transactions=(list[transaction], Field(min_length=1, max_length=max_rows)),  # type: ignore[valid-type]
    )


# --- the released model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """A loaded model version."""

    model: Any
    name: str
    version: int
    uri: str


def parse_model_uri(uri: str) -> tuple[str, str | None, int | None]:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS, None); `models:/NAME/VERSION` -> (NAME, None, VERSION)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"model URI {uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in rest:
            return name, alias, None
    else:
        name, _, version = rest.partition("/")
        if name and version.isdigit() and int(version) > 0:
            return name, None, int(version)
    raise ValueError(f"model URI {uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")


class ArtifactDigestError(RuntimeError):
    """The registry serves other files than the signed release record names (e.g. swapped weights)."""


def load_release(tracking_uri: str, model_uri: str, artifacts_digest: str | None = None) -> Release:
    """Resolve an alias to its version once, then load exactly that version (the alias may move meanwhile).

    The model's files are downloaded first. With `artifacts_digest` (from the signed release record)
    they are refused unless their digest matches, so a weights file swapped in the artifact store is
    caught at load, before any request is scored. The model is rebuilt from those same files without
    unpickling (loopform.registry.load_model_folder: the image's model code + JSON + exported network).
    """
    import tempfile

    import mlflow
    from mlflow import MlflowClient

    from loopform import record
    from loopform.registry import download_model, load_model_folder

    name, alias, version = parse_model_uri(model_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if alias is not None:
        version = int(client.get_model_version_by_alias(name, alias).version)
    assert version is not None
    pinned = f"models:/{name}/{version}"
    with tempfile.TemporaryDirectory(prefix=f"loopform-{name}-v{version}-") as tmp:
        folder = download_model(tracking_uri, pinned, Path(tmp))
        if artifacts_digest:
            found = record.artifacts_digest(record.file_digests(folder))
            if found != artifacts_digest:
                raise ArtifactDigestError(
                    f"refusing {pinned}: its files hash to {found}, the signed release record names "
                    f"{artifacts_digest} (the artifacts were replaced after the release was signed)"
                )
        model = load_model_folder(folder)
    model.eval()
    return Release(model=model, name=name, version=version, uri=pinned)


def release_from_env() -> Release:
    """The release named by LOOPFORM_TRACKING_URI and LOOPFORM_MODEL_URI (clear error when unset).

    LOOPFORM_ARTIFACTS_DIGEST, when set (the platform sets it from the signed record), pins the files.
    """
    missing = [name for name in (ENV_TRACKING_URI, ENV_MODEL_URI) if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"set {' and '.join(missing)}: the service loads its model from MLflow, "
            f"e.g. {ENV_TRACKING_URI}=sqlite:////abs/mlflow.db {ENV_MODEL_URI}=models:/fraud@production"
        )
    return load_release(
        os.environ[ENV_TRACKING_URI], os.environ[ENV_MODEL_URI], os.environ.get(ENV_ARTIFACTS_DIGEST) or None
    )


def online_store_from_env(model_dir: Path) -> Any | None:
    """The online-feature reader the environment configures, or None (then only raw-feature APIs work).

    LOOPFORM_FEAST_REPO: a local Feast repo folder (the local loop). LOOPFORM_FEAST_CONFIG: the
    platform's feature_store.yaml (set by the ModelService component), applied to a scratch repo
    with the model's feature definitions from `model_dir` (LOOPFORM_MODEL_PATH overrides it).
    """
    import tempfile

    from loopform.features import FeatureRepo

    model_path = Path(os.environ.get(ENV_MODEL_PATH, str(model_dir)))
    if os.environ.get(ENV_FEAST_REPO):
        return FeatureRepo(Path(os.environ[ENV_FEAST_REPO]), model_path)
    if os.environ.get(ENV_FEAST_CONFIG):
        return FeatureRepo(Path(tempfile.mkdtemp(prefix="feast-")), model_path, config=os.environ[ENV_FEAST_CONFIG])
    return None


# --- metrics -------------------------------------------------------------------------------------------

_METRICS: dict[str, Any] = {}
_METRICS_LOCK = threading.Lock()


def metrics() -> dict[str, Any]:
    """The service's Prometheus metrics, created once per process in the default registry.

    Created on first use (not at import) so that BentoML's multiprocess directory is already set and the
    values show up on the service's /metrics.
    """
    with _METRICS_LOCK:
        if not _METRICS:
            from prometheus_client import Counter, Histogram

            _METRICS["predictions"] = Counter(
                "loopform_predictions",
                "Predictions served, by model, version, API and predicted class.",
                ["model", "version", "api", "prediction"],
            )
            _METRICS["score"] = Histogram(
                "loopform_prediction_score",
                "Distribution of fraud scores served.",
                ["model", "version"],
                buckets=SCORE_BUCKETS,
            )
            _METRICS["inference"] = Histogram(
                "loopform_inference_seconds",
                "Time of feature lookup plus forward pass of one API call (excludes HTTP and parsing).",
                ["model", "version", "api"],
            )
            _METRICS["rejected"] = Counter(
                "loopform_rejected_requests",
                "Requests refused by the service after schema validation (e.g. unknown entity).",
                ["model", "reason"],
            )
            _METRICS["payloads"] = Counter(
                "loopform_payload_records",
                "Records handed to the payload log.",
                ["model"],
            )
        return _METRICS


# --- scoring ------------------------------------------------------------------------------------------------


class Scorer:
    """Scores feature rows with a released model, logs payloads off the request path and counts metrics."""

    def __init__(
        self,
        release: Release,
        features: Sequence[str],
        *,
        payloads: PayloadLog | None = None,
        online: Any | None = None,
        entity: str = "card_id",
        stored: Sequence[str] = (),
        with_metrics: bool = True,
    ) -> None:
        self.release = release
        self.features = list(features)
        self.payloads = payloads
        self.online = online  # object with .online(ids, with_time=True) -> DataFrame (loopform.features.FeatureRepo)
        self.entity = entity
        unknown = [name for name in stored if name not in self.features]
        if unknown:
            raise ValueError(f"stored feature(s) {unknown} are not model features {self.features}")
        self.stored = [name for name in self.features if name in set(stored)]  # read from the online store
        self.request_fields = [name for name in self.features if name not in set(stored)]  # the request's own
        self.metrics = metrics() if with_metrics else None
        self._labels = {"model": release.name, "version": str(release.version)}
        self._online_lock = threading.Lock()

    @property
    def threshold(self) -> float:
        return float(getattr(self.release.model, "threshold", 0.5))

    def score_rows(self, rows: Sequence[Mapping[str, Any]], api: str) -> list[dict[str, Any]]:
        """Predictions for rows of raw features (already validated); one payload record per row."""
        import pandas as pd

        started = time.perf_counter()
        frame = pd.DataFrame.from_records([{name: row[name] for name in self.features} for row in rows])
        return self._finish(frame, rows, api, started)

    def score_entity(self, request: Mapping[str, Any], api: str) -> dict[str, Any]:
        """Prediction for a transaction of an entity: its own fields from the request, the rest from the online store.

        The request must carry every feature that is not stored (`request_fields`); the stored ones are the
        entity's current online row. The payload record holds exactly the vector scored, plus
        `features_as_of`, the event time of the online row.
        """
        import pandas as pd

        started = time.perf_counter()
        if self.online is None:
            raise RuntimeError(f"no online feature store configured: set {ENV_FEAST_REPO} or {ENV_FEAST_CONFIG}")
        missing = [name for name in self.request_fields if request.get(name) is None]
        if missing:
            raise ValueError(f"the request lacks the transaction's own field(s) {missing}")
        entity_id = int(request[self.entity])
        with self._online_lock:  # one online-store connection per process; reads are ~ms
            stored = self.online.online([entity_id], with_time=True)
        absent = [name for name in self.stored if name not in stored.columns]
        if absent:
            raise RuntimeError(f"the online store's feature service does not provide {absent}")
        if stored.empty or stored[self.stored].isna().any(axis=None):
            if self.metrics is not None:
                self.metrics["rejected"].labels(model=self.release.name, reason="unknown_entity").inc()
            raise UnknownEntity(f"no online features for {self.entity}={entity_id}")
        first = stored.iloc[0]
        row = {name: _plain(first[name]) if name in self.stored else request[name] for name in self.features}
        frame = pd.DataFrame.from_records([row], columns=self.features)
        as_of = first.get(AS_OF)
        context = {AS_OF: None if as_of is None or pd.isna(as_of) else as_of.to_pydatetime()}
        return self._finish(frame, [request], api, started, [context])[0]

    def _finish(
        self,
        frame: pd.DataFrame,
        requests: Sequence[Mapping[str, Any]],
        api: str,
        started: float,
        contexts: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        scores = self.release.model.predict_proba(frame)
        threshold = self.threshold
        predictions = (scores >= threshold).astype(int)
        elapsed = time.perf_counter() - started
        now = datetime.now(UTC)
        answers = []
        records = []
        values = frame.to_dict("records")
        contexts = contexts or [{} for _ in requests]
        for request, row, context, score, prediction in zip(
            requests, values, contexts, scores, predictions, strict=True
        ):
            request_id = uuid.uuid4().hex
            answers.append(
                {
                    "request_id": request_id,
                    "prediction": int(prediction),
                    "score": float(score),
                    "threshold": threshold,
                    "model": self.release.name,
                    "version": self.release.version,
                }
            )
            records.append(
                {
                    "time": now,
                    "request_id": request_id,
                    "api": api,
                    "transaction_id": request.get("transaction_id"),
                    self.entity: request.get(self.entity),
                    **{name: _plain(row[name]) for name in self.features},
                    "prediction": int(prediction),
                    "score": float(score),
                    "model": self.release.name,
                    "model_version": self.release.version,
                    "request": json.dumps({k: v for k, v in request.items() if v is not None}, default=str),
                    # Card path: when the online row served was computed (every record has the key, so the
                    # Parquet schema, inferred from a batch's first record, always has the column).
                    AS_OF: context.get(AS_OF),
                }
            )
        if self.payloads is not None:
            self.payloads.log(records)
        if self.metrics is not None:
            m = self.metrics
            m["inference"].labels(api=api, **self._labels).observe(elapsed)
            m["payloads"].labels(model=self.release.name).inc(len(records))
            for answer in answers:
                m["predictions"].labels(api=api, prediction=str(answer["prediction"]), **self._labels).inc()
                m["score"].labels(**self._labels).observe(answer["score"])
        return answers


def _plain(value: Any) -> Any:
    """numpy scalars to Python scalars, so Arrow infers one type per column."""
    return value.item() if hasattr(value, "item") else value


def torch_threads() -> None:
    """Intra-op threads for the forward pass: one by default, since concurrency comes from requests."""
    import torch

    torch.set_num_threads(int(os.environ.get(ENV_TORCH_THREADS, "1")))


# --- running a service locally ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now (for tests and the local loop)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BentoServer:
    """`bentoml serve` of a service as a subprocess on localhost: start, wait until ready, stop gracefully.

    Used by `loopform up`, the service tests and the serving benchmark. Stopping sends SIGTERM (BentoML
    then runs the service's shutdown hooks, which drain the payload log) and waits for the process.
    """

    def __init__(
        self,
        service: str,
        *,
        working_dir: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.service = service
        self.working_dir = str(working_dir)
        self.env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true", **(env or {})}
        self.port = port or free_port()
        self.host = host
        self.log_path = log_path
        self.process: Any = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout: float = 180.0) -> BentoServer:
        """Start the server and return once /readyz answers 200 (or raise with the server's log tail)."""
        import subprocess
        import sys

        import httpx

        command = [
            sys.executable, "-m", "bentoml", "serve", self.service,
            "--host", self.host, "--port", str(self.port), "--working-dir", self.working_dir,
        ]  # fmt: skip
        self._log_file = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            command, cwd=self.working_dir, env=self.env, stdout=self._log_file, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"bentoml serve was not ready in {ready_timeout} s: {self.log_tail()}")

    def stop(self, sig: int | None = None, timeout: float = 60.0) -> int | None:
        """Graceful stop (SIGTERM by default); kill only if it does not exit within `timeout`."""
        import signal
        import subprocess

        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig or signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_file not in (None, subprocess.DEVNULL):
            self._log_file.close()
        return self.process.returncode

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path:
            return "(no log file)"
        from pathlib import Path

        path = Path(self.log_path)
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log yet)"

    def __enter__(self) -> BentoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
