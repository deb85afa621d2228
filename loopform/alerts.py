"""Alertmanager drift alerts -> retraining requests: one drift incident starts exactly one retraining.

Alertmanager re-sends a firing group every `repeat_interval`, retries failed deliveries, and a group's
notification can mix firing and resolved alerts. `retraining_requests` is the one decision shared by the
local webhook receiver (`WebhookReceiver`) and the cluster's Argo Events Sensor logic: an alert starts
retraining only when its OWN status is `firing`, its alertname is `DRIFT_ALERTNAME`, and its incident
(model, fingerprint, startsAt) was not acted on before. The fingerprint names the alert's label set and
`startsAt` the episode, so a re-sent notification of the same incident starts nothing, while a new incident
after resolution (Prometheus gives it a new `startsAt`) starts one. Resolved notifications start nothing
and change nothing: the incident stays recorded, so a late re-delivery of its firing notification is
still ignored.

`IncidentStore` makes that durable across restarts and processes: a JSON file rewritten atomically under
an exclusive `flock`, so two receivers sharing it cannot both claim one incident.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Container, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: The drift alert's name; the PrometheusRule that raises it and the Alertmanager route use the same one.
DRIFT_ALERTNAME = "LoopformDriftShareHigh"
#: The label that names the model on the drift gauges (`loopform.monitor.gauges`) and so on the alert.
MODEL_LABEL = "model"
#: Alertmanager's webhook payload version this module reads.
PAYLOAD_VERSION = "4"

log = logging.getLogger(__name__)


class MalformedPayload(ValueError):
    """The body is not an Alertmanager version-4 webhook payload (the receiver answers 400)."""


@dataclass(frozen=True)
class RetrainRequest:
    """One model's retraining, asked for by one firing drift incident."""

    model: str
    fingerprint: str
    starts_at: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]

    @property
    def key(self) -> str:
        """The incident's identity in the dedupe store."""
        return incident_key(self.model, self.fingerprint, self.starts_at)


def incident_key(model: str, fingerprint: str, starts_at: str) -> str:
    return f"{model}/{fingerprint}/{starts_at}"


def _string_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise MalformedPayload(f"{where} must be an object of strings")
    return value


def _field(alert: dict[str, Any], name: str, where: str) -> str:
    value = alert.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedPayload(f"{where}.{name} must be a non-empty string")
    return value


def retraining_requests(payload: Any, acted: Container[str]) -> list[RetrainRequest]:
    """The retraining requests `payload` starts, given the incident keys already `acted` on.

    Pure: reads nothing else and changes nothing; the caller records the returned keys. Raises
    `MalformedPayload` when the payload is not a version-4 Alertmanager webhook body, or a drift alert
    lacks its model label (the whole payload is refused rather than half acted on).
    """
    if not isinstance(payload, dict):
        raise MalformedPayload("payload must be a JSON object")
    if payload.get("version") != PAYLOAD_VERSION:
        raise MalformedPayload(f"payload version must be {PAYLOAD_VERSION!r}, got {payload.get('version')!r}")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise MalformedPayload("payload.alerts must be a list")
    requests: dict[str, RetrainRequest] = {}
    for index, alert in enumerate(alerts):
        where = f"alerts[{index}]"
        if not isinstance(alert, dict):
            raise MalformedPayload(f"{where} must be an object")
        status = alert.get("status")
        if status not in ("firing", "resolved"):
            raise MalformedPayload(f"{where}.status must be 'firing' or 'resolved', got {status!r}")
        labels = _string_map(alert.get("labels"), f"{where}.labels")
        annotations = _string_map(alert.get("annotations", {}), f"{where}.annotations")
        fingerprint = _field(alert, "fingerprint", where)
        starts_at = _field(alert, "startsAt", where)
        if labels.get("alertname") != DRIFT_ALERTNAME:
            continue
        model = labels.get(MODEL_LABEL)
        if not model:
            raise MalformedPayload(f"{where}: {DRIFT_ALERTNAME} without a {MODEL_LABEL!r} label")
        if status != "firing":
            continue
        request = RetrainRequest(model, fingerprint, starts_at, labels, annotations)
        if request.key not in acted:
            requests.setdefault(request.key, request)
    return list(requests.values())


