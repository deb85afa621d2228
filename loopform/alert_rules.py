"""Prometheus alerting rules built from the stack spec: drift, a silent monitor, serving errors and latency,
stale features.

Pure functions of the spec (and each model's contract, for its Feast feature view), so the PrometheusRule the
platform declares and the groups tests feed to `promtool` are the same data. The drift series are the
monitor's gauges (`loopform.monitor`), pushed to the Pushgateway by each `loopform monitor` run; the serving
series are BentoML's own HTTP metrics, whose `service_name` is the model (`loopform.serving.bento`); the
feature lag is the Feast feature server's own `feast_feature_freshness_seconds` (`python -m
loopform.feature_server --metrics`, Feast's server with reads only): seconds since the end of the feature
view's most recent materialisation.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from loopform.spec import PlatformSpec

DRIFT_SHARE = "loopform_drift_share"
LAST_RUN = "loopform_monitor_last_run_timestamp_seconds"
REQUESTS = "bentoml_service_request_total"
DURATION_BUCKETS = "bentoml_service_request_duration_seconds_bucket"
FEATURE_FRESHNESS = "feast_feature_freshness_seconds"
PAYLOAD_DROPS = "loopform_payload_rows_dropped_total"
#: Window of the serving rates: long enough to hold several scrapes, short enough to follow an incident.
RATE_WINDOW = "5m"
#: Consecutive runs looked at to find a schedule's longest gap (a weekday-only hourly cron has a weekend gap).
_RUNS = 400
_HORIZON = timedelta(days=62)
#: A fixed start, so the rules (and the golden files) do not change with the day they are rendered.
_START = datetime(2024, 1, 1, tzinfo=UTC)


@functools.cache
def schedule_period(cron: str) -> timedelta:
    """The longest gap between two consecutive runs of `cron` (within two months of runs, or 400 of them)."""
    from croniter import croniter

    runs = croniter(cron, _START)
    first = previous = runs.get_next(datetime)
    longest = timedelta()
    for _ in range(_RUNS):
        current = runs.get_next(datetime)
        longest = max(longest, current - previous)
        if current - first > _HORIZON:
            break
        previous = current
    return longest


def feature_views(spec: PlatformSpec, root: Path) -> dict[str, str]:
    """Each model's Feast feature view (its contract's `entity_view`): the features its service reads."""
    from loopform.model_code import contract_at

    return {model: contract_at(root, spec.models[model].path, model).entity_view for model in sorted(spec.models)}


def rule_groups(spec: PlatformSpec, views: Mapping[str, str]) -> list[dict[str, Any]]:
    """The rule group of every model of the spec; `views` from `feature_views`."""
    return [rule_group(spec, model, views[model]) for model in sorted(spec.models)]


def rule_group(spec: PlatformSpec, model: str, feature_view: str) -> dict[str, Any]:
    """A model's rules: drift share above its gate for monitoring.alert_for, a monitor that stopped pushing, its
    service's 5xx share and p99 latency above serving.max_error_rate and serving.max_p99_seconds, payload rows
    its service dropped, and its feature view not materialised within two periods of
    feature_store.materialization_schedule."""
    monitoring = spec.monitoring
    serving = spec.models[model].serving
    service = f'service_name="{model}"'
    errors = f'sum(rate({REQUESTS}{{{service},http_response_code=~"5.."}}[{RATE_WINDOW}]))'
    requests = f"sum(rate({REQUESTS}{{{service}}}[{RATE_WINDOW}]))"
    p99 = f"histogram_quantile(0.99, sum by (le) (rate({DURATION_BUCKETS}{{{service}}}[{RATE_WINDOW}])))"
    key = f"models.{model}.serving"
    stale_after = int(2 * schedule_period(monitoring.schedule).total_seconds())
    selector = f'{{model="{model}"}}'
    max_share = spec.gates_for(model).drift.max_drift_share
    materialization = spec.feature_store.materialization_schedule
    max_lag = int(2 * schedule_period(materialization).total_seconds())
    freshness = f'max({FEATURE_FRESHNESS}{{project="{spec.feature_store.project}",feature_view="{feature_view}"}})'
    labels = {"model": model, "environment": spec.environment}
    return {
        "name": f"loopform-{model}",
        "rules": [
            {
                "alert": "LoopformDriftShareHigh",
                "expr": f"{DRIFT_SHARE}{selector} > {max_share}",
                "for": monitoring.alert_for,
                "labels": {**labels, "severity": "warning"},
                "annotations": {
                    "summary": f"{model}: drift share {{{{ $value }}}} above {max_share}",
                    "description": f"The calibrated drift share of {model}'s served traffic has exceeded "
                    f"gates.drift.max_drift_share={max_share} for monitoring.alert_for="
                    f"{monitoring.alert_for}; the monitor has asked for retraining.",
                },
            },
            {
                "alert": "LoopformMonitorStale",
                "expr": f"time() - {LAST_RUN}{selector} > {stale_after} or absent({LAST_RUN}{selector})",
                "for": monitoring.alert_for,
                "labels": {**labels, "severity": "critical"},
                "annotations": {
                    "summary": f"{model}: no drift monitor run in {stale_after}s",
                    "description": f"The drift monitor of {model} has not completed a run in two periods "
                    f"of monitoring.schedule={monitoring.schedule!r} ({stale_after}s), or never pushed: "
                    "drift would go unnoticed. Check the CronJob's last Job.",
                },
            },
            {
                "alert": "LoopformServingErrors",
                "expr": f"{errors} / {requests} > {serving.max_error_rate}",
                "for": monitoring.alert_for,
                "labels": {**labels, "severity": "critical"},
                "annotations": {
                    "summary": f"{model}: {{{{ $value }}}} of requests fail (5xx)",
                    "description": f"The share of {model}'s requests answered 5xx over {RATE_WINDOW} has exceeded "
                    f"{key}.max_error_rate={serving.max_error_rate} for monitoring.alert_for={monitoring.alert_for}.",
                },
            },
            {
                "alert": "LoopformServingSlow",
                "expr": f"{p99} > {serving.max_p99_seconds}",
                "for": monitoring.alert_for,
                "labels": {**labels, "severity": "warning"},
                "annotations": {
                    "summary": f"{model}: p99 latency {{{{ $value | humanizeDuration }}}}",
                    "description": f"The 99th percentile latency of {model}'s requests over {RATE_WINDOW} has "
                    f"exceeded {key}.max_p99_seconds={serving.max_p99_seconds}s for monitoring.alert_for="
                    f"{monitoring.alert_for}.",
                },
            },
            {
                "alert": "LoopformPayloadRowsDropped",
                "expr": f"sum(increase({PAYLOAD_DROPS}{selector}[10m])) > 0",
                "labels": {**labels, "severity": "warning"},
                "annotations": {
                    "summary": f"{model}: {{{{ $value }}}} payload rows dropped in 10 minutes",
                    "description": f"{model}'s service dropped payload rows (its spill buffer is full or unwritable: "
                    "the lake has been unreachable too long). The drift monitor judges what is left; see "
                    "docs/payload-log.md.",
                },
            },
            {
                "alert": "LoopformFeaturesStale",
                "expr": f"{freshness} > {max_lag}",
                "for": monitoring.alert_for,
                "labels": {**labels, "severity": "warning"},
                "annotations": {
                    "summary": f"{model}: feature view {feature_view} last materialised {{{{ $value }}}}s ago",
                    "description": f"The online store's {feature_view} has not been materialised within two periods "
                    f"of feature_store.materialization_schedule={materialization!r} ({max_lag}s): {model} serves "
                    "stale entity features. Check the materialize CronJob's last Job.",
                },
            },
        ],
    }
