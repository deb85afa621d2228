"""Drift alerts -> retraining: the shared firing-only, fingerprint-dedupe decision, its store, and a real Alertmanager.

The integration test runs Debian's `prometheus-alertmanager` (`.ci/run` installs it): it skips where the binary
is missing, except in CI (`CI` set), where it must run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from loopform.alerts import (
    DRIFT_ALERTNAME,
    IncidentStore,
    MalformedPayload,
    RetrainRequest,
    WebhookReceiver,
    handle_notification,
    incident_key,
    retraining_requests,
)

STARTS = "2026-11-27T10:00:00Z"
LATER = "2026-11-27T12:00:00Z"


def alert(
    status: str = "firing",
    model: str = "fraud",
    fingerprint: str = "aaaa1111",
    starts_at: str = STARTS,
    alertname: str = DRIFT_ALERTNAME,
) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": alertname, "model": model, "stack": "dev"},
        "annotations": {"summary": "drift share above threshold"},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-27T11:00:00Z",
        "generatorURL": "http://prometheus:9090/graph",
        "fingerprint": fingerprint,
    }


def payload(*alerts: Any, status: str = "firing") -> dict[str, Any]:
    """A version-4 webhook body as Alertmanager sends it (the group's status is given separately)."""
    return {
        "version": "4",
        "groupKey": '{}/{alertname="LoopformDriftShareHigh"}:{model="fraud"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "loopform-retrain",
        "groupLabels": {"model": "fraud"},
        "commonLabels": {"alertname": DRIFT_ALERTNAME},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }


def models(requests: list[RetrainRequest]) -> list[str]:
    return [request.model for request in requests]


# --- the shared decision -------------------------------------------------------------------------------------


def test_a_firing_drift_alert_starts_its_models_retraining() -> None:
    (request,) = retraining_requests(payload(alert()), set())
    assert (request.model, request.fingerprint, request.starts_at) == ("fraud", "aaaa1111", STARTS)
    assert request.key == incident_key("fraud", "aaaa1111", STARTS)
    assert request.labels["stack"] == "dev"


def test_the_alerts_own_status_decides_not_the_groups() -> None:
    # A group is "firing" while any of its alerts fires; its resolved alerts must still start nothing.
    mixed = payload(alert("resolved", "delivery", "bbbb2222"), alert("firing", "fraud"), status="firing")
    assert models(retraining_requests(mixed, set())) == ["fraud"]
    assert retraining_requests(payload(alert("resolved"), status="firing"), set()) == []


def test_a_resent_notification_of_the_same_incident_starts_nothing() -> None:
    acted: set[str] = set()
    first = retraining_requests(payload(alert()), acted)
    acted.update(request.key for request in first)
    assert len(first) == 1
    assert retraining_requests(payload(alert()), acted) == []
    # The same incident listed twice in one body (e.g. two routes merged) is still one request.
    assert len(retraining_requests(payload(alert(), alert()), set())) == 1


def test_a_new_incident_after_resolution_starts_one_and_resolution_starts_none() -> None:
    acted = {incident_key("fraud", "aaaa1111", STARTS)}
    assert retraining_requests(payload(alert("resolved"), status="resolved"), acted) == []
    (request,) = retraining_requests(payload(alert(starts_at=LATER)), acted)
    assert request.starts_at == LATER


def test_each_model_and_fingerprint_is_its_own_incident() -> None:
    both = payload(alert(model="fraud", fingerprint="aaaa1111"), alert(model="delivery", fingerprint="bbbb2222"))
    assert sorted(models(retraining_requests(both, set()))) == ["delivery", "fraud"]


def test_other_alertnames_are_ignored() -> None:
    other = alert(alertname="LoopformMonitorStale")
    del other["labels"]["model"]  # another alert need not carry the model label
    assert retraining_requests(payload(other, alert(alertname="ServingErrorRate")), set()) == []


@pytest.mark.parametrize(
    "body",
    [
        [],
        "firing",
        {"status": "firing", "alerts": [alert()]},  # no version
        {**payload(alert()), "version": "3"},
        {**payload(), "alerts": {"0": alert()}},
        payload("not an alert"),
        payload({**alert(), "status": "pending"}),
        payload({**alert(), "labels": {"alertname": DRIFT_ALERTNAME, "model": 1}}),
        payload({**alert(), "fingerprint": ""}),
        payload({k: v for k, v in alert().items() if k != "startsAt"}),
        payload({**alert(), "labels": {"alertname": DRIFT_ALERTNAME}}),  # the drift alert without its model
    ],
)
def test_malformed_payloads_are_refused(body: Any) -> None:
    with pytest.raises(MalformedPayload):
        retraining_requests(body, set())


# --- the durable store ---------------------------------------------------------------------------------------


def test_the_store_remembers_incidents_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "incidents.json"
    assert models(IncidentStore(path).claim(payload(alert()))) == ["fraud"]
    assert IncidentStore(path).claim(payload(alert())) == []
    assert IncidentStore(path).keys() == {incident_key("fraud", "aaaa1111", STARTS)}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_start_releases_its_claim_so_a_retry_starts_it(tmp_path: Path) -> None:
    store = IncidentStore(tmp_path / "incidents.json")

    def broken(request: RetrainRequest) -> None:
        raise RuntimeError("workflow submission refused")

    with pytest.raises(RuntimeError):
        handle_notification(payload(alert()), store, broken)
    assert store.keys() == set()
    started: list[RetrainRequest] = []
    assert models(handle_notification(payload(alert()), store, started.append)) == ["fraud"]
    assert len(started) == 1


RACED = 40


def _race(store_path: str, log_path: str, barrier: Any) -> None:
    """One receiver process: every incident, claimed as soon as the other process is ready too."""
    store = IncidentStore(store_path)

    def start(request: RetrainRequest) -> None:
        with open(log_path, "a") as log:
            log.write(request.key + "\n")

    barrier.wait()
    for index in range(RACED):
        handle_notification(payload(alert(fingerprint=f"fp{index:04d}")), store, start)


def test_two_processes_racing_start_each_incident_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    store_path, log_path = str(tmp_path / "incidents.json"), str(tmp_path / "started.log")
    workers = [context.Process(target=_race, args=(store_path, log_path, barrier)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0]
    started = Path(log_path).read_text().split()
    assert len(started) == RACED and len(set(started)) == RACED


# --- the HTTP receiver ---------------------------------------------------------------------------------------


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_the_receiver_answers_200_400_404_and_500(tmp_path: Path) -> None:
    started: list[RetrainRequest] = []
    with WebhookReceiver(IncidentStore(tmp_path / "incidents.json"), started.append) as receiver:
        assert post(receiver.url, json.dumps(payload(alert())).encode()) == 200
        assert post(receiver.url, json.dumps(payload(alert())).encode()) == 200
        assert post(receiver.url, b"{not json") == 400
        assert post(receiver.url, json.dumps({"version": "4"}).encode()) == 400
        assert post(receiver.url.replace("/alerts", "/other"), b"{}") == 404
    assert models(started) == ["fraud"]
    assert [len(n.started) for n in receiver.notifications] == [1, 0]

    def broken(request: RetrainRequest) -> None:
        raise RuntimeError("workflow submission refused")

    with WebhookReceiver(IncidentStore(tmp_path / "other.json"), broken) as receiver:
        assert post(receiver.url, json.dumps(payload(alert())).encode()) == 500


# --- a real Alertmanager -------------------------------------------------------------------------------------


def alertmanager_binary() -> str | None:
    return shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


needs_alertmanager = pytest.mark.skipif(
    alertmanager_binary() is None and not os.environ.get("CI"),
    reason="Alertmanager missing (apt-get install prometheus-alertmanager)",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until `condition` holds; the generous deadline only keeps a broken run from hanging."""
    deadline = time.monotonic() + 120
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"alertmanager exited ({process.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Callable[[str], tuple[str, subprocess.Popen[bytes]]]]:
    """Starts Alertmanager routing the drift alert to a webhook URL; yields its API base and process."""
    binary = alertmanager_binary()
    assert binary, "prometheus-alertmanager is missing: .ci/run installs it"
    processes: list[subprocess.Popen[bytes]] = []

    def start(webhook: str) -> tuple[str, subprocess.Popen[bytes]]:
        # Short intervals so that Alertmanager re-sends the firing group every couple of seconds.
        config = f"""
route:
  receiver: ignore
  group_by: [alertname]
  routes:
    - matchers: ['alertname="{DRIFT_ALERTNAME}"']
      receiver: loopform-retrain
      group_by: [alertname, model]
      group_wait: 1s
      group_interval: 1s
      repeat_interval: 2s
receivers:
  - name: ignore
  - name: loopform-retrain
    webhook_configs:
      - url: {webhook}
        send_resolved: true
"""
        (tmp_path / "alertmanager.yml").write_text(config)
        port = free_port()
        log = open(tmp_path / "alertmanager.log", "wb")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: ready(f"{base}/-/ready"), "alertmanager to be ready", process)
        return base, process

    yield start
    for process in processes:
        process.terminate()
        process.wait()


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@needs_alertmanager
def test_a_resent_alert_starts_one_retraining_and_its_resolution_none(tmp_path: Path, alertmanager: Any) -> None:
    started: list[RetrainRequest] = []
    lock = threading.Lock()

    def start(request: RetrainRequest) -> None:
        with lock:
            started.append(request)

    with WebhookReceiver(IncidentStore(tmp_path / "incidents.json"), start) as receiver:
        base, process = alertmanager(receiver.url)
        labels = {"alertname": DRIFT_ALERTNAME, "model": "fraud", "stack": "dev"}
        first = datetime.now(UTC) - timedelta(minutes=1)

        def send(starts_at: datetime, ends_at: datetime | None = None) -> None:
            body: dict[str, Any] = {"labels": labels, "annotations": {"summary": "drift"}, "startsAt": iso(starts_at)}
            if ends_at is not None:
                body["endsAt"] = iso(ends_at)
            assert post(f"{base}/api/v2/alerts", json.dumps([body]).encode()) == 200

        def firing(count: int) -> Callable[[], bool]:
            return lambda: sum(n.status == "firing" for n in receiver.notifications) >= count

        # The monitor's rule keeps firing: the alert is posted again and Alertmanager re-sends the group.
        for count in (1, 2, 3):
            send(first)
            wait_for(firing(count), f"{count} firing notifications", process)
        assert models(started) == ["fraud"]
        assert all(n.alerts == 1 for n in receiver.notifications)

        send(first, ends_at=datetime.now(UTC) - timedelta(seconds=1))
        wait_for(lambda: any(n.status == "resolved" for n in receiver.notifications), "the resolved notification")
        assert models(started) == ["fraud"]
        assert all(not n.started for n in receiver.notifications if n.status == "resolved")

        # A later incident of the same model (a new startsAt) starts its own retraining.
        send(datetime.now(UTC))
        wait_for(lambda: len(started) >= 2, "the new incident's retraining", process)
        first_incident, second_incident = started
        assert first_incident.fingerprint == second_incident.fingerprint
        assert first_incident.starts_at != second_incident.starts_at
