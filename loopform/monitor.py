"""The drift monitor: served traffic against the reference data, Prometheus gauges, report, retraining trigger.

`run_monitor` reads the payload log of one window, compares its feature columns with the reference (training)
data using the pipeline's own drift gate (`loopform.gates.drift.drift_gate`, so serving and training agree on
what drift is), sets Prometheus gauges, writes Evidently's HTML report and a JSON result, and raises the
retraining trigger when the drift share crosses `gates.drift.max_drift_share`. Too few rows give no decision.

On Kubernetes the gauges are scraped (or pushed) and a PrometheusRule on `loopform_drift_detected` fires
an Alertmanager -> Argo Events path that submits retraining; on one machine a `FileTrigger` (a JSON file the
local loop watches) or a `CallbackTrigger` plays that role. Both sides read the same gauges.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import pandas as pd
    from prometheus_client import CollectorRegistry

    from loopform.spec import GatesSpec

Status = Literal["ok", "drift", "insufficient_data", "error"]
_DURATION = re.compile(r"([0-9]+)(ms|s|m|h)")
_UNITS = {"ms": "milliseconds", "s": "seconds", "m": "minutes", "h": "hours"}


def parse_duration(text: str) -> timedelta:
    """A spec Duration ('24h', '1h30m', '90s') as a timedelta."""
    if not text or _DURATION.sub("", text):
        raise ValueError(f"{text!r} is not a duration: use e.g. 30s, 5m, 1h, 1h30m")
    return sum((timedelta(**{_UNITS[unit]: int(n)}) for n, unit in _DURATION.findall(text)), timedelta())


# --- the retraining trigger ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainEvent:
    """Why retraining is asked for; `key` identifies the drift episode (model + reference + drifted set)."""

    model: str
    reason: str
    drift_share: float
    max_drift_share: float
    drifted: list[str]
    rows: int
    window_start: str
    window_end: str
    report: str | None
    created_at: str
    key: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Trigger(Protocol):
    """Something that starts retraining; returns a handle (path, id) or None when it deduplicated the event."""

    def fire(self, event: RetrainEvent) -> str | None: ...


class FileTrigger:
    """Local trigger: one JSON file per event in `directory`, deduplicated while an event is pending.

    The local loop polls `pending(model)`, retrains, then `acknowledge`s the file, as Argo Events' sensor
    dedupes a firing alert until its workflow is submitted.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def pending(self, model: str | None = None) -> list[Path]:
        """Unacknowledged trigger files, oldest first."""
        if not self.directory.exists():
            return []
        pattern = f"{model}-*.json" if model else "*.json"
        return sorted(self.directory.glob(pattern))

    def fire(self, event: RetrainEvent) -> str | None:
        if self.pending(event.model):
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = event.created_at.replace(":", "").replace("-", "").replace("+0000", "Z")
        path = self.directory / f"{event.model}-{stamp}-{event.key[:8]}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(event.to_dict(), indent=2, sort_keys=True) + "\n")
        temporary.replace(path)
        return str(path)

    def acknowledge(self, path: str | os.PathLike[str]) -> Path:
        """Mark a trigger as handled (kept as `<name>.done` for the record)."""
        source = Path(path)
        return source.replace(source.with_suffix(".done"))


class CallbackTrigger:
    """Calls a function with the event (tests, the in-process local loop)."""

    def __init__(self, callback: Callable[[RetrainEvent], Any]) -> None:
        self.callback = callback

    def fire(self, event: RetrainEvent) -> str | None:
        result = self.callback(event)
        return None if result is None else str(result)


# --- Prometheus gauges -----------------------------------------------------------------------------------------

_GAUGES: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_GAUGES_LOCK = threading.Lock()


def gauges(registry: CollectorRegistry) -> dict[str, Any]:
    """The monitor's gauges in `registry`, created once per registry (runs repeat in long-lived processes)."""
    from prometheus_client import Gauge

    with _GAUGES_LOCK:
        found = _GAUGES.get(registry)
        if found is None:
            found = {
                "feature_drift_score": Gauge(
                    "loopform_feature_drift_score",
                    "Drift statistic per feature (p-value for ks/chisquare/z, distance for wasserstein/jensenshannon).",
                    ["model", "feature", "method"],
                    registry=registry,
                ),
                "feature_drifted": Gauge(
                    "loopform_feature_drifted", "1 when the feature drifted.", ["model", "feature"], registry=registry
                ),
                "drift_share": Gauge(
                    "loopform_drift_share", "Share of features that drifted.", ["model"], registry=registry
                ),
                "max_drift_share": Gauge(
                    "loopform_drift_share_threshold", "gates.drift.max_drift_share.", ["model"], registry=registry
                ),
                "rows_seen": Gauge(
                    "loopform_rows_seen", "Payload rows in the monitored window.", ["model"], registry=registry
                ),
                "drift_detected": Gauge(
                    "loopform_drift_detected",
                    "1 when the drift share crossed the threshold (retraining wanted).",
                    ["model"],
                    registry=registry,
                ),
                "decision": Gauge(
                    "loopform_monitor_decision",
                    "1 when the window had enough rows to decide, 0 otherwise.",
                    ["model"],
                    registry=registry,
                ),
                "last_run": Gauge(
                    "loopform_monitor_last_run_timestamp_seconds",
                    "Unix time of the last monitor run.",
                    ["model"],
                    registry=registry,
                ),
            }
            _GAUGES[registry] = found
        return found


