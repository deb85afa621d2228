"""The drift monitor: served traffic against the reference data, Prometheus gauges, report, retraining trigger.

`run_monitor` reads the payload log of one window, compares its feature columns with the reference (training)
data using the pipeline's own drift gate (`loopform.gates.drift.drift_gate`, so serving and training agree on
what drift is), sets Prometheus gauges, writes the drift gate's HTML report and a JSON result, and raises the
retraining trigger when the drift share crosses `gates.drift.max_drift_share`. Too few rows give no decision.

The reference is the release's stored profile where it has one: the register step sorted the training data's
columns once and sealed the file's sha256 in the evidence (`loopform.gates.stored_profile`), so a run loads
the sorted columns (checking the digest) instead of re-reading and re-sorting the training data.
`production_reference` picks it; a release registered before profiles were stored falls back to its training
data, and the result says which (`MonitorResult.reference`).

The drift share that triggers is the gate's calibrated one: each feature's distance is judged against a
bootstrap null at the window's own size, so that clean traffic triggers with probability at most
`gates.drift.false_alarm_rate` whatever the window's size (`bench/drift_null.py` measures it). Evidently's
fixed-threshold share, which fires on a large share of clean 200-row windows, stays in the result and the
report for people. When the payloads carry labels
(joined feedback), a label shift (Fisher exact test, `gates.drift.label_shift_*`) triggers too. The share of
served rows outside the reference's envelope (`loopform.gates.ood`) is reported beside it, not acted on.

Whose traffic counts: payload rows carry the authenticated caller that sent them (`loopform.payloads.CALLER`), so a
window can be restricted to named callers and each caller's share capped (`CallerPolicy`; `loopform monitor
--caller NAME --max-caller-share F`). The CLI and the local loop read authenticated callers only by default:
rows of `anonymous` traffic (a service run with LOOPFORM_ALLOW_ANONYMOUS) and rows written before callers were
recorded are left out, so an unauthenticated flood cannot steer the decision. With a cap F, a caller sending more
than F of the window keeps only as many rows (evenly spread over its time) as hold it at F; with fewer than 1/F
callers no cap can hold and the window gives no decision, so one caller, however loud, never decides alone. The
result says how many rows each caller kept (`MonitorResult.callers`) and how many were left out. `run_monitor`
without a policy reads every row (payloads written by other tools).

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

    from loopform.contract import Contract
    from loopform.gates.drift import Profile
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
# (key, name, help, extra labels) of each gauge; every gauge is labelled by model first.
_GAUGE_SPECS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "feature_drift_score",
        "loopform_feature_drift_score",
        "Evidently's drift statistic per feature (p-value for ks/chisquare/z, distance for wasserstein/jensenshannon).",
        ("feature", "method"),
    ),
    (
        "feature_drifted",
        "loopform_feature_drifted",
        "1 when the feature drifted by the calibrated decision (the one that triggers retraining).",
        ("feature",),
    ),
    (
        "feature_drift_p_value",
        "loopform_feature_drift_p_value",
        "Bootstrap p-value of the feature's distance at the window's size (calibrated decision).",
        ("feature",),
    ),
    (
        "feature_drift_threshold",
        "loopform_feature_drift_threshold",
        "Distance the feature must exceed at this window's size (calibrated decision).",
        ("feature", "statistic"),
    ),
    (
        "feature_drifted_evidently",
        "loopform_feature_drifted_evidently",
        "1 when the feature drifted by Evidently's fixed threshold (reports only; noisy on small windows).",
        ("feature",),
    ),
    ("drift_share", "loopform_drift_share", "Share of features that drifted (calibrated decision).", ()),
    (
        "evidently_drift_share",
        "loopform_evidently_drift_share",
        "Share of features that drifted by Evidently's fixed thresholds (reports only).",
        (),
    ),
    ("max_drift_share", "loopform_drift_share_threshold", "gates.drift.max_drift_share.", ()),
    (
        "false_alarm_rate",
        "loopform_drift_false_alarm_rate",
        "gates.drift.false_alarm_rate: the calibrated decision's chance of triggering on clean traffic.",
        (),
    ),
    ("rows_seen", "loopform_rows_seen", "Payload rows in the monitored window.", ()),
    (
        "drift_detected",
        "loopform_drift_detected",
        "1 when the calibrated drift share crossed the threshold or the labels shifted (retraining wanted).",
        (),
    ),
    (
        "label_positive_rate",
        "loopform_label_positive_rate",
        "Positive label rate of the reference and of the window's labelled rows.",
        ("side",),
    ),
    ("label_shift_p_value", "loopform_label_shift_p_value", "Fisher exact p-value of equal positive rates.", ()),
    ("ood_rate", "loopform_ood_rate", "Share of served rows outside the reference's envelope (gates/ood.py).", ()),
    ("max_ood_rate", "loopform_ood_rate_threshold", "gates.max_ood_rate.", ()),
    ("decision", "loopform_monitor_decision", "1 when the window had enough rows to decide, 0 otherwise.", ()),
    ("last_run", "loopform_monitor_last_run_timestamp_seconds", "Unix time of the last monitor run.", ()),
)
# Series that describe one window's data: removed before each run so nothing stale lingers.
_WINDOW_SERIES = (
    "feature_drift_score",
    "feature_drifted",
    "feature_drift_p_value",
    "feature_drift_threshold",
    "feature_drifted_evidently",
    "drift_share",
    "evidently_drift_share",
    "label_positive_rate",
    "label_shift_p_value",
    "ood_rate",
)


def gauges(registry: CollectorRegistry) -> dict[str, Any]:
    """The monitor's gauges in `registry`, created once per registry (runs repeat in long-lived processes)."""
    from prometheus_client import Gauge

    with _GAUGES_LOCK:
        found = _GAUGES.get(registry)
        if found is None:
            found = {
                key: Gauge(name, help_text, ["model", *labels], registry=registry)
                for key, name, help_text, labels in _GAUGE_SPECS
            }
            _GAUGES[registry] = found
        return found


