"""The drift monitor: payload windows against the reference, gauges, report, trigger, too few rows."""

from __future__ import annotations

import http.server
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from loopform.gates.drift import compute_drift
from loopform.gates.ood import ood_gate
from loopform.monitor import (
    CallbackTrigger,
    CallerPolicy,
    FileTrigger,
    RetrainEvent,
    capped_counts,
    metrics_text,
    parse_duration,
    push_metrics,
    run_monitor,
    write_metrics,
)
from loopform.payloads import CALLER, PayloadLog
from loopform.spec import GatesSpec
from models.fraud import data
from models.fraud.contract import CONTRACT

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
GATES = GatesSpec()


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return data.generate(3000, 1, days=20)


def _log(
    uri: str,
    frame: pd.DataFrame,
    start: datetime,
    span: timedelta,
    version: int = 1,
    labels: bool = False,
    callers: tuple[str | None, ...] = (),
) -> None:
    """Write frame's rows as served payloads spread evenly over [start, start + span) (with labels: joined feedback),
    sent in turn by `callers` (no caller column when none)."""
    step = span / len(frame)
    fields = [*data.FEATURE_NAMES, *([data.LABEL] if labels else [])]
    with PayloadLog(uri, "fraud", flush_rows=5000, flush_seconds=3600) as log:
        for i, row in enumerate(frame[fields].to_dict("records")):
            who = {CALLER: callers[i % len(callers)]} if callers else {}
            log.log({"time": start + i * step, **row, "prediction": 0, "score": 0.1, "model_version": version, **who})


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_clean_traffic_is_no_drift(tmp_path: Path, reference: pd.DataFrame) -> None:
    uri = str(tmp_path / "payloads")
    _log(uri, data.generate(1500, 2, days=20), NOW - timedelta(hours=20), timedelta(hours=19))
    fired: list[RetrainEvent] = []
    registry = CollectorRegistry()
    result = run_monitor(
        "fraud",
        contract=CONTRACT,
        reference=reference,
        payload_uri=uri,
        gates=GATES,
        report_dir=tmp_path / "reports",
        registry=registry,
        until=NOW,
        trigger=CallbackTrigger(fired.append),
    )
    assert result.status == "ok" and result.decided and not result.triggered and fired == []
    assert result.rows == 1500
    assert result.drift_share is not None and result.drift_share <= GATES.drift.max_drift_share
    assert set(result.features) == set(data.FEATURE_NAMES)
    assert result.decision == "calibrated" and result.false_alarm_rate == GATES.drift.false_alarm_rate
    assert result.evidently_drift_share is not None and result.label_shift is None  # payloads carry no labels
    # The OOD rate of the served traffic against the reference's envelope, as the OOD gate measures it.
    expected_ood = ood_gate(reference, data.generate(1500, 2, days=20), GATES, CONTRACT).metrics["ood_rate"]
    assert result.ood_rate == pytest.approx(expected_ood) and result.ood_rows == round(expected_ood * 1500)
    assert set(result.ood) == set(data.FEATURE_NAMES) and result.max_ood_rate == GATES.max_ood_rate
    assert "OOD rate" in result.message and "within gates.max_ood_rate=0.05" in result.message
    samples = _samples(metrics_text(registry))
    model = (("model", "fraud"),)
    assert samples[("loopform_drift_detected", model)] == 0
    assert samples[("loopform_rows_seen", model)] == 1500
    assert samples[("loopform_drift_share", model)] == pytest.approx(result.drift_share)
    assert samples[("loopform_evidently_drift_share", model)] == pytest.approx(result.evidently_drift_share)
    assert samples[("loopform_ood_rate", model)] == pytest.approx(result.ood_rate)
    assert samples[("loopform_ood_rate_threshold", model)] == GATES.max_ood_rate
    assert samples[("loopform_drift_false_alarm_rate", model)] == GATES.drift.false_alarm_rate
    assert Path(result.report).is_file() and Path(result.report).stat().st_size > 10_000
    saved = json.loads(Path(result.result_path).read_text())
    assert saved["status"] == "ok" and saved["ood_rate"] == pytest.approx(result.ood_rate)


