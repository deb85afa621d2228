"""The drift monitors on the cluster: CronJobs, the Pushgateway, and alert rules that promtool checks and runs."""

from __future__ import annotations

import http.server
import json
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
    document = _operator_document(prometheus_operator=True)
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
        _groups(spec)
    )
    plain = render.stack_manifests(rendered("dev"), load_stack(stack_file("dev"), ROOT)).objects
    assert not _of_kind(plain, "PrometheusRule") and not _of_kind(plain, "ServiceMonitor")


def test_rules_name_their_thresholds_and_spec_keys(operator_stack) -> None:
    spec, _ = operator_stack
    for group in _groups(spec):
        drift, stale, errors, slow, drops, features = group["rules"]
        assert drops["alert"] == "LoopformPayloadRowsDropped" and drops["expr"].endswith("[10m])) > 0")
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
        assert "feature_store.materialization_schedule='*/30 * * * *' (3600s)" in features["annotations"]["description"]
        view = alert_rules.feature_views(spec, ROOT)[model]
        assert f'feature_view="{view}"' in features["expr"] and features["expr"].endswith("> 3600")
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
    assert "SUCCESS: 12 rules found" in _promtool("check", "rules", str(_rules_file(objects, tmp_path)))


def _alert(rule: dict[str, Any], value: str) -> dict[str, Any]:
    """The alert `rule` raises, its annotations' `{{ $value ... }}` rendered as `value`."""
    annotations = {k: re.sub(r"\{\{ \$value[^}]*\}\}", value, v) for k, v in rule["annotations"].items()}
    return {"exp_labels": rule["labels"], "exp_annotations": annotations}


@needs_promtool
def test_drift_and_staleness_alerts_fire_as_specified(operator_stack, tmp_path: Path) -> None:
    """Drift above the gate fires after alert_for and not before; below it never; a silent monitor fires."""
    spec, objects = operator_stack
    (fraud_drift, fraud_stale, *_), (_, delivery_stale, *_) = _by_model(_groups(spec))
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
    _, _, fraud_errors, fraud_slow, *_ = _by_model(_groups(spec))[0]
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

    _promtool_case(
        objects,
        tmp_path,
        [
            requests("fraud", "200", 3),
            requests("fraud", "500", 1),
            requests("delivery", "200", 4),
            *buckets("fraud", slow=True),
            *buckets("delivery", slow=False),
        ],
        [
            {"eval_time": "14m", "alertname": "LoopformServingErrors", "exp_alerts": []},
            {"eval_time": "14m", "alertname": "LoopformServingSlow", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "LoopformServingErrors", "exp_alerts": [_alert(fraud_errors, "0.25")]},
            {"eval_time": "30m", "alertname": "LoopformServingSlow", "exp_alerts": [_alert(fraud_slow, "2.485s")]},
        ],
        minutes=60,
    )


def _promtool_case(
    objects: list[dict[str, Any]],
    tmp_path: Path,
    series: list[dict[str, str]],
    expected: list[dict[str, Any]],
    minutes: int,
) -> None:
    """Run one `promtool test rules` case on the rendered rules: `series` (plus fresh monitor runs of both models,
    so no staleness alert interferes) sampled every minute for `minutes`, and the alerts `expected`."""
    fresh = [
        {"series": f'loopform_monitor_last_run_timestamp_seconds{{model="{m}"}}', "values": f"0+60x{minutes}"}
        for m in ("fraud", "delivery")
    ]
    tests = {
        "rule_files": [str(_rules_file(objects, tmp_path))],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [*series, *fresh], "alert_rule_test": expected}],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    assert "SUCCESS" in _promtool("test", "rules", str(path))


@needs_promtool
def test_feature_lag_alert_fires_when_materialisation_stops(operator_stack, tmp_path: Path) -> None:
    """Feast's freshness saw-tooths below one period while materialisation runs; when it stops, fraud alerts."""
    spec, objects = operator_stack
    *_, fraud_features = _by_model(_groups(spec))[0]
    views = alert_rules.feature_views(spec, ROOT)
    project = spec.feature_store.project

    def freshness(model: str, values: str) -> dict[str, str]:
        labels = f'project="{project}",feature_view="{views[model]}"'
        return {"series": f"feast_feature_freshness_seconds{{{labels}}}", "values": values}

    _promtool_case(
        objects,
        tmp_path,
        # delivery: materialised every 30 min (freshness 0..1740 s); fraud: never again after time 0.
        [freshness("delivery", " ".join(["0+60x29"] * 6)), freshness("fraud", "0+60x180")],
        [
            {"eval_time": "70m", "alertname": "LoopformFeaturesStale", "exp_alerts": []},
            {"eval_time": "80m", "alertname": "LoopformFeaturesStale", "exp_alerts": [_alert(fraud_features, "4800")]},
        ],
        minutes=180,
    )