def _export(result: MonitorResult, registry: CollectorRegistry) -> None:
    g = gauges(registry)
    model = result.model
    # Series of this model's previous run go first: a feature that left the schema must not linger.
    for name in ("feature_drift_score", "feature_drifted", "drift_share"):
        g[name].remove_by_labels({"model": model})
    g["rows_seen"].labels(model=model).set(result.rows)
    g["max_drift_share"].labels(model=model).set(result.max_drift_share)
    g["decision"].labels(model=model).set(1 if result.decided else 0)
    g["drift_detected"].labels(model=model).set(1 if result.status == "drift" else 0)
    g["last_run"].labels(model=model).set(datetime.fromisoformat(result.window_end).timestamp())
    if result.drift_share is None:
        return  # no decision: no drift series rather than a misleading 0
    g["drift_share"].labels(model=model).set(result.drift_share)
    for name, feature in result.features.items():
        g["feature_drift_score"].labels(model, name, feature["method"]).set(feature["score"])
        g["feature_drifted"].labels(model, name).set(1 if feature["drifted"] else 0)


def metrics_text(registry: CollectorRegistry) -> str:
    """The registry in Prometheus text exposition format."""
    from prometheus_client import generate_latest

    return generate_latest(registry).decode("utf-8")


def write_metrics(path: str | os.PathLike[str], registry: CollectorRegistry) -> Path:
    """Write the registry for node-exporter's textfile collector (atomic rename)."""
    from prometheus_client import write_to_textfile

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(target), registry)
    return target


def push_metrics(gateway: str, registry: CollectorRegistry, model: str, job: str = "loopform-monitor") -> None:
    """Push the registry to a Prometheus Pushgateway, grouped by model (a CronJob ends before a scrape)."""
    from prometheus_client import push_to_gateway

    push_to_gateway(gateway, job=job, registry=registry, grouping_key={"model": model})


# --- the run ----------------------------------------------------------------------------------------------------


@dataclass
class MonitorResult:
    """What one monitor run saw and decided."""

    model: str
    status: Status
    message: str
    rows: int
    min_rows: int
    window_start: str
    window_end: str
    drift_share: float | None
    max_drift_share: float
    drifted: list[str] = field(default_factory=list)
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    triggered: bool = False  # the threshold was crossed and the trigger was raised
    trigger: str | None = None  # what the trigger returned (file path, workflow id); None when deduplicated
    report: str | None = None
    result_path: str | None = None

    @property
    def decided(self) -> bool:
        return self.status in ("ok", "drift")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reference_frame(reference: pd.DataFrame | str | os.PathLike[str]) -> pd.DataFrame:
    import pandas as pd

    if isinstance(reference, pd.DataFrame):
        return reference
    return pd.read_parquet(reference)


