"""Retraining route: Alertmanager's drift alert -> Argo Events -> one Workflow per drift incident.

Argo Events comes from its upstream chart in the monitoring namespace (`controller.rbac.namespaced`: it
watches only that namespace); its CRDs only where the stack has cluster.shared_addons, like Argo Workflows.
Around it: the default EventBus (JetStream) the Sensors read from, one webhook EventSource per platform (the
POST endpoint Alertmanager notifies), one Sensor per model, and, with the Prometheus Operator, the
AlertmanagerConfig that routes the drift alert to the EventSource's Service.

The Sensor applies the decision `loopform.alerts.retraining_requests` makes locally, with Argo Events data
filters: the route groups by every label (`group_by: ['...']`), so each notification carries exactly one
alert and `alerts.0` IS the alert; the filters pass it only when its alertname is the drift alert, its
model label is the Sensor's model and its OWN status is `firing`.

One incident, one run: the trigger creates a Workflow whose `metadata.name` is derived from the alert's
fingerprint (its label set) and startsAt (its episode), through a trigger parameter, not `generateName`.
Alertmanager re-sends a firing alert every repeat_interval and retries failed deliveries; a re-sent
notification renders the same name, and the create fails with AlreadyExists instead of starting a second
run. A new episode after resolution has a new startsAt, so a new name and a new run. (The collision holds
while the Workflow object exists: its TTL must outlive repeat_interval.) The model's WorkflowTemplate holds a
per-model `synchronization.mutexes` entry (`components.workflow.mutex_name`), so at most one retraining of a
model runs at a time, across incidents and schedules.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi_kubernetes.helm.v4 import Chart, ChartArgs, RepositoryOptsArgs

from components import common
from components.orchestrator import ARGO_API_GROUP, ARGO_HELM_REPO, chart_verification
from components.workflow import template_name
from loopform.alerts import DRIFT_ALERTNAME, MODEL_LABEL, PAYLOAD_VERSION

ARGO_EVENTS_CHART = "argo-events"
ARGO_EVENTS_CHART_VERSION = "2.4.19"
ARGO_API_VERSION = f"{ARGO_API_GROUP}/v1alpha1"
#: The Sensors and the EventSource use the namespace's EventBus named `default` when they name none.
EVENT_BUS = "default"
#: A NATS server version the chart's controller config lists for JetStream EventBuses.
JETSTREAM_VERSION = "2.10.10"
EVENT_SOURCE = "alertmanager"
WEBHOOK_EVENT = "drift"
WEBHOOK_PORT = 12000
WEBHOOK_ENDPOINT = "/alerts"
DEPENDENCY = "drift-alert"
ALERTMANAGER_RECEIVER = "loopform-retraining"
#: Alertmanager's "group by every label": one alert per group, so one alert per notification.
GROUP_BY_EVERY_LABEL = ["..."]
#: How long a firing alert waits before Alertmanager re-sends it; re-sends collide by Workflow name.
REPEAT_INTERVAL = "4h"
#: Characters of sha256(startsAt) in the Workflow name (startsAt itself has ':' and '.', not valid in names).
STARTS_AT_DIGEST = 10
SENSOR_UID = 9731


def argo_events_values(install_crds: bool) -> dict[str, Any]:
    """argo-events chart values: a namespaced controller; CRDs only where the stack installs shared add-ons."""
    return {
        # keep false, as for argo-workflows: a kept CRD survives destroy and the next `up` fails with AlreadyExists.
        "crds": {"install": install_crds, "keep": False},
        # Roles instead of ClusterRoles: the controller sees only its release namespace (monitoring).
        "controller": {"rbac": {"namespaced": True}},
    }


def event_source_service_url(namespace: str) -> str:
    """The URL Alertmanager posts to: the Service the controller creates for the EventSource (`<name>-eventsource-svc`)."""
    host = f"{EVENT_SOURCE}-eventsource-svc.{namespace}.svc"
    return f"http://{host}:{WEBHOOK_PORT}{WEBHOOK_ENDPOINT}"


def workflow_name(model: str, fingerprint: str, starts_at: str) -> str:
    """The name the trigger gives the Workflow of one incident (what `workflow_name_template` renders)."""
    digest = hashlib.sha256(starts_at.encode()).hexdigest()[:STARTS_AT_DIGEST]
    return f"retrain-{model}-{fingerprint}-{digest}"


def workflow_name_template(model: str) -> str:
    """`workflow_name` as the Sensor's Go template (with Sprig) over the notification's single alert."""
    alert = "(index .Input.body.alerts 0)"
    return (
        f"retrain-{model}-{{{{ {alert}.fingerprint }}}}-"
        f"{{{{ {alert}.startsAt | sha256sum | trunc {STARTS_AT_DIGEST} }}}}"
    )


def retraining_workflow(model: str, namespace: str, labels: Mapping[str, str]) -> dict[str, Any]:
    """The Workflow a drift incident starts: the model's WorkflowTemplate, which holds the model's mutex.

    `metadata.name` is a placeholder; the Sensor's trigger parameter replaces it with `workflow_name`. The spec
    names the template and nothing else: under `templateReferencing: Strict` a submitted Workflow may set only
    a short allow-list of fields (not `synchronization`), and anything else errors the run.
    """
    return {
        "apiVersion": ARGO_API_VERSION,
        "kind": "Workflow",
        "metadata": {
            "name": f"retrain-{model}",
            "namespace": namespace,
            "labels": {**labels, "loopform.dev/model": model, "loopform.dev/trigger": "drift"},
        },
        "spec": {"workflowTemplateRef": {"name": template_name(model)}},
    }


def _exactly(value: str) -> str:
    """Argo Events string data filters are regular expressions: match the whole value, literally."""
    return f"^{re.escape(value)}$"


def drift_filters(model: str, environment: str) -> list[dict[str, Any]]:
    """Data filters (all must hold) that pass only a firing drift alert of `model` in `environment`."""
    alert = "body.alerts.0"
    strings = {
        "body.version": PAYLOAD_VERSION,
        f"{alert}.labels.alertname": DRIFT_ALERTNAME,
        f"{alert}.labels.{MODEL_LABEL}": model,
        f"{alert}.labels.environment": environment,
        # The alert's own status: a group's notification status is `firing` while any of its alerts fires.
        f"{alert}.status": "firing",
    }
    return [
        # One alert per notification (the route's group_by ['...']): alerts.0 is the only alert.
        {"path": "body.alerts.#", "type": "number", "comparator": "=", "value": ["1"]},
        *({"path": path, "type": "string", "value": [_exactly(value)]} for path, value in strings.items()),
    ]


def sensor(
    model: str,
    environment: str,
    namespace: str,
    pipelines_namespace: str,
    service_account: str,
    labels: Mapping[str, str],
) -> dict[str, Any]:
    """The Sensor that turns `model`'s firing drift alert into one Workflow, run as the submitter account."""
    workflow = retraining_workflow(model, pipelines_namespace, labels)
    return {
        "apiVersion": ARGO_API_VERSION,
        "kind": "Sensor",
        "metadata": common.metadata(f"retrain-{model}", namespace, {**labels, "loopform.dev/model": model}),
        "spec": {
            "eventBusName": EVENT_BUS,
            "template": {
                "serviceAccountName": service_account,
                "securityContext": common.pod_security(SENSOR_UID),
                "container": {"securityContext": common.container_security()},
            },
            "dependencies": [
                {
                    "name": DEPENDENCY,
                    "eventSourceName": EVENT_SOURCE,
                    "eventName": WEBHOOK_EVENT,
                    "filters": {"data": drift_filters(model, environment)},
                }
            ],
            "triggers": [
                {
                    "template": {
                        "name": f"retrain-{model}",
                        "k8s": {
                            "operation": "create",
                            "source": {"resource": workflow},
                            "parameters": [
                                {
                                    "src": {
                                        "dependencyName": DEPENDENCY,
                                        "dataTemplate": workflow_name_template(model),
                                    },
                                    "dest": "metadata.name",
                                }
                            ],
                        },
                    },
                    # Redelivered from the EventBus if the Sensor dies mid-trigger; the fixed name makes it harmless.
                    "atLeastOnce": True,
                    "retryStrategy": {"steps": 3, "duration": "10s", "factor": 2},
                }
            ],
        },
    }