def _export(result: MonitorResult, registry: CollectorRegistry) -> None:
    g = gauges(registry)
    model = result.model
    # Series of this model's previous run go first: a feature that left the schema must not linger.
    for name in _WINDOW_SERIES:
        g[name].remove_by_labels({"model": model})
    g["rows_seen"].labels(model=model).set(result.rows)
    g["max_drift_share"].labels(model=model).set(result.max_drift_share)
    g["false_alarm_rate"].labels(model=model).set(result.false_alarm_rate)
    g["max_ood_rate"].labels(model=model).set(result.max_ood_rate)
    g["decision"].labels(model=model).set(1 if result.decided else 0)
    g["drift_detected"].labels(model=model).set(1 if result.status == "drift" else 0)
    g["last_run"].labels(model=model).set(datetime.fromisoformat(result.window_end).timestamp())
    if result.ood_rate is not None:
        g["ood_rate"].labels(model=model).set(result.ood_rate)
    if result.label_shift is not None:
        g["label_positive_rate"].labels(model, "reference").set(result.label_shift["reference_rate"])
        g["label_positive_rate"].labels(model, "current").set(result.label_shift["current_rate"])
        g["label_shift_p_value"].labels(model=model).set(result.label_shift["p_value"])
    if result.drift_share is None:
        return  # no decision: no drift series rather than a misleading 0
    g["drift_share"].labels(model=model).set(result.drift_share)
    if result.evidently_drift_share is not None:
        g["evidently_drift_share"].labels(model=model).set(result.evidently_drift_share)
    for name, feature in result.features.items():
        g["feature_drift_score"].labels(model, name, feature["method"]).set(feature["score"])
        g["feature_drifted_evidently"].labels(model, name).set(1 if feature["drifted"] else 0)
        calibrated = feature["calibrated"]
        g["feature_drifted"].labels(model, name).set(1 if calibrated["drifted"] else 0)
        g["feature_drift_p_value"].labels(model, name).set(calibrated["p_value"])
        g["feature_drift_threshold"].labels(model, name, calibrated["statistic"]).set(calibrated["threshold"])


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


@dataclass(frozen=True)
class CallerPolicy:
    """Which callers' payload rows the monitor reads, and the largest share of the window one caller may have.

    `callers` empty: every authenticated caller. `include_anonymous`: also rows of `anonymous` traffic and rows
    without a caller. `max_share` (0 < F <= 1): the cap; None for none.
    """

    callers: tuple[str, ...] = ()
    include_anonymous: bool = False
    max_share: float | None = None

    def __post_init__(self) -> None:
        if self.max_share is not None and not 0 < self.max_share <= 1:
            raise ValueError(f"a caller's maximum share must be in (0, 1], got {self.max_share}")

    def select(self, rows: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int], int]:
        """(the rows read, rows kept per caller, rows left out) of a window's payload rows."""
        import numpy as np
        import pandas as pd

        from loopform.payloads import CALLER
        from loopform.serving.auth import ANONYMOUS

        who = rows[CALLER] if CALLER in rows.columns else pd.Series([None] * len(rows), index=rows.index, dtype=object)
        anonymous = who.isna() | (who == ANONYMOUS)
        keep = (~anonymous | self.include_anonymous) if not self.callers else who.isin(self.callers)
        who = who.where(~anonymous, ANONYMOUS)
        counts = who[keep].value_counts().to_dict()
        quota = counts if self.max_share is None else capped_counts(counts, self.max_share)
        chosen = []
        for caller, kept in quota.items():
            positions = np.flatnonzero((keep & (who == caller)).to_numpy())
            # Evenly spread over the caller's rows (in time order), not its first ones.
            chosen.append(positions[np.linspace(0, len(positions) - 1, kept).round().astype(int)] if kept else [])
        index = np.sort(np.concatenate(chosen)).astype(int) if chosen else np.array([], dtype=int)
        kept_rows = rows.iloc[index].reset_index(drop=True)
        return kept_rows, {str(c): int(n) for c, n in sorted(quota.items())}, len(rows) - len(kept_rows)


