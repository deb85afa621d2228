"""The retraining route (components/retraining.py) under Pulumi mocks, per stack.

The Workflow each Sensor creates is validated with hera's Argo Workflows models (extra="forbid") and its
spec against the WorkflowTemplate CRD schema in shared/upstream (a WorkflowTemplate's spec is a
WorkflowSpec). The Sensor's data filters are evaluated here on Alertmanager payloads and must agree with
`loopform.alerts.retraining_requests`, the decision the local receiver makes. Not validated against a schema:
the EventBus (hera has no model of it; the chart's CRDs leave `spec` unstructured), the AlertmanagerConfig (no
Prometheus Operator CRD there), the chart values (argo-events is not among the mirrored upstream charts: see
tests/test_prerequisites.py), and the Sensor's Go name template (no Go runtime: its Python mirror
`workflow_name` is checked instead). The Sensor and the EventSource are validated with hera's Argo Events
models (extra="forbid"), which mirror the Go structs: `_go_form` rewrites the few types that marshal to JSON
differently from their struct (Int64OrString, Amount, the raw K8SResource, the inlined WebhookContext).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hera.events import models as events
from hera.workflows import models as argo

from components.orchestrator import SUBMITTER_SERVICE_ACCOUNT, submitter_rules
from components.retraining import (
    DEPENDENCY,
    EVENT_BUS,
    EVENT_SOURCE,
    GROUP_BY_EVERY_LABEL,
    WEBHOOK_ENDPOINT,
    WEBHOOK_EVENT,
    WEBHOOK_PORT,
    RetrainingRoute,
    RetrainingRouteArgs,
    event_source_service_url,
    workflow_name,
    workflow_name_template,
)
from components.workflow import mutex_name, template_name
from loopform.alerts import DRIFT_ALERTNAME, retraining_requests
from loopform.render import RenderedResource, render_components
from loopform.spec import PlatformSpec, load_stack, stack_file

from .conftest import ROOT, STACKS

UPSTREAM = ROOT.parent / "shared" / "upstream"
CRDS = UPSTREAM / "crds"
#: What `templateReferencing: Strict` lets a submitted Workflow set on top of its WorkflowTemplate (Argo
#: Workflows' workflow-restrictions docs; v3.7.11+ errors a Workflow that sets anything else).
STRICT_SUBMISSION_FIELDS = {
    "arguments",
    "entrypoint",
    "shutdown",
    "suspend",
    "activeDeadlineSeconds",
    "priority",
    "ttlStrategy",
    "podGC",
    "volumeClaimGC",
    "archiveLogs",
    "workflowMetadata",
    "workflowTemplateRef",
    "metrics",
    "artifactGC",
}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def _spec(stack: str) -> PlatformSpec:
    return load_stack(stack_file(stack))


def _render(
    spec: PlatformSpec, prometheus_release: str | None = "kube-prometheus-stack", chart_keyring: str | None = None
) -> dict[str, RenderedResource]:
    namespaces = spec.cluster.namespaces
    args = RetrainingRouteArgs(
        environment=spec.environment,
        namespace=namespaces.monitoring,
        pipelines_namespace=namespaces.pipelines,
        models=sorted(spec.models),
        submitter_service_account=SUBMITTER_SERVICE_ACCOUNT,
        labels={"loopform.dev/environment": spec.environment},
        prometheus_release=prometheus_release,
        install_crds=spec.cluster.shared_addons,
        chart_keyring=chart_keyring,
    )

    def run() -> None:
        RetrainingRoute("retraining", args)

    return {r.name: r for r in render_components(run)}


def _workflow(sensor: dict[str, Any]) -> dict[str, Any]:
    (trigger,) = sensor["spec"]["triggers"]
    return trigger["template"]["k8s"]["source"]["resource"]


# --- a reading of Argo Events data filters (gjson paths, regex strings), to run them on payloads ---


def _lookup(document: Any, path: str) -> Any:
    for part in path.split("."):
        if part == "#":
            return len(document) if isinstance(document, list) else None
        if isinstance(document, list):
            document = document[int(part)] if part.isdigit() and int(part) < len(document) else None
        elif isinstance(document, dict):
            document = document.get(part)
        else:
            return None
    return document


def _passes(filters: list[dict[str, Any]], payload: dict[str, Any]) -> bool:
    event = {"body": payload}
    for data_filter in filters:
        actual = _lookup(event, data_filter["path"])
        if actual is None:
            return False
        if data_filter["type"] == "number":
            assert data_filter.get("comparator", "=") == "="
            matched = any(float(actual) == float(value) for value in data_filter["value"])
        else:
            assert data_filter["type"] == "string" and data_filter.get("comparator", "=") == "="
            matched = any(re.search(value, str(actual)) for value in data_filter["value"])
        if not matched:
            return False
    return True


def _alert(model: str, status: str, environment: str, alertname: str = DRIFT_ALERTNAME) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": alertname, "model": model, "environment": environment, "severity": "warning"},
        "annotations": {"summary": "drift"},
        "startsAt": "2026-11-27T15:00:00.123Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus/graph",
        "fingerprint": "0f1e2d3c4b5a6978",
    }


def _payload(*alerts: dict[str, Any]) -> dict[str, Any]:
    firing = any(a["status"] == "firing" for a in alerts)
    return {
        "version": "4",
        "groupKey": "{}:{}",
        "truncatedAlerts": 0,
        "status": "firing" if firing else "resolved",
        "receiver": "loopform-retraining",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager",
        "alerts": list(alerts),
    }


# --- per model: filter, trigger, mutex, name ---------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_each_model_has_a_sensor_that_submits_its_template_under_its_mutex(stack: str) -> None:
    spec = _spec(stack)
    resources = _render(spec)
    for model in spec.models:
        sensor = resources[f"retraining-{model}-sensor"].manifest()
        assert sensor["kind"] == "Sensor" and sensor["metadata"]["namespace"] == spec.cluster.namespaces.monitoring
        assert sensor["spec"]["eventBusName"] == EVENT_BUS
        assert sensor["spec"]["template"]["serviceAccountName"] == SUBMITTER_SERVICE_ACCOUNT
        (dependency,) = sensor["spec"]["dependencies"]
        assert (dependency["eventSourceName"], dependency["eventName"]) == (EVENT_SOURCE, WEBHOOK_EVENT)
        paths = {f["path"]: f["value"] for f in dependency["filters"]["data"]}
        assert paths["body.alerts.#"] == ["1"]
        assert paths["body.alerts.0.labels.alertname"] == [f"^{DRIFT_ALERTNAME}$"]
        assert paths["body.alerts.0.labels.model"] == [f"^{model}$"]
        assert paths["body.alerts.0.status"] == ["^firing$"]  # the alert's own status, not the group's

        (trigger,) = sensor["spec"]["triggers"]
        k8s = trigger["template"]["k8s"]
        assert k8s["operation"] == "create"
        (parameter,) = k8s["parameters"]
        assert parameter == {
            "src": {"dependencyName": DEPENDENCY, "dataTemplate": workflow_name_template(model)},
            "dest": "metadata.name",
        }
        workflow = _workflow(sensor)
        assert "generateName" not in workflow["metadata"]
        assert workflow["metadata"]["namespace"] == spec.cluster.namespaces.pipelines
        assert workflow["spec"]["workflowTemplateRef"] == {"name": template_name(model)}
        # Under templateReferencing: Strict a submitted Workflow may set only these fields (else it errors).
        assert set(workflow["spec"]) <= STRICT_SUBMISSION_FIELDS
        # The submitter may create Workflows and read exactly this template.
        rules = submitter_rules([template_name(m) for m in spec.models])
        assert any("workflows" in r["resources"] and "create" in r["verbs"] for r in rules)
        assert any(template_name(model) in r.get("resourceNames", ()) for r in rules)
    assert len({mutex_name(m) for m in spec.models}) == len(spec.models)


@pytest.mark.parametrize("stack", STACKS)
def test_each_models_template_holds_its_mutex(stack: str, rendered) -> None:
    """The mutex is the template's: every run of a model (schedule, drift alert, by hand) waits for the last."""
    spec = _spec(stack)
    templates = {
        r.manifest()["metadata"]["name"]: r.manifest() for r in rendered(stack) if r.kind == "WorkflowTemplate"
    }
    for model in spec.models:
        assert templates[template_name(model)]["spec"]["synchronization"] == {"mutexes": [{"name": mutex_name(model)}]}