def test_drifted_traffic_raises_the_trigger_once(tmp_path: Path, reference: pd.DataFrame) -> None:
    uri = str(tmp_path / "payloads")
    drifted = data.generate(1200, 3, days=20, covariate_drift=1.0)
    _log(uri, drifted, NOW - timedelta(hours=6), timedelta(hours=5))
    _log(uri, data.generate(800, 4, days=20), NOW - timedelta(days=3), timedelta(hours=5))  # outside the window
    registry = CollectorRegistry()
    triggers = FileTrigger(tmp_path / "triggers")
    result = run_monitor(
        "fraud",
        contract=CONTRACT,
        reference=reference,
        payload_uri=uri,
        gates=GATES,
        report_dir=tmp_path / "reports",
        registry=registry,
        until=NOW,
        window="24h",
        trigger=triggers,
    )
    assert result.rows == 1200
    assert result.status == "drift" and result.triggered
    assert result.drift_share > GATES.drift.max_drift_share
    # The monitor decides exactly as the pipeline's drift code does on the same frames: the calibrated
    # decision triggers, Evidently's fixed-threshold view is reported beside it.
    expected = compute_drift(reference, drifted, data.FEATURE_NAMES, GATES, calibrate=True)
    assert expected.calibrated is not None
    assert result.drifted == expected.calibrated.drifted
    assert result.drift_share == pytest.approx(expected.calibrated.drift_share)
    assert result.evidently_drifted == expected.drifted
    assert result.evidently_drift_share == pytest.approx(expected.drift_share)
    for name, feature in result.features.items():
        assert feature["drifted"] == expected.features[name].drifted
        assert feature["calibrated"]["drifted"] == expected.calibrated.features[name].drifted
        assert feature["calibrated"]["p_value"] == pytest.approx(expected.calibrated.features[name].p_value)

    pending = triggers.pending("fraud")
    assert [str(p) for p in pending] == [result.trigger]
    event = json.loads(pending[0].read_text())
    assert event["model"] == "fraud" and event["drifted"] == result.drifted and event["report"] == result.report

    samples = _samples(metrics_text(registry))
    model = (("model", "fraud"),)
    assert samples[("loopform_drift_detected", model)] == 1
    assert samples[("loopform_rows_seen", model)] == 1200
    assert samples[("loopform_drift_share", model)] == pytest.approx(result.drift_share)
    for name, feature in result.features.items():
        labels = (("feature", name), ("method", feature["method"]), ("model", "fraud"))
        assert samples[("loopform_feature_drift_score", labels)] == pytest.approx(feature["score"])
        by_feature = (("feature", name), ("model", "fraud"))
        calibrated = feature["calibrated"]
        assert samples[("loopform_feature_drifted", by_feature)] == calibrated["drifted"]
        assert samples[("loopform_feature_drifted_evidently", by_feature)] == feature["drifted"]
        assert samples[("loopform_feature_drift_p_value", by_feature)] == pytest.approx(calibrated["p_value"])
        threshold = (("feature", name), ("model", "fraud"), ("statistic", calibrated["statistic"]))
        assert samples[("loopform_feature_drift_threshold", threshold)] == pytest.approx(calibrated["threshold"])

    # A second run while retraining is pending: still drift, but no second trigger file.
    again = run_monitor(
        "fraud",
        contract=CONTRACT,
        reference=reference,
        payload_uri=uri,
        gates=GATES,
        registry=registry,
        until=NOW,
        trigger=triggers,
    )
    assert again.status == "drift" and again.trigger is None and "deduplicated" in again.message
    assert len(triggers.pending("fraud")) == 1
    triggers.acknowledge(pending[0])
    assert triggers.pending("fraud") == []


def test_too_few_rows_is_no_decision(tmp_path: Path, reference: pd.DataFrame) -> None:
    uri = str(tmp_path / "payloads")
    _log(uri, data.generate(120, 5, days=5, covariate_drift=1.0), NOW - timedelta(hours=2), timedelta(hours=1))
    registry = CollectorRegistry()
    fired: list[RetrainEvent] = []
    result = run_monitor(
        "fraud",
        contract=CONTRACT,
        reference=reference,
        payload_uri=uri,
        gates=GATES,
        report_dir=tmp_path / "reports",
        registry=registry,
        until=NOW,
        min_rows=500,
        trigger=CallbackTrigger(fired.append),
    )
    assert result.status == "insufficient_data" and not result.decided
    assert result.drift_share is None and not result.triggered and fired == []
    assert "120 payload rows" in result.message and "min_rows=500" in result.message
    assert result.report is None and json.loads(Path(result.result_path).read_text())["rows"] == 120
    samples = _samples(metrics_text(registry))
    assert samples[("loopform_monitor_decision", (("model", "fraud"),))] == 0
    assert samples[("loopform_drift_detected", (("model", "fraud"),))] == 0
    assert ("loopform_drift_share", (("model", "fraud"),)) not in samples
    assert ("loopform_ood_rate", (("model", "fraud"),)) not in samples and result.ood_rate is None