def capped_counts(counts: dict[Any, int], share: float) -> dict[Any, int]:
    """Rows each caller keeps so that none has more than `share` of what is kept, keeping as many as possible.

    Every caller keeps min(rows, c) for the largest c with c <= share * sum(min(rows_i, c)); none is left when
    fewer than 1/share callers make that impossible (c = 0).
    """
    best, prefix, low = 0.0, 0, 0
    ordered = sorted(counts.values())
    for j, high in enumerate(ordered):  # on [low, high] callers j.. are capped: c <= share * (prefix + (k - j) c)
        slope = 1 - share * (len(ordered) - j)
        if slope <= 0:
            best = high
        else:
            limit = share * prefix / slope
            if limit < low:
                break
            best = max(best, min(high, limit))
            if limit < high:
                break
        prefix += high
        low = high
    cap = int(best + 1e-9)
    return {caller: min(rows, cap) for caller, rows in counts.items()}


@dataclass
class MonitorResult:
    """What one monitor run saw and decided.

    `drift_share` and `drifted` are the calibrated decision (false-alarm rate `false_alarm_rate` on clean
    traffic at any window size), the one that sets `status` and triggers retraining. `evidently_drift_share`,
    `evidently_drifted` and each `features[name]`'s method, score, threshold and drifted are Evidently's
    fixed-threshold view, as in the HTML report; `features[name]["calibrated"]` holds the decision's
    statistic, score, p_value, threshold and drifted. `label_shift` is set when the window carries labels.
    `ood_rate` is the share of served rows outside the reference's envelope (reported, not a trigger).
    """

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
    decision: str = "calibrated"  # which rule `drift_share`, `drifted` and `status` follow
    false_alarm_rate: float = 0.01
    calibration: dict[str, Any] = field(default_factory=dict)  # the rule: level, features needed, null draws
    evidently_drift_share: float | None = None
    evidently_drifted: list[str] = field(default_factory=list)
    label_shift: dict[str, Any] | None = None
    ood_rate: float | None = None
    ood_rows: int | None = None
    max_ood_rate: float = 0.05
    ood: dict[str, float] = field(default_factory=dict)  # per feature share outside the envelope
    triggered: bool = False  # the threshold was crossed and the trigger was raised
    trigger: str | None = None  # what the trigger returned (file path, workflow id); None when deduplicated
    report: str | None = None
    result_path: str | None = None
    reference: str = ""  # what the window was compared with: the stored profile (verified) or the training data
    callers: dict[str, int] = field(default_factory=dict)  # rows read per caller (after the policy's cap)
    excluded_rows: int = 0  # rows of the window the caller policy left out

    @property
    def decided(self) -> bool:
        return self.status in ("ok", "drift")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_reference(
    reference: pd.DataFrame | Profile | str | os.PathLike[str], sha256: str | None = None
) -> tuple[pd.DataFrame | Profile, str]:
    """(reference, what it is): a stored profile (`.npz`, loaded only when it hashes to `sha256`), a Profile,
    or training data (a DataFrame or Parquet file, profiled on this run)."""
    import pandas as pd

    from loopform.gates.drift import Profile
    from loopform.gates.stored_profile import load_profile

    if isinstance(reference, Profile):
        return reference, f"reference profile ({reference.rows} rows)"
    if isinstance(reference, pd.DataFrame):
        return reference, f"training data ({len(reference)} rows, sorted on this run)"
    path = Path(reference)
    if path.suffix == ".npz":
        if not sha256:
            raise ValueError(f"{path} is a stored profile: give the sha256 its release's evidence recorded")
        loaded = load_profile(path, sha256)
        return loaded, f"stored reference profile ({loaded.rows} rows, sha256 {sha256[:12]}... verified)"
    frame = pd.read_parquet(path)
    fallback = "" if sha256 is None else ", digest ignored"
    return frame, f"training data {path.name} ({len(frame)} rows, sorted on this run: no stored profile{fallback})"


