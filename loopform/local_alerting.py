"""The cluster's drift route on one machine: Pushgateway -> Prometheus -> Alertmanager -> webhook receiver.

`loopform up` pushes each monitor run's gauges to a real Pushgateway; a real Prometheus scrapes it
(`honor_labels`, so the pushed `model` label stays) and evaluates the spec's drift rule
(`loopform.alert_rules`); a real Alertmanager routes the firing alert to `loopform.alerts.WebhookReceiver`,
whose firing-only, per-incident dedupe (shared with the cluster) decides that retraining starts, once.

The servers are Debian's `prometheus`, `prometheus-pushgateway` and `prometheus-alertmanager`, started as
subprocesses on free localhost ports with configs, data and logs under one folder, and stopped on exit. The
rule keeps the spec's expression; only its timings are local (`LOCAL_FOR`, `LOCAL_INTERVAL`, and
Alertmanager's `LOCAL_GROUP_WAIT`/`LOCAL_REPEAT`), so the loop waits seconds, not the spec's `alert_for`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

from loopform.alerts import DRIFT_ALERTNAME, IncidentStore, RetrainRequest, WebhookReceiver

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

#: Debian's binary names, then upstream's.
BINARIES = {
    "prometheus": ("prometheus",),
    "pushgateway": ("prometheus-pushgateway", "pushgateway"),
    "alertmanager": ("prometheus-alertmanager", "alertmanager"),
}
PACKAGES = ("prometheus", "prometheus-pushgateway", "prometheus-alertmanager")
#: Local timings: scrape and rule evaluation every second, the drift rule's `for` two seconds.
LOCAL_INTERVAL = "1s"
LOCAL_FOR = "2s"
#: Alertmanager: first notification after a second, re-sent every five while the alert fires.
LOCAL_GROUP_WAIT = "1s"
LOCAL_REPEAT = "5s"
#: Guards that only keep a broken server from hanging the caller; nothing waits for them on a good run.
START_GUARD_S = 60.0
STOP_GUARD_S = 30.0
WAIT_GUARD_S = 300.0
_POLL_S = 0.1


def binaries() -> dict[str, str | None]:
    """Each server's binary on PATH, or None where it is missing."""
    return {name: next(filter(None, map(shutil.which, names)), None) for name, names in BINARIES.items()}


def missing() -> list[str]:
    """The servers whose binary is missing (empty: the real route can run)."""
    return sorted(name for name, path in binaries().items() if path is None)


def drift_rules(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The spec's rule groups cut to the drift alert, with the local `for` (the expression is the spec's)."""
    local = []
    for group in groups:
        rules = [{**rule, "for": LOCAL_FOR} for rule in group["rules"] if rule.get("alert") == DRIFT_ALERTNAME]
        if rules:
            local.append({"name": group["name"], "interval": LOCAL_INTERVAL, "rules": rules})
    return local


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class Server:
    """One server subprocess with its log; `start` returns once `/-/ready` answers."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path) -> None:
        self.name, self.argv, self.port, self.log_path = name, argv, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_GUARD_S
        while not ready(f"{self.url}/-/ready"):
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}) on start: see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready on {self.url} after {START_GUARD_S:.0f}s: {self.log_path}")
            time.sleep(_POLL_S)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_GUARD_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()


