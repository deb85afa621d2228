"""The local drift route with real servers: Pushgateway -> Prometheus (the spec's drift rule) -> Alertmanager ->
the webhook receiver -> one retraining per incident.

Runs Debian's `prometheus`, `prometheus-pushgateway` and `prometheus-alertmanager` (`.ci/run` installs them): it
skips where one is missing, except in CI (`CI` set), where it must run.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from loopform.alert_rules import feature_views, rule_groups
from loopform.alerts import DRIFT_ALERTNAME
from loopform.local_alerting import LOCAL_FOR, LocalAlerting, Retrainings, drift_rules, missing
from loopform.monitor import gauges
from loopform.spec import load_stack

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def spec() -> Any:
    return load_stack(ROOT / "stacks" / "Pulumi.local.yaml", ROOT)


def test_the_local_rules_are_the_specs_drift_rules_with_a_short_for(spec: Any) -> None:
    groups = rule_groups(spec, feature_views(spec, ROOT))
    local = drift_rules(groups)
    assert [group["name"] for group in local] == [group["name"] for group in groups]
    for group, ours in zip(groups, local, strict=True):
        (spec_rule,) = [rule for rule in group["rules"] if rule["alert"] == DRIFT_ALERTNAME]
        (rule,) = ours["rules"]
        assert rule == {**spec_rule, "for": LOCAL_FOR}


needs_servers = pytest.mark.skipif(
    bool(missing()) and not os.environ.get("CI"),
    reason=f"missing {', '.join(missing())} (apt-get install prometheus prometheus-pushgateway prometheus-alertmanager)",
)


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url) as response:
        return list(json.load(response)["data"]["result"])


def push_share(alerting: LocalAlerting, model: str, share: float) -> None:
    """What a monitor run pushes about the share (the gauge the drift rule reads)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    gauges(registry)["drift_share"].labels(model=model).set(share)
    alerting.push(registry, model)


@needs_servers
def test_repeated_notifications_start_one_retraining_and_a_low_share_none(spec: Any, tmp_path: Path) -> None:
    retrainings = Retrainings()
    with LocalAlerting(tmp_path / "alerting", rule_groups(spec, feature_views(spec, ROOT)), retrainings) as alerting:
        fraud, delivery = spec.gates_for("fraud"), spec.gates_for("delivery")
        push_share(alerting, "fraud", min(1.0, fraud.drift.max_drift_share + 0.5))
        push_share(alerting, "delivery", delivery.drift.max_drift_share / 2)

        def firing_notifications() -> int:
            return sum(n.status == "firing" for n in alerting.receiver.notifications)

        # Alertmanager re-sends the firing group: wait for the first delivery and two repeats.
        alerting.wait(lambda: firing_notifications() >= 3, "three firing notifications")
        (request,) = retrainings.started
        assert request.model == "fraud" and request.labels["alertname"] == DRIFT_ALERTNAME
        assert alerting.repeats_ignored() >= 2
        assert retrainings.of("fraud") == [request] and retrainings.of("delivery") == []

        # Prometheus scraped delivery's low share with honor_labels and evaluated it all along: no alert.
        (series,) = query(alerting.prometheus.url, 'loopform_drift_share{model="delivery"}')
        assert series["metric"]["job"] == "loopform-monitor"
        assert float(series["value"][1]) < delivery.drift.max_drift_share
        alerts = query(alerting.prometheus.url, "ALERTS")
        assert {a["metric"]["model"] for a in alerts if a["metric"]["alertname"] == DRIFT_ALERTNAME} == {"fraud"}
    processes = [alerting.pushgateway.process, alerting.prometheus.process, alerting.alertmanager.process]
    assert all(process is not None and process.poll() is not None for process in processes), "all stopped"


def test_without_the_servers_up_uses_the_file_trigger_and_says_so(
    spec: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopform.local import drift_route, route_line

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert missing() == ["alertmanager", "prometheus", "pushgateway"]
    with drift_route(spec, tmp_path, ROOT) as route:
        assert route is None
        line = route_line(route, tmp_path)
    assert line.startswith(f"drift route: the monitor's file trigger in {tmp_path / 'triggers'}")
    assert "apt-get install prometheus prometheus-pushgateway prometheus-alertmanager" in line
    assert not (tmp_path / "alerting").exists()