def event_bus(namespace: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": ARGO_API_VERSION,
        "kind": "EventBus",
        "metadata": common.metadata(EVENT_BUS, namespace, dict(labels)),
        "spec": {"jetstream": {"version": JETSTREAM_VERSION}},
    }


def event_source(namespace: str, labels: Mapping[str, str]) -> dict[str, Any]:
    """The webhook Alertmanager posts to: POST `WEBHOOK_ENDPOINT` on `WEBHOOK_PORT`, behind a Service."""
    return {
        "apiVersion": ARGO_API_VERSION,
        "kind": "EventSource",
        "metadata": common.metadata(EVENT_SOURCE, namespace, dict(labels)),
        "spec": {
            "eventBusName": EVENT_BUS,
            "service": {"ports": [{"port": WEBHOOK_PORT, "targetPort": WEBHOOK_PORT}]},
            "template": {
                "securityContext": common.pod_security(SENSOR_UID),
                "container": {"securityContext": common.container_security()},
            },
            "webhook": {
                WEBHOOK_EVENT: {"endpoint": WEBHOOK_ENDPOINT, "method": "POST", "port": str(WEBHOOK_PORT)},
            },
        },
    }


def alertmanager_config(
    environment: str, namespace: str, labels: Mapping[str, str], prometheus_release: str
) -> dict[str, Any]:
    """Route this environment's drift alert to the EventSource, one alert per notification.

    The Prometheus Operator scopes an AlertmanagerConfig's route to alerts whose `namespace` label is the
    config's namespace (its default OnNamespace strategy): the drift series come from the Pushgateway in
    this same monitoring namespace. Resolved notifications are not sent: they start nothing.
    """
    return {
        "apiVersion": "monitoring.coreos.com/v1alpha1",
        "kind": "AlertmanagerConfig",
        "metadata": common.metadata(ALERTMANAGER_RECEIVER, namespace, {**labels, "release": prometheus_release}),
        "spec": {
            "route": {
                "receiver": ALERTMANAGER_RECEIVER,
                "groupBy": GROUP_BY_EVERY_LABEL,
                "repeatInterval": REPEAT_INTERVAL,
                "matchers": [
                    {"name": "alertname", "value": DRIFT_ALERTNAME, "matchType": "="},
                    {"name": "environment", "value": environment, "matchType": "="},
                ],
            },
            "receivers": [
                {
                    "name": ALERTMANAGER_RECEIVER,
                    "webhookConfigs": [{"url": event_source_service_url(namespace), "sendResolved": False}],
                }
            ],
        },
    }


