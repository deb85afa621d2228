"""The drift monitors on the cluster: CronJobs, the Pushgateway, and alert rules that promtool checks and runs."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from loopform import alert_rules, identity, render
from loopform.cli import main
from loopform.spec import CONFIG_KEY, PlatformSpec, load_stack, stack_file

from .conftest import ROOT

KUBERNETES_VERSION = "1.30"
PROMTOOL = shutil.which("promtool")
#: Skips where promtool is missing, except in CI (`CI` set), where `.ci/run` installs it: there it must run.
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"),
    reason="promtool missing (apt-get install prometheus)",
)


@pytest.fixture(scope="module")
def operator_stack(tmp_path_factory: pytest.TempPathFactory) -> tuple[PlatformSpec, list[dict[str, Any]]]:
    """The dev stack with monitoring.prometheus_operator on, and its rendered objects."""
    document = yaml.safe_load(stack_file("dev").read_text())
    document["config"][CONFIG_KEY]["monitoring"]["prometheus_operator"] = True
    path = tmp_path_factory.mktemp("stack") / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(document))
    spec = load_stack(path, ROOT)
    return spec, render.stack_manifests(render.render_stack("dev", ROOT, path), spec).objects


def _of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in objects if m["kind"] == kind]


def test_each_model_has_a_monitor_cron_job_pushing_to_the_pushgateway(operator_stack) -> None:
    spec, objects = operator_stack
    namespace = spec.cluster.namespaces.monitoring
    crons = {m["metadata"]["name"]: m for m in _of_kind(objects, "CronJob")}
    accounts = {m["metadata"]["name"]: m for m in _of_kind(objects, "ServiceAccount")}
    for model in spec.models:
        cron = crons[f"{model}-drift-monitor"]
        assert cron["metadata"]["namespace"] == namespace
        assert cron["spec"]["schedule"] == spec.monitoring.schedule
        assert cron["spec"]["concurrencyPolicy"] == "Forbid"
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["image"] == spec.orchestrator.pipeline_image
        gateway = f"http://loopform-pushgateway.{namespace}.svc.cluster.local:9091"
        assert container["args"][:6] == ["monitor", model, "--stack", "dev", "--push-gateway", gateway]
        # No Kubernetes API access: no token in the pod, no Role bound to its account.
        assert pod["automountServiceAccountToken"] is False
        assert accounts[pod["serviceAccountName"]]["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    bindings = [m for m in objects if m["kind"] == "RoleBinding"]
    assert not any(s["name"].endswith("-drift-monitor") for b in bindings for s in b["subjects"])
    [deployment] = [m for m in _of_kind(objects, "Deployment") if m["metadata"]["name"] == "loopform-pushgateway"]
    [image] = [c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    assert image.startswith("prom/pushgateway:v")
    [monitor] = [m for m in _of_kind(objects, "ServiceMonitor") if m["metadata"]["name"] == "loopform-pushgateway"]
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True


def test_monitors_run_as_the_monitor_workload_with_its_role(operator_stack) -> None:
    """They read the payload log and MLflow artifacts through the stack file: nothing in the manifest says s3://."""
    spec, objects = operator_stack
    workload = identity.workloads(spec)["monitor"]
    [account] = [m for m in _of_kind(objects, "ServiceAccount") if m["metadata"]["name"] == workload.service_account]
    assert account["metadata"]["namespace"] == workload.namespace == spec.cluster.namespaces.monitoring
    assert account["metadata"]["annotations"] == {identity.IRSA_ANNOTATION: identity.role_arn(spec, "monitor")}
    assert identity.role_arn(spec, "monitor") == "arn:aws:iam::123456789012:role/loopform-dev-monitor"
    crons = [c for c in _of_kind(objects, "CronJob") if c["metadata"]["name"].endswith("-drift-monitor")]
    assert len(crons) == len(spec.models)
    for cron in crons:
        assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"] == workload.service_account


def test_monitoring_objects_validate(operator_stack) -> None:
    _, objects = operator_stack
    core = [
        m
        for m in objects
        if m["metadata"].get("namespace") == "loopform-dev-monitoring"
        and m["kind"] in {"CronJob", "ServiceAccount", "Deployment", "Service"}
    ]
    assert {m["kind"] for m in core} == {"CronJob", "ServiceAccount", "Deployment", "Service"}
    for manifest in core:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_rules_are_declared_per_model_only_with_the_operator(operator_stack, rendered) -> None:
    spec, objects = operator_stack
    rules = _of_kind(objects, "PrometheusRule")
    assert {r["metadata"]["labels"]["release"] for r in rules} == {spec.monitoring.prometheus_release}
    assert [g for r in sorted(rules, key=lambda r: r["metadata"]["name"]) for g in r["spec"]["groups"]] == (
        alert_rules.rule_groups(spec)
    )
    plain = render.stack_manifests(rendered("dev"), load_stack(stack_file("dev"), ROOT)).objects
    assert not _of_kind(plain, "PrometheusRule") and not _of_kind(plain, "ServiceMonitor")