class IncidentStore:
    """Incident keys already acted on, in a JSON file shared by every receiver on the machine.

    Each change holds an exclusive `flock` on `<path>.lock` from read to atomic replace, so concurrent
    claims (threads or processes) see each other's writes.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    @contextmanager
    def _locked(self) -> Iterator[dict[str, str]]:
        """The stored {key: claimed_at}, under the lock; written back when the block changed it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                incidents: dict[str, str] = json.loads(self.path.read_text()) if self.path.exists() else {}
                before = dict(incidents)
                yield incidents
                if incidents != before:
                    self._write(incidents)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, incidents: dict[str, str]) -> None:
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(incidents, out, indent=2, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def keys(self) -> set[str]:
        with self._locked() as incidents:
            return set(incidents)

    def claim(self, payload: Any) -> list[RetrainRequest]:
        """Decide `payload` against the store and record what it starts, in one locked step."""
        with self._locked() as incidents:
            requests = retraining_requests(payload, incidents)
            claimed_at = datetime.now(UTC).isoformat()
            incidents.update({request.key: claimed_at for request in requests})
        return requests

    def release(self, requests: list[RetrainRequest]) -> None:
        """Forget claims whose retraining could not be started, so Alertmanager's retry can start them."""
        with self._locked() as incidents:
            for request in requests:
                incidents.pop(request.key, None)


def handle_notification(
    payload: Any, store: IncidentStore, start: Callable[[RetrainRequest], object]
) -> list[RetrainRequest]:
    """Claim `payload`'s new incidents, then `start` each; unstarted claims are released if `start` raises."""
    requests = store.claim(payload)
    for index, request in enumerate(requests):
        try:
            start(request)
        except Exception:
            store.release(requests[index:])
            raise
    return requests


@dataclass(frozen=True)
class Notification:
    """What the receiver did with one delivery (kept for `loopform up`'s status and for tests)."""

    status: str
    alerts: int
    started: tuple[RetrainRequest, ...]


class WebhookReceiver:
    """Alertmanager's webhook target on localhost: POST `path` -> `handle_notification`.

    Answers 200 when handled, 400 to a malformed payload (Alertmanager does not retry 4xx), 500 when
    starting a retraining failed (its claim is released and Alertmanager retries), 404 elsewhere.
    """

    def __init__(
        self,
        store: IncidentStore,
        start: Callable[[RetrainRequest], object],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/alerts",
    ) -> None:
        self.store = store
        self.start = start
        self.path = path
        self._host = host
        self.notifications: deque[Notification] = deque(maxlen=1000)
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._server.server_port}{self.path}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != receiver.path:
                    self._answer(HTTPStatus.NOT_FOUND, "unknown path")
                    return
                try:
                    payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    self._answer(HTTPStatus.BAD_REQUEST, f"not JSON: {error}")
                    return
                try:
                    started = handle_notification(payload, receiver.store, receiver.start)
                except MalformedPayload as error:
                    self._answer(HTTPStatus.BAD_REQUEST, str(error))
                    return
                except Exception as error:
                    log.exception("handling an Alertmanager notification failed")
                    self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, str(error))
                    return
                receiver.notifications.append(
                    Notification(str(payload.get("status")), len(payload["alerts"]), tuple(started))
                )
                self._answer(HTTPStatus.OK, json.dumps({"started": [request.key for request in started]}))

            def _answer(self, status: HTTPStatus, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if status == HTTPStatus.OK else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

        return Handler

    def __enter__(self) -> WebhookReceiver:
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopform-alerts", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