@needs_promtool
def test_dropped_payload_rows_alert_at_once(operator_stack, tmp_path: Path) -> None:
    """Rows dropped by fraud's payload log (the lake unreachable too long) alert; delivery's steady zero does not."""
    spec, objects = operator_stack
    fraud_drops = _by_model(_groups(spec))[0][4]
    assert fraud_drops["alert"] == "LoopformPayloadRowsDropped"

    def dropped(model: str, values: str) -> dict[str, str]:
        return {
            "series": f'loopform_payload_rows_dropped_total{{model="{model}",reason="buffer_full"}}',
            "values": values,
        }

    _promtool_case(
        objects,
        tmp_path,
        # fraud: nothing for 20 minutes, then 50 rows a minute; delivery: none.
        [dropped("fraud", "0x20 0+50x20"), dropped("delivery", "0x40")],
        [
            {"eval_time": "19m", "alertname": "LoopformPayloadRowsDropped", "exp_alerts": []},
            {"eval_time": "35m", "alertname": "LoopformPayloadRowsDropped", "exp_alerts": [_alert(fraud_drops, "500")]},
        ],
        minutes=40,
    )


def _groups(spec: PlatformSpec) -> list[dict[str, Any]]:
    return alert_rules.rule_groups(spec, alert_rules.feature_views(spec, ROOT))


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


# --- scrape targets, the dashboard and kube-prometheus-stack ------------------------------------


def _operator_document(**monitoring: Any) -> dict[str, Any]:
    document = yaml.safe_load(stack_file("dev").read_text())
    document["config"][CONFIG_KEY]["monitoring"].update(monitoring)
    return document


def test_service_monitors_scrape_named_ports_of_existing_services(operator_stack) -> None:
    """Each ServiceMonitor selects at least one Service of its namespace that has the port it scrapes."""
    spec, objects = operator_stack
    services = _of_kind(objects, "Service")
    monitors = _of_kind(objects, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {
        "loopform-pushgateway",
        f"{spec.environment}-registry",
        f"{spec.environment}-features-server",
    }
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == spec.monitoring.prometheus_release
        wanted = monitor["spec"]["selector"]["matchLabels"]
        selected = [
            s
            for s in services
            if s["metadata"]["namespace"] == monitor["metadata"]["namespace"]
            and wanted.items() <= s["metadata"]["labels"].items()
        ]
        assert selected, f"{monitor['metadata']['name']} selects no Service"
        (endpoint,) = monitor["spec"]["endpoints"]
        assert any(endpoint["port"] == p["name"] for s in selected for p in s["spec"]["ports"]), endpoint


def test_the_feature_server_serves_feasts_metrics(operator_stack) -> None:
    from components.feature_store import FEAST_METRICS_PORT

    spec, objects = operator_stack
    server = next(
        d for d in _of_kind(objects, "Deployment") if d["metadata"]["name"] == f"{spec.environment}-features-server"
    )
    (container,) = server["spec"]["template"]["spec"]["containers"]
    assert "--metrics" in container["command"] + container.get("args", [])
    assert {"name": "metrics", "containerPort": FEAST_METRICS_PORT} in container["ports"]
    # Feast puts its multiprocess folder under /tmp: writable with a read-only root filesystem.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_mlflow_accepts_a_scrape_addressed_to_its_pod_ip(operator_stack) -> None:
    """Prometheus sends `Host: <pod IP>:<port>`; MLflow's host check must let it through, and no other host."""
    from mlflow.server.security_utils import is_allowed_host_header

    spec, objects = operator_stack
    server = next(d for d in _of_kind(objects, "Deployment") if d["metadata"]["name"] == f"{spec.environment}-registry")
    container = next(c for c in server["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow")
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in container["command"] if "=" in arg)
    assert flags["expose-prometheus"].startswith("/tmp/")
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]
    # What the kubelet does with $(POD_IP) in a command, for a pod at 10.1.2.3.
    hosts = flags["allowed-hosts"].replace("$(POD_IP)", "10.1.2.3").split(",")
    port = spec.registry.port
    assert is_allowed_host_header(hosts, f"10.1.2.3:{port}")
    assert is_allowed_host_header(hosts, f"{spec.environment}-registry.loopform-dev-system.svc:{port}")
    assert not is_allowed_host_header(hosts, f"10.9.9.9:{port}")
    assert not is_allowed_host_header(hosts, "attacker.example:80")