@dataclass(frozen=True, kw_only=True)
class RetrainingRouteArgs:
    """Inputs of the RetrainingRoute; every value comes from the stack spec or the Orchestrator."""

    environment: str
    """Environment name; the drift alert's `environment` label."""
    namespace: str
    """The monitoring namespace: Argo Events, its objects and the submitter account live there."""
    pipelines_namespace: str
    """Where the Workflows run (the WorkflowTemplates' namespace)."""
    models: Sequence[str]
    """One Sensor each."""
    submitter_service_account: str
    """The Orchestrator's submitter: may create Workflows from the models' WorkflowTemplates and nothing else."""
    labels: Mapping[str, str] = field(default_factory=dict)
    prometheus_release: str | None = None
    """`release` label of the AlertmanagerConfig; None (no Prometheus Operator) declares none."""
    install_crds: bool = True
    """Install the Argo Events CRDs (cluster.shared_addons: one stack per cluster does)."""
    chart_keyring: str | None = None
    """Keyring with argo-helm's signing key (orchestrator.chart_keyring): Helm verifies the chart; None: unverified."""


class RetrainingRoute(pulumi.ComponentResource):
    """Argo Events, its EventBus and webhook EventSource, a Sensor per model, the Alertmanager route."""

    webhook_url: pulumi.Output[str]
    """What Alertmanager posts drift alerts to."""
    sensors: pulumi.Output[dict[str, str]]
    """Model name -> Sensor name."""

    def __init__(self, name: str, args: RetrainingRouteArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loopform:retraining:RetrainingRoute", name, None, opts)
        namespace = args.namespace
        labels = common.labels("retraining-route", name, dict(args.labels))

        chart = Chart(
            f"{name}-argo-events",
            ChartArgs(
                chart=ARGO_EVENTS_CHART,
                version=ARGO_EVENTS_CHART_VERSION,
                namespace=namespace,
                repository_opts=RepositoryOptsArgs(repo=ARGO_HELM_REPO),
                values=argo_events_values(args.install_crds),
                **chart_verification(args.chart_keyring),
            ),
            opts=common.child(self),
        )
        bus = common.custom_resource(
            f"{name}-event-bus", event_bus(namespace, labels), common.child(self, depends_on=[chart])
        )
        source = common.custom_resource(
            f"{name}-event-source", event_source(namespace, labels), common.child(self, depends_on=[bus])
        )
        sensors: dict[str, pulumi.Output[str]] = {}
        for model in sorted(args.models):
            manifest = sensor(
                model, args.environment, namespace, args.pipelines_namespace, args.submitter_service_account, labels
            )
            created = common.custom_resource(f"{name}-{model}-sensor", manifest, common.child(self, depends_on=[bus]))
            sensors[model] = created.metadata.apply(common.metadata_name)
        if args.prometheus_release is not None:
            common.custom_resource(
                f"{name}-alertmanager-config",
                alertmanager_config(args.environment, namespace, labels, args.prometheus_release),
                common.child(self, depends_on=[source]),
            )

        self.webhook_url = pulumi.Output.from_input(event_source_service_url(namespace))
        self.sensors = pulumi.Output.all(**sensors) if sensors else pulumi.Output.from_input({})
        self.register_outputs({"webhook_url": self.webhook_url, "sensors": self.sensors})