def test_the_name_template_renders_the_incident_key() -> None:
    template = workflow_name_template("fraud")
    assert template.startswith("retrain-fraud-")
    assert "(index .Input.body.alerts 0).fingerprint" in template
    assert "(index .Input.body.alerts 0).startsAt | sha256sum | trunc 10" in template


def test_workflow_names_dedupe_an_incident_and_not_a_new_episode() -> None:
    first = workflow_name("fraud", "0f1e2d3c4b5a6978", "2026-11-27T15:00:00.123Z")
    assert first == workflow_name("fraud", "0f1e2d3c4b5a6978", "2026-11-27T15:00:00.123Z")  # a re-send collides
    assert first != workflow_name("fraud", "0f1e2d3c4b5a6978", "2026-11-28T09:00:00Z")  # a new episode runs
    assert first != workflow_name("delivery", "0f1e2d3c4b5a6978", "2026-11-27T15:00:00.123Z")
    assert DNS_SUBDOMAIN.match(first) and len(first) <= 253


# --- the submitted Workflow validates -----------------------------------------------------------


@pytest.mark.skipif(not UPSTREAM.exists(), reason="shared/upstream (pinned CRDs) is not beside the repo")
@pytest.mark.parametrize("stack", STACKS)
def test_the_submitted_workflow_validates(stack: str) -> None:
    spec = _spec(stack)
    schema = json.loads((CRDS / "argoproj.io_v1alpha1_WorkflowTemplate.json").read_text())
    resources = _render(spec)
    for model in spec.models:
        workflow = _workflow(resources[f"retraining-{model}-sensor"].manifest())
        named = {**workflow, "metadata": {**workflow["metadata"], "name": workflow_name(model, "ab" * 8, "t")}}
        argo.Workflow.model_validate(named, extra="forbid")
        jsonschema.validate(workflow["spec"], schema["properties"]["spec"])