def production_reference(tracking_uri: str, model: str, folder: Path) -> tuple[Path, str | None, int]:
    """(reference file, its sha256 or None, version) of the version holding the production alias.

    The stored profile its evidence names (`reference_profile`), downloaded into `folder`; a version
    registered before profiles were stored gives its training data (`reference/reference.parquet`) and
    None, so the monitor sorts it as before and says so.
    """
    from loopform import registry

    version = registry.alias_version(tracking_uri, model, "production")
    if version is None:
        raise LookupError(f"no version of {model!r} holds the production alias")
    stored = (registry.read_evidence(tracking_uri, model, version) or {}).get("reference_profile")
    run_id = registry.client(tracking_uri).get_model_version(model, str(version)).run_id
    folder.mkdir(parents=True, exist_ok=True)
    artifact = stored["artifact"] if stored else registry.REFERENCE_DATA
    local = registry.client(tracking_uri).download_artifacts(run_id, artifact, str(folder))
    return Path(local), (stored["sha256"] if stored else None), version


def run_monitor(
    model: str,
    *,
    contract: Contract,
    reference: pd.DataFrame | Profile | str | os.PathLike[str],
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
    reference_sha256: str | None = None,
    callers: CallerPolicy | None = None,
) -> MonitorResult:
    """Monitor the payloads of `model` in [since, until) against `reference`.

    The reference is the release's stored profile (an `.npz` path with `reference_sha256`, the digest its
    evidence recorded: see `production_reference`), a Profile, or training data (DataFrame or Parquet path).

    `since` defaults to `until - window` (until: now). Sets the gauges in `registry` (a fresh
    CollectorRegistry when None; read it back with `metrics_text`), writes `<model>-drift-<time>.html` and
    `<model>-monitor-<time>.json` into `report_dir`, and fires `trigger` when the calibrated drift share
    crossed the threshold (or, when the payloads carry labels, the labels shifted). Also reports the share of
    served rows outside the reference's envelope (OOD). `version` restricts the window to one model version;
    `callers` to the rows of some callers, each at most a share of the window (see `CallerPolicy`).
    """
    from prometheus_client import CollectorRegistry

    from loopform.gates.drift import drift_gate
    from loopform.gates.ood import ood_gate
    from loopform.payloads import read_payloads

    until = until or datetime.now(UTC)
    if since is None:
        since = until - (parse_duration(window) if isinstance(window, str) else window)
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("since and until must be timezone-aware")
    columns = list(columns or contract.feature_names)
    registry = registry if registry is not None else CollectorRegistry()
    max_share = gates.drift.max_drift_share
    current = read_payloads(payload_uri, model, since, until)
    if version is not None and len(current):
        current = current[current["model_version"] == version].reset_index(drop=True)
    kept: dict[str, int] = {}
    excluded = 0
    if callers is not None:
        current, kept, excluded = callers.select(current)
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
        false_alarm_rate=gates.drift.false_alarm_rate,
        max_ood_rate=gates.max_ood_rate,
        callers=kept,
        excluded_rows=excluded,
    )
    left_out = f" ({excluded} rows left out by the caller policy)" if excluded else ""
    if rows < min_rows:
        result.message = (
            f"no decision: {rows} payload rows of model {model!r} in [{result.window_start}, {result.window_end}), "
            f"fewer than monitoring.min_rows={min_rows}{left_out}"
        )
    else:
        ref, result.reference = load_reference(reference, reference_sha256)
        report_path = Path(report_dir) / f"{model}-drift-{stamp}.html" if report_dir is not None else None
        gate = drift_gate(ref, current, gates, contract, report_path, columns=columns)
        metrics = gate.metrics
        result.report = gate.report
        try:
            ood_failures = _record_ood(result, ood_gate(ref, current, gates, contract, columns=columns))
        except ValueError as error:  # the reference cannot make an envelope (e.g. it lacks a column)
            ood_failures = [str(error)]
        if metrics.get("drift_share") is None:
            result.status = "error"
            result.message = "no decision: " + "; ".join(gate.failures)
        else:
            result.drift_share = float(metrics["drift_share"])
            result.drifted = list(metrics["drifted"])
            result.calibration = dict(metrics["calibration"])
            result.evidently_drift_share = float(metrics["evidently"]["drift_share"])
            result.evidently_drifted = list(metrics["evidently"]["drifted"])
            result.label_shift = metrics.get("label")
            result.features = {
                name: {
                    **{k: f[k] for k in ("method", "score", "threshold", "drifted")},
                    "calibrated": {
                        k: f["calibrated"][k] for k in ("statistic", "score", "p_value", "threshold", "drifted")
                    },
                }
                for name, f in metrics["features"].items()
            }
            # Drift or a label shift triggers; a label column that cannot be compared is reported, not acted on.
            shifted = bool(result.label_shift and result.label_shift["shifted"])
            result.status = "drift" if result.drift_share > max_share or shifted else "ok"
            result.message = _message(result, gate.failures)
        result.message += _ood_note(result, ood_failures) + f"; reference: {result.reference}{left_out}"
    _export(result, registry)
    if result.status == "drift" and trigger is not None:
        event = _event(result, ref, reference_sha256)
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


