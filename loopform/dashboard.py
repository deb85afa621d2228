"""The platform's Grafana dashboard: one row per model, from the series the platform already exposes.

Per model: drift share over time against its gate (the monitor's gauges, via the Pushgateway), request rate,
5xx share and p99 latency (BentoML's HTTP metrics), the registry version the service serves
(`loopform_serving_model_version`) and when the last successful pipeline run started (the WorkflowTemplate's
custom metric, `components.workflow.last_success_metric`). A pure function of the spec, so the ConfigMap the
sidecar loads and the tests read the same JSON; queries reuse `loopform.alert_rules`'s series names, so a
panel and the rule that alerts on it cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from loopform.alert_rules import DRIFT_SHARE, DURATION_BUCKETS, RATE_WINDOW, REQUESTS
from loopform.spec import PlatformSpec

SERVING_VERSION = "loopform_serving_model_version"
#: The pipeline's custom metric, with or without the prefix the Argo controller's exporter may add.
LAST_SUCCESS = '{__name__=~"(argo_workflows_)?loopform_pipeline_last_success_timestamp_seconds"'
DRIFT_THRESHOLD = "loopform_drift_share_threshold"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Grafana's grid is 24 units wide; each model's row holds three graphs and two figures.
_WIDTH = 24
_HEIGHT = 8


def _target(expr: str, legend: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": "A"}


def _panel(title: str, kind: str, targets: list[dict[str, Any]], x: int, y: int, w: int, unit: str) -> dict[str, Any]:
    return {
        "title": title,
        "type": kind,
        "datasource": DATASOURCE,
        "targets": [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)],
        "gridPos": {"x": x, "y": y, "w": w, "h": _HEIGHT},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
    }


def model_panels(model: str, y: int) -> list[dict[str, Any]]:
    """A model's row: its title, then drift, traffic, errors and latency graphs, version and last retraining."""
    of_model = f'model="{model}"'
    service = f'service_name="{model}"'
    requests = f"sum(rate({REQUESTS}{{{service}}}[{RATE_WINDOW}]))"
    errors = f'sum(rate({REQUESTS}{{{service},http_response_code=~"5.."}}[{RATE_WINDOW}]))'
    p99 = f"histogram_quantile(0.99, sum by (le) (rate({DURATION_BUCKETS}{{{service}}}[{RATE_WINDOW}])))"
    row = {"type": "row", "title": model, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": _WIDTH, "h": 1}}
    y += 1
    return [
        row,
        _panel(
            "Drift share",
            "timeseries",
            [
                _target(f"{DRIFT_SHARE}{{{of_model}}}", "drift share"),
                _target(f"{DRIFT_THRESHOLD}{{{of_model}}}", "gate"),
            ],
            0,
            y,
            8,
            "percentunit",
        ),
        _panel("Requests", "timeseries", [_target(requests, "req/s")], 8, y, 8, "reqps"),
        _panel(
            "Production version",
            "stat",
            [_target(f"max({SERVING_VERSION}{{{of_model}}})", "version")],
            16,
            y,
            4,
            "none",
        ),
        _panel(
            "Last retraining",
            "stat",
            [_target(f"max({LAST_SUCCESS},{of_model}}}) * 1000", "started")],
            20,
            y,
            4,
            "dateTimeFromNow",
        ),
        _panel(
            "5xx share", "timeseries", [_target(f"{errors} / {requests}", "5xx")], 0, y + _HEIGHT, 12, "percentunit"
        ),
        _panel("p99 latency", "timeseries", [_target(p99, "p99")], 12, y + _HEIGHT, 12, "s"),
    ]


def dashboard(spec: PlatformSpec) -> dict[str, Any]:
    """The Grafana dashboard model (schema of Grafana 10/11) for every model of the spec."""
    rows = 1 + 2 * _HEIGHT  # a model's title, then two lines of panels
    panels = [panel for i, model in enumerate(sorted(spec.models)) for panel in model_panels(model, i * rows)]
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number
    return {
        "uid": f"loopform-{spec.environment}",
        "title": f"loopform {spec.environment}",
        "tags": ["loopform", spec.environment],
        "timezone": "utc",
        "schemaVersion": 39,
        "editable": False,
        "time": {"from": "now-24h", "to": "now"},
        "refresh": "1m",
        "templating": {
            "list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"}]
        },
        "panels": panels,
    }