def _base64(text: str) -> str:
    """The `[]byte` fields (Amount, K8SResource) as hera's models take them."""
    return base64.b64encode(text.encode()).decode()


def _go_form(manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest` (an Argo Events object as JSON) in the shape of hera's Go-struct models."""
    go = json.loads(json.dumps({"metadata": manifest["metadata"], "spec": manifest["spec"]}))
    for trigger in go["spec"].get("triggers", ()):
        if backoff := trigger.get("retryStrategy"):
            backoff["duration"] = {"strVal": backoff["duration"]}
            backoff["factor"] = {"value": _base64(str(backoff["factor"]))}
        if source := trigger["template"].get("k8s", {}).get("source"):
            source["resource"] = {"value": _base64(json.dumps(source["resource"]))}
    for name, hook in go["spec"].get("webhook", {}).items():
        go["spec"]["webhook"][name] = {"webhookContext": hook}
    return go


@pytest.mark.parametrize("stack", STACKS)
def test_the_argo_events_objects_validate(stack: str) -> None:
    spec = _spec(stack)
    resources = _render(spec)
    source = resources["retraining-event-source"].manifest()
    assert (source["apiVersion"], source["kind"]) == ("argoproj.io/v1alpha1", "EventSource")
    events.EventSource.model_validate(_go_form(source), extra="forbid")
    for model in spec.models:
        sensor = resources[f"retraining-{model}-sensor"].manifest()
        assert (sensor["apiVersion"], sensor["kind"]) == ("argoproj.io/v1alpha1", "Sensor")
        events.Sensor.model_validate(_go_form(sensor), extra="forbid")


def test_hera_catches_a_misspelt_sensor_field() -> None:
    sensor = _render(_spec("prod"))["retraining-fraud-sensor"].manifest()
    sensor["spec"]["dependencies"][0]["filters"]["data"][0]["comparater"] = "="
    with pytest.raises(ValueError, match="comparater"):
        events.Sensor.model_validate(_go_form(sensor), extra="forbid")


def test_hera_catches_a_misspelt_mutex() -> None:
    spec = {"workflowTemplateRef": {"name": "fraud-pipeline"}, "synchronization": {"mutexes": [{"nam": "x"}]}}
    with pytest.raises(ValueError):
        argo.WorkflowSpec.model_validate(spec, extra="forbid")


# --- the filters make the same decision as loopform.alerts ---------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_filters_agree_with_the_shared_decision(stack: str) -> None:
    spec = _spec(stack)
    resources = _render(spec)
    env = spec.environment
    models = sorted(spec.models)
    payloads = [
        _payload(_alert(models[0], "firing", env)),
        _payload(_alert(models[0], "resolved", env)),
        _payload(_alert(models[-1], "firing", env)),
        _payload(_alert(models[0], "firing", env, alertname="LoopformMonitorStale")),
        _payload(_alert(models[0], "firing", "elsewhere")),
    ]
    for payload in payloads:
        wanted = {r.model for r in retraining_requests(payload, ()) if r.labels["environment"] == env}
        for model in models:
            filters = resources[f"retraining-{model}-sensor"].manifest()["spec"]["dependencies"][0]["filters"]["data"]
            assert _passes(filters, payload) == (model in wanted), (model, payload["alerts"])
    # A model name that merely contains another (regex filters are anchored).
    filters = resources[f"retraining-{models[0]}-sensor"].manifest()["spec"]["dependencies"][0]["filters"]["data"]
    assert not _passes(filters, _payload(_alert(f"{models[0]}2", "firing", env)))
    # Two alerts in one notification (a route without group_by ['...']) start nothing.
    assert not _passes(filters, _payload(_alert(models[0], "firing", env), _alert(models[0], "resolved", env)))


# --- EventSource, EventBus, Alertmanager route, chart ------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_alertmanager_routes_the_drift_alert_to_the_event_source(stack: str) -> None:
    spec = _spec(stack)
    monitoring = spec.cluster.namespaces.monitoring
    resources = _render(spec)
    source = resources["retraining-event-source"].manifest()
    webhook = source["spec"]["webhook"][WEBHOOK_EVENT]
    assert webhook == {"endpoint": WEBHOOK_ENDPOINT, "method": "POST", "port": str(WEBHOOK_PORT)}
    assert source["spec"]["service"]["ports"] == [{"port": WEBHOOK_PORT, "targetPort": WEBHOOK_PORT}]
    assert resources["retraining-event-bus"].manifest()["metadata"]["name"] == EVENT_BUS

    config = resources["retraining-alertmanager-config"].manifest()
    assert config["apiVersion"] == "monitoring.coreos.com/v1alpha1" and config["metadata"]["namespace"] == monitoring
    route = config["spec"]["route"]
    assert route["groupBy"] == GROUP_BY_EVERY_LABEL == ["..."]
    assert {"name": "alertname", "value": DRIFT_ALERTNAME, "matchType": "="} in route["matchers"]
    assert {"name": "environment", "value": spec.environment, "matchType": "="} in route["matchers"]
    (receiver,) = config["spec"]["receivers"]
    assert receiver["name"] == route["receiver"]
    (hook,) = receiver["webhookConfigs"]
    url = event_source_service_url(monitoring)
    assert (
        hook["url"] == url == f"http://{EVENT_SOURCE}-eventsource-svc.{monitoring}.svc:{WEBHOOK_PORT}{WEBHOOK_ENDPOINT}"
    )


@pytest.mark.parametrize("stack", STACKS)
def test_chart_and_crds_follow_shared_addons(stack: str) -> None:
    spec = _spec(stack)
    resources = _render(spec, prometheus_release=None)
    chart = resources["retraining-argo-events"].manifest()
    assert chart["chart"] == "argo-events" and chart["version"]
    assert chart["values"]["crds"] == {"install": spec.cluster.shared_addons, "keep": False}
    assert chart["values"]["controller"]["rbac"]["namespaced"] is True
    assert "retraining-alertmanager-config" not in resources  # no Prometheus Operator: no route object
    assert "verify" not in resources["retraining-argo-events"].inputs  # no keyring named: installed unverified
    bus = resources["retraining-event-bus"]
    assert resources["retraining-argo-events"].urn in bus.dependencies  # the EventBus waits for the CRDs
    for model in spec.models:
        assert bus.urn in resources[f"retraining-{model}-sensor"].dependencies


def test_the_sensor_and_the_local_receiver_dedupe_the_same_incidents(tmp_path: Path) -> None:
    """Re-sends, a second model and a new episode: the Workflow names collide exactly where the local receiver's
    incident keys (loopform.alerts) do, so the cluster and `loopform up` start the same retrainings."""
    from loopform.alerts import IncidentStore

    def alert(model: str, starts_at: str, fingerprint: str = "0f1e2d3c4b5a6978") -> dict[str, Any]:
        return {**_alert(model, "firing", "prod"), "startsAt": starts_at, "fingerprint": fingerprint}

    notifications = [
        _payload(alert("fraud", "2026-11-27T15:00:00.123Z")),
        _payload(alert("fraud", "2026-11-27T15:00:00.123Z")),  # re-sent every repeat_interval
        _payload(alert("fraud", "2026-11-27T15:00:00.123Z")),
        _payload(alert("delivery", "2026-11-27T15:00:00.123Z", "aa11bb22cc33dd44")),
        _payload(alert("fraud", "2026-11-28T09:30:00Z")),  # resolved, then a new episode
        _payload({**alert("fraud", "2026-11-28T09:30:00Z"), "status": "resolved"}),
    ]
    names = set()
    for payload in notifications:
        names |= {workflow_name(r.model, r.fingerprint, r.starts_at) for r in retraining_requests(payload, ())}
    store = IncidentStore(tmp_path / "incidents.json")
    started = [r for payload in notifications for r in store.claim(payload)]
    assert len(started) == len(names) == 3


def test_the_chart_is_verified_with_argo_helms_keyring() -> None:
    """argo-events comes from argo-helm, as argo-workflows does: with orchestrator.chart_keyring Helm checks it too."""
    chart = _render(_spec("prod"), chart_keyring="deploy/keys/argo-helm.gpg")["retraining-argo-events"]
    assert chart.inputs["verify"] is True
    assert chart.inputs["keyring"].path == "deploy/keys/argo-helm.gpg"