def test_rules_name_their_thresholds_and_spec_keys(operator_stack) -> None:
    spec, _ = operator_stack
    for group in alert_rules.rule_groups(spec):
        drift, stale, errors, slow = group["rules"]
        model = drift["labels"]["model"]
        share = spec.gates_for(model).drift.max_drift_share
        assert drift["expr"] == f'loopform_drift_share{{model="{model}"}} > {share}'
        assert drift["for"] == spec.monitoring.alert_for
        assert f"gates.drift.max_drift_share={share}" in drift["annotations"]["description"]
        assert "monitoring.schedule='0 * * * *' (7200s)" in stale["annotations"]["description"]
        serving = spec.models[model].serving
        assert f"models.{model}.serving.max_error_rate={serving.max_error_rate}" in errors["annotations"]["description"]
        assert (
            f"models.{model}.serving.max_p99_seconds={serving.max_p99_seconds}s" in slow["annotations"]["description"]
        )
        assert {r["labels"]["severity"] for r in group["rules"]} == {"warning", "critical"}


def test_schedule_period_is_the_longest_gap() -> None:
    assert alert_rules.schedule_period("*/30 * * * *").total_seconds() == 1800
    assert alert_rules.schedule_period("0 3 * * 1").days == 7
    assert alert_rules.schedule_period("0 * * * 1-5").total_seconds() == (2 * 24 + 1) * 3600  # the weekend
    assert alert_rules.schedule_period("@monthly").days == 31


def _rules_file(objects: list[dict[str, Any]], folder: Path) -> Path:
    """The groups of the rendered PrometheusRules, as a Prometheus rule file."""
    groups = [g for r in _of_kind(objects, "PrometheusRule") for g in r["spec"]["groups"]]
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def _promtool(*args: str) -> str:
    assert PROMTOOL, "promtool missing: apt-get install prometheus"
    done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@needs_promtool
def test_rendered_rules_pass_promtool_check(operator_stack, tmp_path: Path) -> None:
    _, objects = operator_stack
    assert "SUCCESS: 8 rules found" in _promtool("check", "rules", str(_rules_file(objects, tmp_path)))


def _alert(rule: dict[str, Any], value: str) -> dict[str, Any]:
    """The alert `rule` raises, its annotations' `{{ $value ... }}` rendered as `value`."""
    annotations = {k: re.sub(r"\{\{ \$value[^}]*\}\}", value, v) for k, v in rule["annotations"].items()}
    return {"exp_labels": rule["labels"], "exp_annotations": annotations}


@needs_promtool
def test_drift_and_staleness_alerts_fire_as_specified(operator_stack, tmp_path: Path) -> None:
    """Drift above the gate fires after alert_for and not before; below it never; a silent monitor fires."""
    spec, objects = operator_stack
    (fraud_drift, fraud_stale, *_), (_, delivery_stale, *_) = _by_model(alert_rules.rule_groups(spec))
    above = round(spec.gates_for("fraud").drift.max_drift_share + 0.1, 3)
    below = round(spec.gates_for("delivery").drift.max_drift_share - 0.05, 3)
    fresh = "0+60x300"  # pushed every minute: last run == now
    tests = {
        "rule_files": [str(_rules_file(objects, tmp_path))],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'loopform_drift_share{model="fraud"}', "values": f"{above}x60"},
                    {"series": 'loopform_drift_share{model="delivery"}', "values": f"{below}x60"},
                    {"series": 'loopform_monitor_last_run_timestamp_seconds{model="fraud"}', "values": fresh},
                    {"series": 'loopform_monitor_last_run_timestamp_seconds{model="delivery"}', "values": fresh},
                ],
                "alert_rule_test": [
                    {"eval_time": "14m", "alertname": "LoopformDriftShareHigh", "exp_alerts": []},
                    {
                        "eval_time": "20m",
                        "alertname": "LoopformDriftShareHigh",
                        "exp_alerts": [_alert(fraud_drift, f"{above:g}")],
                    },
                    {"eval_time": "60m", "alertname": "LoopformMonitorStale", "exp_alerts": []},
                ],
            },
            {
                # fraud last ran at time 0 and never again; delivery never pushed at all.
                "interval": "1m",
                "input_series": [
                    {"series": 'loopform_monitor_last_run_timestamp_seconds{model="fraud"}', "values": "0x300"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "100m",
                        "alertname": "LoopformMonitorStale",
                        "exp_alerts": [_alert(delivery_stale, "1")],
                    },
                    {
                        "eval_time": "150m",
                        "alertname": "LoopformMonitorStale",
                        "exp_alerts": [_alert(fraud_stale, "9000"), _alert(delivery_stale, "1")],
                    },
                ],
            },
        ],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    assert "SUCCESS" in _promtool("test", "rules", str(path))