def run_monitor(
    model: str,
    *,
    reference: pd.DataFrame | str | os.PathLike[str],
    payload_uri: str,
    since: datetime | None = None,
    gates: GatesSpec,
    report_dir: str | os.PathLike[str] | None = None,
    registry: CollectorRegistry | None = None,
    min_rows: int = 500,
    window: str | timedelta = "24h",
    until: datetime | None = None,
    trigger: Trigger | Sequence[Trigger] | None = None,
    version: int | None = None,
    columns: Sequence[str] | None = None,
) -> MonitorResult:
    """Monitor the payloads of `model` in [since, until) against `reference` (DataFrame or Parquet path).

    `since` defaults to `until - window` (until: now). Sets the gauges in `registry` (a fresh
    CollectorRegistry when None; read it back with `metrics_text`), writes `<model>-drift-<time>.html` and
    `<model>-monitor-<time>.json` into `report_dir`, and fires `trigger` when drift crossed the threshold.
    `version` restricts the window to the traffic of one model version.
    """
    from prometheus_client import CollectorRegistry

    from loopform import data
    from loopform.gates.drift import drift_gate
    from loopform.payloads import read_payloads

    until = until or datetime.now(UTC)
    if since is None:
        since = until - (parse_duration(window) if isinstance(window, str) else window)
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("since and until must be timezone-aware")
    columns = list(columns or data.FEATURE_NAMES)
    registry = registry if registry is not None else CollectorRegistry()
    max_share = gates.drift.max_drift_share
    current = read_payloads(payload_uri, model, since, until)
    if version is not None and len(current):
        current = current[current["model_version"] == version].reset_index(drop=True)
    rows = len(current)
    stamp = until.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    result = MonitorResult(
        model=model,
        status="insufficient_data",
        message="",
        rows=rows,
        min_rows=min_rows,
        window_start=since.astimezone(UTC).isoformat(),
        window_end=until.astimezone(UTC).isoformat(),
        drift_share=None,
        max_drift_share=max_share,
    )
    if rows < min_rows:
        result.message = (
            f"no decision: {rows} payload rows of model {model!r} in [{result.window_start}, {result.window_end}), "
            f"fewer than monitoring.min_rows={min_rows}"
        )
    else:
        ref = _reference_frame(reference)
        report_path = Path(report_dir) / f"{model}-drift-{stamp}.html" if report_dir is not None else None
        gate = drift_gate(ref, current, gates, report_path, columns=columns, label=None)
        metrics = gate.metrics
        result.report = gate.report
        if metrics.get("drift_share") is None:
            result.status = "error"
            result.message = "no decision: " + "; ".join(gate.failures)
        else:
            result.drift_share = float(metrics["drift_share"])
            result.drifted = list(metrics["drifted"])
            result.features = {
                name: {k: f[k] for k in ("method", "score", "threshold", "drifted")}
                for name, f in metrics["features"].items()
            }
            drifted = ", ".join(result.drifted) or "none"
            if gate.passed:
                result.status = "ok"
                result.message = (
                    f"no drift: share {result.drift_share:.3f} <= gates.drift.max_drift_share={max_share} "
                    f"over {rows} rows (drifted: {drifted})"
                )
            else:
                result.status = "drift"
                result.message = (
                    f"drift: share {result.drift_share:.3f} > gates.drift.max_drift_share={max_share} "
                    f"over {rows} rows (drifted: {drifted})"
                )
    _export(result, registry)
    if result.status == "drift" and trigger is not None:
        event = _event(result, ref)
        handles = [t.fire(event) for t in ([trigger] if not isinstance(trigger, Sequence) else trigger)]
        result.triggered = True
        result.trigger = next((h for h in handles if h is not None), None)
        if result.trigger is None:
            result.message += "; retraining already pending (trigger deduplicated)"
        else:
            result.message += f"; retraining triggered ({result.trigger})"
    if report_dir is not None:
        path = Path(report_dir) / f"{model}-monitor-{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        result.result_path = str(path)
        path.write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
    return result


def _event(result: MonitorResult, reference: pd.DataFrame) -> RetrainEvent:
    from loopform.data import fingerprint

    try:
        ref_id = fingerprint(reference)
    except Exception:  # a reference without the full schema still gets a stable-enough key
        ref_id = str(len(reference))
    key = hashlib.sha256(json.dumps([result.model, ref_id, sorted(result.drifted)]).encode()).hexdigest()
    return RetrainEvent(
        model=result.model,
        reason=result.message,
        drift_share=float(result.drift_share or 0.0),
        max_drift_share=result.max_drift_share,
        drifted=list(result.drifted),
        rows=result.rows,
        window_start=result.window_start,
        window_end=result.window_end,
        report=result.report,
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+0000"),
        key=key,
    )


def run_from_spec(
    spec: Any,
    model: str,
    *,
    reference: pd.DataFrame | str | os.PathLike[str],
    report_dir: str | os.PathLike[str] | None = None,
    registry: CollectorRegistry | None = None,
    trigger: Trigger | Sequence[Trigger] | None = None,
    payload_uri: str | None = None,
    until: datetime | None = None,
) -> MonitorResult:
    """`run_monitor` with a stack spec's settings: monitoring.window, min_rows, payload_uri and its gates."""
    monitoring = spec.monitoring
    return run_monitor(
        model,
        reference=reference,
        payload_uri=payload_uri or monitoring.payload_uri,
        gates=spec.gates,
        report_dir=report_dir,
        registry=registry,
        min_rows=monitoring.min_rows,
        window=monitoring.window,
        until=until,
        trigger=trigger,
    )