def _message(result: MonitorResult, failures: Sequence[str]) -> str:
    """One line: the calibrated decision, Evidently's fixed-threshold view beside it, the label check."""
    assert result.drift_share is not None
    share, max_share = result.drift_share, result.max_drift_share
    drifted = ", ".join(result.drifted) or "none"
    evidently = ", ".join(result.evidently_drifted) or "none"
    shift = result.label_shift
    if share > max_share:
        verdict, comparison = "drift", ">"
    else:
        verdict, comparison = ("label shift" if shift and shift["shifted"] else "no drift"), "<="
    line = (
        f"{verdict}: share {share:.3f} {comparison} "
        f"gates.drift.max_drift_share={max_share} over {result.rows} rows (drifted: {drifted}; calibrated to "
        f"false-alarm rate {result.false_alarm_rate}; Evidently's fixed thresholds: share "
        f"{result.evidently_drift_share:.3f}, {evidently})"
    )
    if shift is not None:
        line += (
            f"; label {'SHIFTED' if shift['shifted'] else 'steady'}: positive rate {shift['current_rate']:.4f} vs "
            f"{shift['reference_rate']:.4f} (p={shift['p_value']:.2g})"
        )
    if shift is None:  # labels present but not comparable: say so (it does not trigger)
        line += "".join(f"; {f}" for f in failures if f.startswith("cannot compare label"))
    return line


def _record_ood(result: MonitorResult, gate: Any) -> list[str]:
    """Copy the OOD gate's rate into the result; returns why it could not be measured (if so)."""
    metrics = gate.metrics
    if metrics.get("ood_rate") is None:
        return list(gate.failures)
    result.ood_rate = float(metrics["ood_rate"])
    result.ood_rows = int(metrics["ood_rows"])
    result.ood = {k: float(v) for k, v in metrics.get("per_feature", {}).items()}
    return []


def _ood_note(result: MonitorResult, failures: Sequence[str]) -> str:
    if result.ood_rate is None:
        return "; OOD rate not measured" + (f" ({'; '.join(failures)})" if failures else "")
    verdict = "above" if result.ood_rate > result.max_ood_rate else "within"
    return (
        f"; OOD rate {result.ood_rate:.2%} ({result.ood_rows} of {result.rows} rows outside the reference "
        f"envelope, {verdict} gates.max_ood_rate={result.max_ood_rate})"
    )


def _event(result: MonitorResult, reference: pd.DataFrame | Profile, sha256: str | None) -> RetrainEvent:
    from loopform.contract import fingerprint
    from loopform.gates.drift import Profile

    if sha256:
        ref_id = sha256
    elif isinstance(reference, Profile):
        ref_id = json.dumps([reference.rows, {name: c.n for name, c in reference.columns.items()}])
    else:
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
    contract: Contract,
    *,
    reference: pd.DataFrame | Profile | str | os.PathLike[str],
    report_dir: str | os.PathLike[str] | None = None,
    registry: CollectorRegistry | None = None,
    trigger: Trigger | Sequence[Trigger] | None = None,
    payload_uri: str | None = None,
    until: datetime | None = None,
    callers: CallerPolicy | None = None,
) -> MonitorResult:
    """`run_monitor` with a stack spec's settings: monitoring.window, min_rows, payload_uri and the model's gates."""
    monitoring = spec.monitoring
    return run_monitor(
        model,
        contract=contract,
        reference=reference,
        payload_uri=payload_uri or monitoring.payload_uri,
        gates=spec.gates_for(model),
        report_dir=report_dir,
        registry=registry,
        min_rows=monitoring.min_rows,
        window=monitoring.window,
        until=until,
        trigger=trigger,
        callers=callers,
    )