def test_gauges_follow_repeated_runs_in_one_registry(tmp_path: Path, reference: pd.DataFrame) -> None:
    uri = str(tmp_path / "payloads")
    _log(uri, data.generate(600, 6, days=20, covariate_drift=1.0), NOW - timedelta(hours=3), timedelta(hours=1))
    registry = CollectorRegistry()
    first = run_monitor(
        "fraud",
        contract=CONTRACT,
        reference=reference,
        payload_uri=uri,
        gates=GATES,
        registry=registry,
        until=NOW,
        min_rows=500,
    )
    assert first.status == "drift" and not first.triggered  # no trigger configured: gauges only
    later = run_monitor(  # a day later the window is empty: the drift series must not linger
        "fraud",
        contract=CONTRACT,
        reference=reference,
        payload_uri=uri,
        gates=GATES,
        registry=registry,
        until=NOW + timedelta(days=2),
    )
    assert later.status == "insufficient_data" and later.rows == 0
    text = metrics_text(registry)
    assert "loopform_feature_drift_score{" not in text and "loopform_drift_share{" not in text
    assert "loopform_ood_rate{" not in text and "loopform_feature_drift_p_value{" not in text
    assert _samples(text)[("loopform_drift_detected", (("model", "fraud"),))] == 0
    path = write_metrics(tmp_path / "textfile" / "loopform.prom", registry)
    assert path.read_text() == text


def test_version_filter_and_missing_columns(tmp_path: Path, reference: pd.DataFrame) -> None:
    uri = str(tmp_path / "payloads")
    _log(uri, data.generate(600, 7, days=20), NOW - timedelta(hours=3), timedelta(hours=1), version=1)
    _log(uri, data.generate(600, 8, days=20, covariate_drift=1.0), NOW - timedelta(hours=2), timedelta(hours=1), 2)
    v1 = run_monitor(
        "fraud", contract=CONTRACT, reference=reference, payload_uri=uri, gates=GATES, until=NOW, version=1
    )
    v2 = run_monitor(
        "fraud", contract=CONTRACT, reference=reference, payload_uri=uri, gates=GATES, until=NOW, version=2
    )
    assert (v1.rows, v1.status) == (600, "ok") and (v2.rows, v2.status) == (600, "drift")
    broken = run_monitor(
        "fraud",
        contract=CONTRACT,
        reference=reference.drop(columns=["amount"]),
        payload_uri=uri,
        gates=GATES,
        until=NOW,
        min_rows=10,
    )
    assert broken.status == "error" and "amount" in broken.message and not broken.triggered