@needs_promtool
def test_serving_error_and_latency_alerts_fire_as_specified(operator_stack, tmp_path: Path) -> None:
    """fraud answers a quarter of its requests 5xx, in about 2.5 s; delivery answers all, fast: only fraud alerts."""
    spec, objects = operator_stack
    _, _, fraud_errors, fraud_slow = _by_model(alert_rules.rule_groups(spec))[0]
    assert spec.models["fraud"].serving.max_error_rate < 0.25 and spec.models["fraud"].serving.max_p99_seconds < 2

    def requests(model: str, code: str, per_minute: int) -> dict[str, str]:
        labels = f'service_name="{model}",endpoint="/predict",http_response_code="{code}"'
        return {"series": f"bentoml_service_request_total{{{labels}}}", "values": f"0+{per_minute}x60"}

    def buckets(model: str, slow: bool) -> list[dict[str, str]]:
        labels = f'service_name="{model}",endpoint="/predict",http_response_code="200"'
        counts = {"0.5": 0 if slow else 4, "1.0": 0 if slow else 4, "2.5": 4, "+Inf": 4}
        return [
            {"series": f'bentoml_service_request_duration_seconds_bucket{{{labels},le="{le}"}}', "values": f"0+{n}x60"}
            for le, n in counts.items()
        ]

    tests = {
        "rule_files": [str(_rules_file(objects, tmp_path))],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    requests("fraud", "200", 3),
                    requests("fraud", "500", 1),
                    requests("delivery", "200", 4),
                    *buckets("fraud", slow=True),
                    *buckets("delivery", slow=False),
                    *(
                        {"series": f'loopform_monitor_last_run_timestamp_seconds{{model="{m}"}}', "values": "0+60x60"}
                        for m in ("fraud", "delivery")
                    ),
                ],
                "alert_rule_test": [
                    {"eval_time": "14m", "alertname": "LoopformServingErrors", "exp_alerts": []},
                    {"eval_time": "14m", "alertname": "LoopformServingSlow", "exp_alerts": []},
                    {
                        "eval_time": "30m",
                        "alertname": "LoopformServingErrors",
                        "exp_alerts": [_alert(fraud_errors, "0.25")],
                    },
                    {
                        "eval_time": "30m",
                        "alertname": "LoopformServingSlow",
                        "exp_alerts": [_alert(fraud_slow, "2.485s")],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    assert "SUCCESS" in _promtool("test", "rules", str(path))


def _by_model(groups: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    named = {g["name"]: g["rules"] for g in groups}
    return named["loopform-fraud"], named["loopform-delivery"]


def test_monitor_pushes_its_gauges_to_the_gateway(tmp_path: Path) -> None:
    received: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            received.append(self.path + "\n" + body)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = main(
            [
                "monitor", "fraud", "--stack", "local", "--reference", str(tmp_path / "unused.parquet"),
                "--payload-uri", f"file://{tmp_path}/payloads", "--report-dir", str(tmp_path / "report"),
                "--push-gateway", f"http://127.0.0.1:{server.server_port}",
            ]
        )  # fmt: skip
    finally:
        server.shutdown()
    assert code == 0  # no payloads: no decision, but the run completed and says so
    [pushed] = received
    assert pushed.startswith("/metrics/job/loopform-monitor/model/fraud\n")
    assert 'loopform_monitor_last_run_timestamp_seconds{model="fraud"}' in pushed


def test_with_static_keys_the_monitor_loads_them_in_its_namespace(tmp_path: Path) -> None:
    document = yaml.safe_load(stack_file("dev").read_text())
    document["config"][CONFIG_KEY]["cluster"]["identity"] = {"kind": "static-keys"}
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(document))
    objects = render.stack_manifests(render.render_stack("dev", ROOT, path), load_stack(path, ROOT)).objects
    secrets = {(m["metadata"]["namespace"], m["metadata"]["name"]) for m in _of_kind(objects, "Secret")}
    assert ("loopform-dev-monitoring", "loopform-object-store") in secrets
    for cron in _of_kind(objects, "CronJob"):
        [container] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "loopform-object-store"}}]