def test_the_dashboard_shows_each_models_loop(operator_stack, tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from components.monitoring import DASHBOARD_LABEL
    from components.workflow import LAST_SUCCESS_METRIC
    from loopform.model_code import contract_at
    from loopform.monitor import gauges
    from loopform.serving.metrics import create_metrics

    def load_contract(root: Path, model: str) -> Any:
        return contract_at(root, spec.models[model].path, model)

    spec, objects = operator_stack
    (config_map,) = [c for c in _of_kind(objects, "ConfigMap") if DASHBOARD_LABEL[0] in c["metadata"]["labels"]]
    assert config_map["metadata"]["labels"][DASHBOARD_LABEL[0]] == DASHBOARD_LABEL[1]
    assert config_map["metadata"]["namespace"] == spec.cluster.namespaces.monitoring
    (document,) = config_map["data"].values()
    board = json.loads(document)
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == sorted(spec.models)
    titles = ["Drift share", "Requests", "Production version", "Last retraining", "5xx share", "p99 latency"]
    by_row: dict[str, list[dict[str, Any]]] = {}
    for panel in board["panels"]:
        if panel["type"] == "row":
            row = by_row.setdefault(panel["title"], [])
        else:
            row.append(panel)
    exprs: list[str] = []
    for model, panels in by_row.items():
        assert [p["title"] for p in panels] == titles
        for panel in panels:
            for target in panel["targets"]:
                assert f'"{model}"' in target["expr"], (model, target["expr"])
                exprs.append(target["expr"])
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    # Every series the dashboard reads is one the platform produces: the monitor's gauges, the service's own
    # metrics, BentoML's HTTP metrics (the names the alert rules use), the pipeline's custom metric.
    registry = CollectorRegistry()
    gauges(registry)
    create_metrics(load_contract(ROOT, "fraud"), registry)
    produced = {sample.name for family in registry.collect() for sample in family.samples}
    produced |= {family.name for family in registry.collect()}
    produced |= {alert_rules.REQUESTS, alert_rules.DURATION_BUCKETS}
    read = {name for e in exprs for name in re.findall(r"([a-z_:]+)\{", e)} - {"rate", "sum", "max"}
    assert read <= produced, read - produced
    templates = _of_kind(objects, "WorkflowTemplate")
    assert templates and all(
        [m["name"] for m in t["spec"]["metrics"]["prometheus"]] == [LAST_SUCCESS_METRIC] for t in templates
    )
    assert all(LAST_SUCCESS_METRIC in e for e in exprs if "__name__" in e)
    # promtool parses every query (as a recording rule each).
    if PROMTOOL:
        rules = [{"record": f"loopform:dashboard:{i}", "expr": e} for i, e in enumerate(exprs)]
        path = tmp_path / "dashboard.yaml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        assert f"SUCCESS: {len(exprs)} rules found" in _promtool("check", "rules", str(path))


@pytest.mark.parametrize("shared_addons", [True, False])
def test_installing_kube_prometheus_stack(tmp_path: Path, shared_addons: bool) -> None:
    """install_prometheus_stack: the pinned chart, released under the name the selectors match; its CRDs from the
    chart where the stack installs shared add-ons, else listed as prerequisites; nothing left unresolved."""
    from components.monitoring import PROMETHEUS_STACK_CHART, PROMETHEUS_STACK_VERSION
    from loopform import prerequisites
    from loopform.references import chart_provides, unresolved

    document = _operator_document(install_prometheus_stack=True)
    document["config"][CONFIG_KEY]["cluster"]["shared_addons"] = shared_addons
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(document))
    spec = load_stack(path, ROOT)
    assert spec.monitoring.operator and not spec.monitoring.prometheus_operator
    manifests = render.stack_manifests(render.render_stack("dev", ROOT, path), spec)
    (chart,) = [c for _, c in manifests.charts if c["chart"] == PROMETHEUS_STACK_CHART]
    release = spec.monitoring.prometheus_release
    assert (chart["version"], chart["name"], chart["namespace"]) == (
        PROMETHEUS_STACK_VERSION,
        release,
        spec.cluster.namespaces.monitoring,
    )
    values = chart["values"]
    assert values["crds"] == {"enabled": shared_addons}
    by_release = {"matchLabels": {"release": release}}
    assert values["prometheus"]["prometheusSpec"]["ruleSelector"] == by_release
    assert values["alertmanager"]["alertmanagerSpec"]["alertmanagerConfigSelector"] == by_release
    listed = {p.name for p in prerequisites.prerequisites(spec) if p.kind == "crd"}
    operator_crds = {"servicemonitors.monitoring.coreos.com", "alertmanagerconfigs.monitoring.coreos.com"}
    provided = {ref.name for ref in chart_provides(chart)}
    assert operator_crds <= (provided if shared_addons else listed)
    assert not operator_crds & (listed if shared_addons else provided)
    assert unresolved(manifests, prerequisites.prerequisites(spec)) == []
    # Every rule, monitor and route object carries the label the chart's selectors match.
    for kind in ("PrometheusRule", "ServiceMonitor", "AlertmanagerConfig"):
        found = _of_kind(manifests.objects, kind)
        assert found and all(m["metadata"]["labels"]["release"] == release for m in found), kind