def test_reference_from_parquet_and_parse_duration(tmp_path: Path, reference: pd.DataFrame) -> None:
    path = tmp_path / "reference.parquet"
    reference.to_parquet(path)
    uri = str(tmp_path / "payloads")
    _log(uri, data.generate(700, 9, days=20), NOW - timedelta(minutes=80), timedelta(minutes=60))
    result = run_monitor(
        "fraud", contract=CONTRACT, reference=path, payload_uri=uri, gates=GATES, until=NOW, window="1h30m"
    )
    assert result.rows == 700 and result.status == "ok"
    assert result.window_start == (NOW - timedelta(minutes=90)).isoformat()
    assert parse_duration("1h30m") == timedelta(minutes=90) and parse_duration("45s") == timedelta(seconds=45)
    for bad in ("", "1d", "h", "10"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_push_metrics_sends_the_exposition(tmp_path: Path) -> None:
    received: list[tuple[str, str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        registry = CollectorRegistry()
        run_monitor(
            "fraud",
            contract=CONTRACT,
            reference=pd.DataFrame(),
            payload_uri=str(tmp_path),
            gates=GATES,
            registry=registry,
        )
        push_metrics(f"127.0.0.1:{server.server_port}", registry, "fraud")
    finally:
        server.shutdown()
    [(method, path, body)] = received
    assert method == "PUT" and path == "/metrics/job/loopform-monitor/model/fraud"
    assert b"loopform_rows_seen" in body


def test_run_from_spec_uses_the_stack_settings(tmp_path: Path, reference: pd.DataFrame) -> None:
    from loopform.monitor import run_from_spec
    from loopform.spec import PlatformSpec

    spec = PlatformSpec.model_validate(
        {
            "environment": "local",
            "cluster": {"kind": "none"},
            "monitoring": {"payload_uri": f"file://{tmp_path}/lake", "window": "2h", "min_rows": 300},
            "gates": {"drift": {"max_drift_share": 1.0, "false_alarm_rate": 0.05}, "max_ood_rate": 0.5},
        }
    )
    drifted = data.generate(400, 10, days=20, covariate_drift=1.0)
    _log(f"{tmp_path}/lake", drifted, NOW - timedelta(minutes=100), timedelta(minutes=60))
    _log(f"{tmp_path}/lake", drifted, NOW - timedelta(hours=5), timedelta(minutes=60))  # outside the 2h window
    result = run_from_spec(spec, "fraud", CONTRACT, reference=reference, until=NOW)
    assert result.rows == 400 and result.min_rows == 300 and result.max_drift_share == 1.0
    assert result.false_alarm_rate == 0.05 and result.max_ood_rate == 0.5
    # Drifted traffic above the default 0.3 share but not above this stack's 1.0: the stack's gate decides.
    assert result.drift_share is not None and GatesSpec().drift.max_drift_share < result.drift_share <= 1.0
    assert result.status == "ok" and not result.triggered
    assert result.calibration["false_alarm_rate"] == 0.05


def test_labelled_payloads_are_checked_for_label_shift(tmp_path: Path, reference: pd.DataFrame) -> None:
    """Payloads joined with their labels: a doubled fraud rate triggers through the proportion test."""
    uri = str(tmp_path / "payloads")
    doubled = data.generate(3000, 11, days=20, label_shift=data.BASE_FRAUD_RATE)
    _log(uri, doubled, NOW - timedelta(hours=6), timedelta(hours=5), labels=True)
    loose = GatesSpec(drift={"max_drift_share": 1.0})  # features alone never trigger here
    fired: list[RetrainEvent] = []
    registry = CollectorRegistry()
    result = run_monitor(
        "fraud",
        contract=CONTRACT,
        reference=reference,
        payload_uri=uri,
        gates=loose,
        registry=registry,
        until=NOW,
        trigger=CallbackTrigger(fired.append),
    )
    shift = result.label_shift
    assert shift is not None and shift["shifted"] and shift["p_value"] < loose.drift.label_shift_p_value
    assert shift["current_rate"] == pytest.approx(doubled[data.LABEL].mean())
    assert result.status == "drift" and result.triggered and len(fired) == 1
    assert result.message.startswith("label shift:") and "label SHIFTED" in result.message
    samples = _samples(metrics_text(registry))
    current = (("model", "fraud"), ("side", "current"))
    assert samples[("loopform_label_positive_rate", current)] == pytest.approx(shift["current_rate"])
    assert samples[("loopform_label_shift_p_value", (("model", "fraud"),))] == pytest.approx(shift["p_value"])
    # The same traffic at the reference's own rate: no label shift, no trigger.
    steady_uri = str(tmp_path / "steady")
    _log(steady_uri, data.generate(3000, 12, days=20), NOW - timedelta(hours=6), timedelta(hours=5), labels=True)
    steady = run_monitor(
        "fraud", contract=CONTRACT, reference=reference, payload_uri=steady_uri, gates=loose, until=NOW
    )
    assert steady.label_shift is not None and not steady.label_shift["shifted"] and steady.status == "ok"


def test_ood_rate_of_served_traffic(tmp_path: Path, reference: pd.DataFrame) -> None:
    """Out-of-range payloads: the monitor reports their share outside the reference envelope (no trigger)."""
    uri = str(tmp_path / "payloads")
    broken = data.generate(600, 13, days=20, out_of_range=0.05)
    _log(uri, broken, NOW - timedelta(hours=3), timedelta(hours=1))
    registry = CollectorRegistry()
    result = run_monitor(
        "fraud",
        contract=CONTRACT,
        reference=reference,
        payload_uri=uri,
        gates=GATES,
        registry=registry,
        until=NOW,
        min_rows=500,
    )
    assert result.ood_rate is not None and result.ood_rate > GATES.max_ood_rate
    assert result.ood_rows == round(result.ood_rate * 600)
    assert "above gates.max_ood_rate=0.05" in result.message
    assert _samples(metrics_text(registry))[("loopform_ood_rate", (("model", "fraud"),))] == pytest.approx(
        result.ood_rate
    )


def test_the_monitor_loads_the_release_s_stored_profile(tmp_path: Path, reference: pd.DataFrame) -> None:
    """A release registered with a profile is monitored from it (its digest checked) with the same decision and
    numbers as from its training data; one registered before profiles falls back to the data and says so."""
    from loopform import registry
    from loopform.gates.stored_profile import ProfileDigestError, sha256_of
    from loopform.monitor import production_reference
    from loopform.steps import reference_profile
    from tests.helpers_registry import gate_results, small_model

    store = f"sqlite:///{tmp_path}/mlflow.db"
    model, _, _, evaluation = small_model()
    reference.to_parquet(tmp_path / "reference.parquet")
    client = registry.client(store)
    for stored in (False, True):  # version 1 as registered before profiles, version 2 with one
        run = registry.log_training_run(
            store,
            "fraud",
            model,
            gate_results=gate_results(),
            training_data_fingerprint="0" * 64,
            evaluation=evaluation,
        )
        client.log_artifact(run.run_id, str(tmp_path / "reference.parquet"), registry.REFERENCE_DIR)
        if stored:
            made = reference_profile(reference, CONTRACT, tmp_path)
            assert made is not None
            client.log_artifact(run.run_id, str(made), registry.REFERENCE_DIR)
        registry.register_version(store, "fraud", run.run_id)
    evidence = registry.read_evidence(store, "fraud", 2)
    assert evidence is not None and evidence["reference_profile"]["sha256"] == sha256_of(made)
    assert "reference_profile" not in (registry.read_evidence(store, "fraud", 1) or {})

    uri = str(tmp_path / "payloads")
    _log(uri, data.generate(900, 3, days=20, covariate_drift=1.0), NOW - timedelta(hours=6), timedelta(hours=5))
    direct = run_monitor("fraud", contract=CONTRACT, reference=reference, payload_uri=uri, gates=GATES, until=NOW)
    for version, says in ((1, "sorted on this run: no stored profile"), (2, "stored reference profile")):
        registry.set_alias(store, "fraud", "production", version)
        path, sha256, found = production_reference(store, "fraud", tmp_path / f"v{version}")
        assert found == version and (sha256 is None) == (version == 1)
        result = run_monitor(
            "fraud",
            contract=CONTRACT,
            reference=path,
            reference_sha256=sha256,
            payload_uri=uri,
            gates=GATES,
            until=NOW,
            report_dir=tmp_path / f"reports-{version}",
        )
        assert says in result.message and says in result.reference
        assert result.status == direct.status == "drift" and result.drift_share == direct.drift_share
        assert result.features == direct.features and result.ood_rate == direct.ood_rate
        assert result.report is not None and Path(result.report).is_file()
    with pytest.raises(ProfileDigestError):
        run_monitor(
            "fraud",
            contract=CONTRACT,
            reference=path,
            reference_sha256="0" * 64,
            payload_uri=uri,
            gates=GATES,
            until=NOW,
        )
    with pytest.raises(ValueError, match="give the sha256"):
        run_monitor("fraud", contract=CONTRACT, reference=path, payload_uri=uri, gates=GATES, until=NOW)


# --- weighing traffic by caller ---------------------------------------------------------------------------------


def test_capped_counts_hold_every_caller_at_its_share() -> None:
    assert capped_counts({"a": 10_000, "b": 1000}, 0.5) == {"a": 1000, "b": 1000}
    assert capped_counts({"a": 100, "b": 200, "c": 10_000}, 0.5) == {"a": 100, "b": 200, "c": 300}
    assert capped_counts({"a": 500, "b": 400, "c": 300}, 0.5) == {"a": 500, "b": 400, "c": 300}  # none over it
    assert capped_counts({"a": 5000}, 0.5) == {"a": 0}  # one caller cannot be held at half of itself
    assert capped_counts({"a": 900, "b": 900, "c": 30}, 0.25) == {"a": 0, "b": 0, "c": 0}  # needs 4 callers
    assert capped_counts({"a": 5000}, 1.0) == {"a": 5000}
    for counts, share in (({"a": 7, "b": 3000, "c": 450, "d": 80}, 0.3), ({"x": 12, "y": 12, "z": 13}, 0.34)):
        kept = capped_counts(counts, share)
        assert all(kept[c] <= counts[c] for c in counts)
        assert max(kept.values()) <= share * sum(kept.values()) + 1, kept


def test_the_policy_selects_authenticated_callers_and_caps_them() -> None:
    rows = pd.DataFrame({CALLER: ["a", "a", "a", "a", "b", None, "anonymous", "c"], "x": range(8)})
    kept, counts, excluded = CallerPolicy().select(rows)
    assert counts == {"a": 4, "b": 1, "c": 1} and excluded == 2 and list(kept["x"]) == [0, 1, 2, 3, 4, 7]
    kept, counts, _ = CallerPolicy(include_anonymous=True).select(rows)
    assert counts == {"a": 4, "anonymous": 2, "b": 1, "c": 1} and len(kept) == 8
    kept, counts, excluded = CallerPolicy(callers=("b", "c")).select(rows)
    assert counts == {"b": 1, "c": 1} and excluded == 6
    kept, counts, _ = CallerPolicy(max_share=0.5).select(rows)
    assert counts == {"a": 2, "b": 1, "c": 1} and list(kept["x"]) == [0, 3, 4, 7]  # a's kept rows spread out
    legacy = pd.DataFrame({"x": range(3)})  # rows written before callers were recorded
    assert CallerPolicy().select(legacy)[2] == 3 and len(CallerPolicy(include_anonymous=True).select(legacy)[0]) == 3
    with pytest.raises(ValueError, match="share"):
        CallerPolicy(max_share=0.0)


def test_a_flood_from_one_caller_no_longer_flips_the_decision(tmp_path: Path, reference: pd.DataFrame) -> None:
    """Clean traffic from 24 callers, then one authenticated caller floods drifted events: read plainly, the flood
    (two thirds of the window) decides drift; with each caller capped at 5% of the window it does not (clean
    windows of this size already show 2 of the 9 features drifted, so a third decides: the cap must be tight).
    An anonymous flood is not read at all unless asked for."""
    honest = tuple(f"client-{i}" for i in range(24))
    clean = data.generate(1500, 2, days=20)
    flood = data.generate(3000, 3, days=20, covariate_drift=0.5)
    uri = str(tmp_path / "payloads")
    _log(uri, clean, NOW - timedelta(hours=20), timedelta(hours=19), callers=honest)
    _log(uri, flood, NOW - timedelta(hours=10), timedelta(hours=9), callers=("mallory",))
    _log(uri, flood, NOW - timedelta(hours=10), timedelta(hours=9), callers=("anonymous",))

    def run(policy: CallerPolicy | None) -> Any:
        return run_monitor(
            "fraud", contract=CONTRACT, reference=reference, payload_uri=uri, gates=GATES, until=NOW, callers=policy
        )

    assert run(None).status == "drift"  # every row, as before callers were weighed
    assert run(CallerPolicy()).status == "drift"  # mallory is authenticated: 3000 of 4500 rows
    capped = run(CallerPolicy(max_share=0.05))
    assert capped.status == "ok", capped.message
    assert capped.callers["mallory"] == 78 and sum(capped.callers.values()) == 1500 + 78  # every honest row kept
    assert capped.rows == 1578 and capped.excluded_rows == 3000 + 3000 - 78
    assert "left out by the caller policy" in capped.message
    named = run(CallerPolicy(callers=honest))
    assert named.status == "ok" and named.rows == 1500
    # An anonymous flood alone: read only when asked to.
    uri = str(tmp_path / "quiet")
    _log(uri, clean, NOW - timedelta(hours=20), timedelta(hours=19), callers=honest)
    _log(uri, flood, NOW - timedelta(hours=10), timedelta(hours=9), callers=("anonymous",))
    assert run(CallerPolicy()).status == "ok"
    assert run(CallerPolicy(include_anonymous=True)).status == "drift"
    single = run(CallerPolicy(callers=("client-0",), max_share=0.5))
    assert single.status == "insufficient_data" and single.rows == 0  # one caller never decides under a cap