class LocalAlerting:
    """Pushgateway, Prometheus (with `rule_groups`) and Alertmanager on localhost, routing the drift alert to
    a `WebhookReceiver` whose new incidents are handed to `start`. Use as a context manager."""

    def __init__(
        self, directory: Path, rule_groups: list[dict[str, Any]], start: Callable[[RetrainRequest], object]
    ) -> None:
        found = binaries()
        absent = sorted(name for name, path in found.items() if path is None)
        if absent:
            raise RuntimeError(f"missing {', '.join(absent)}: apt-get install {' '.join(PACKAGES)}")
        self.directory = directory
        self.rule_groups = drift_rules(rule_groups)
        self.receiver = WebhookReceiver(IncidentStore(directory / "incidents.json"), start)
        ports = {name: free_port() for name in BINARIES}
        self.pushgateway = Server(
            "pushgateway",
            [str(found["pushgateway"]), f"--web.listen-address=127.0.0.1:{ports['pushgateway']}"],
            ports["pushgateway"],
            directory / "pushgateway.log",
        )
        self.alertmanager = Server(
            "alertmanager",
            [
                str(found["alertmanager"]),
                f"--config.file={directory / 'alertmanager.yml'}",
                f"--storage.path={directory / 'alertmanager'}",
                f"--web.listen-address=127.0.0.1:{ports['alertmanager']}",
                "--cluster.listen-address=",  # one instance: no gossip port
            ],
            ports["alertmanager"],
            directory / "alertmanager.log",
        )
        self.prometheus = Server(
            "prometheus",
            [
                str(found["prometheus"]),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'prometheus'}",
                f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
            ],
            ports["prometheus"],
            directory / "prometheus.log",
        )
        self._started: list[Server] = []

    def _write_configs(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "rules.yml").write_text(yaml.safe_dump({"groups": self.rule_groups}, sort_keys=False))
        prometheus = {
            "global": {"scrape_interval": LOCAL_INTERVAL, "evaluation_interval": LOCAL_INTERVAL},
            "rule_files": [str(self.directory / "rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{self.alertmanager.port}"]}]}]},
            "scrape_configs": [
                {
                    "job_name": "pushgateway",
                    "honor_labels": True,  # keep the pushed model and job labels
                    "static_configs": [{"targets": [f"127.0.0.1:{self.pushgateway.port}"]}],
                }
            ],
        }
        (self.directory / "prometheus.yml").write_text(yaml.safe_dump(prometheus, sort_keys=False))
        alertmanager = {
            "route": {
                "receiver": "ignore",
                "group_by": ["alertname"],
                "routes": [
                    {
                        "matchers": [f'alertname="{DRIFT_ALERTNAME}"'],
                        "receiver": "loopform-retrain",
                        "group_by": ["alertname", "model"],
                        "group_wait": LOCAL_GROUP_WAIT,
                        "group_interval": LOCAL_GROUP_WAIT,
                        "repeat_interval": LOCAL_REPEAT,
                    }
                ],
            },
            "receivers": [
                {"name": "ignore"},
                {"name": "loopform-retrain", "webhook_configs": [{"url": self.receiver.url, "send_resolved": True}]},
            ],
        }
        (self.directory / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager, sort_keys=False))

    def __enter__(self) -> LocalAlerting:
        self._write_configs()
        self.receiver.__enter__()
        try:
            for server in (self.pushgateway, self.alertmanager, self.prometheus):
                self._started.append(server)
                server.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for server in reversed(self._started):
            server.stop()
        self._started.clear()
        self.receiver.__exit__()

    def route(self) -> str:
        """One line naming every hop, for progress output."""
        return (
            f"Pushgateway {self.pushgateway.url} -> Prometheus {self.prometheus.url} ({DRIFT_ALERTNAME}, "
            f"every {LOCAL_INTERVAL}, for {LOCAL_FOR}) -> Alertmanager {self.alertmanager.url} -> {self.receiver.url}"
        )

    def push(self, registry: CollectorRegistry, model: str) -> None:
        """Push a monitor run's gauges, grouped by model, as the cluster's monitor CronJob does."""
        from loopform.monitor import push_metrics

        push_metrics(self.pushgateway.url, registry, model)

    def repeats_ignored(self) -> int:
        """Firing notifications that started nothing: Alertmanager's repeats of incidents already acted on."""
        return sum(1 for n in self.receiver.notifications if n.status == "firing" and not n.started)

    def wait(self, condition: Callable[[], bool], what: str, guard_s: float = WAIT_GUARD_S) -> None:
        """Poll `condition` while every server runs; the guard only keeps a broken route from hanging."""
        deadline = time.monotonic() + guard_s
        while not condition():
            for server in self._started:
                if server.process is not None and server.process.poll() is not None:
                    raise RuntimeError(f"{server.name} exited while waiting for {what}: see {server.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"gave up after {guard_s:.0f}s waiting for {what}: see {self.prometheus.url}/alerts and the "
                    f"logs in {self.directory}"
                )
            time.sleep(_POLL_S)


class Retrainings:
    """The receiver's `start` callback for the local loop: records each started retraining per model, so the
    loop (which runs the pipeline in its own thread) picks it up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started: list[RetrainRequest] = []

    def __call__(self, request: RetrainRequest) -> None:
        with self._lock:
            self.started.append(request)

    def of(self, model: str) -> list[RetrainRequest]:
        with self._lock:
            return [request for request in self.started if request.model == model]
