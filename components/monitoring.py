"""Monitoring: a drift monitor CronJob per model, the Pushgateway it pushes to, the alerting rules, the
dashboard, and kube-prometheus-stack where the spec asks the platform to install it.

Each run of `loopform monitor` is a short Job that ends before Prometheus could scrape it, so it pushes its
gauges to the Pushgateway (grouped by model), which Prometheus scrapes with `honorLabels`. The rules
(`loopform.alert_rules`) fire on those gauges: drift above the model's gate, and a monitor that stopped
pushing. The ServiceMonitor and PrometheusRule need the Prometheus Operator's CRDs, so they are declared only
with monitoring.prometheus_operator on, like the charts' ServiceMonitors.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
from pulumi_kubernetes.helm.v4 import Chart, ChartArgs, RepositoryOptsArgs

from components import common, registry
from loopform.dashboard import dashboard
from loopform.identity import MONITOR_ACCOUNT
from loopform.spec import PlatformSpec, Resources

PUSHGATEWAY = "loopform-pushgateway"
PUSHGATEWAY_PORT = 9091
PUSHGATEWAY_UID = 65534  # `nobody`, the user the upstream image runs as
MONITOR_UID = common.IMAGE_UID  # the user images/pipeline/Dockerfile runs as
#: A scratch folder (emptyDir): the root filesystem is read-only.
SCRATCH = "/scratch"
#: `loopform monitor` exits 3 when it triggered retraining: a result, not a failure to retry.
TRIGGERED_EXIT_CODE = 3
PUSHGATEWAY_RESOURCES = Resources(cpu="50m", memory="64Mi")
MONITOR_RESOURCES = Resources(cpu="500m", memory="2Gi")


def pushgateway_url(namespace: str) -> str:
    return common.service_url(PUSHGATEWAY, namespace, PUSHGATEWAY_PORT)


def monitor_name(model: str) -> str:
    return f"{model}-drift-monitor"


@dataclass(frozen=True, kw_only=True)
class PushgatewayArgs:
    """Inputs of the Pushgateway."""

    namespace: str
    """spec.cluster.namespaces.monitoring."""
    image: str
    """spec.monitoring.pushgateway_image (pinned by the stack's digest lock)."""
    labels: dict[str, str] = field(default_factory=dict)
    prometheus_release: str | None = None
    """`release` label of its ServiceMonitor; None (no Prometheus Operator): scraped by annotations only."""


def pushgateway_manifests(args: PushgatewayArgs) -> list[dict[str, Any]]:
    """Deployment and Service of the Pushgateway, and its ServiceMonitor with the Prometheus Operator."""
    object_labels = common.labels("pushgateway", PUSHGATEWAY, args.labels)
    meta = common.metadata(PUSHGATEWAY, args.namespace, object_labels, common.workload_skips([args.image]))
    selector = common.selector("pushgateway", PUSHGATEWAY)
    container = {
        "name": "pushgateway",
        **common.image(args.image),
        "ports": [{"name": "http", "containerPort": PUSHGATEWAY_PORT}],
        "readinessProbe": common.http_probe("/-/ready", "http"),
        "livenessProbe": common.http_probe("/-/healthy", "http", period=20),
        "resources": common.resources(PUSHGATEWAY_RESOURCES),
        "securityContext": common.container_security(),
    }
    manifests: list[dict[str, Any]] = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": selector},
                "template": {
                    "metadata": {
                        "labels": object_labels,
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": str(PUSHGATEWAY_PORT),
                            "prometheus.io/path": "/metrics",
                        },
                    },
                    "spec": {
                        "automountServiceAccountToken": False,
                        "securityContext": common.pod_security(PUSHGATEWAY_UID),
                        "containers": [container],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {"selector": selector, "ports": [{"name": "http", "port": PUSHGATEWAY_PORT, "targetPort": "http"}]},
        },
    ]
    if args.prometheus_release is not None:
        # The pushed `model` and `job` labels are the series' own, not the Pushgateway's.
        manifests.append(
            common.service_monitor(
                PUSHGATEWAY, args.namespace, object_labels, selector, args.prometheus_release, honor_labels=True
            )
        )
    return manifests


@dataclass(frozen=True, kw_only=True)
class DriftMonitorArgs:
    """Inputs of one model's drift monitor; every value comes from the stack spec."""

    model: str
    environment: str
    """The stack the monitor loads (`stacks/Pulumi.<environment>.yaml` in the image)."""
    image: str
    """spec.orchestrator.pipeline_image: it has loopform, the models' code and the stack files."""
    namespace: str
    """spec.cluster.namespaces.monitoring."""
    schedule: str
    """monitoring.schedule."""
    pushgateway: str
    """URL the monitor pushes its gauges to."""
    tracking_uri: str
    """MLflow: the production version and its training data (the reference)."""
    labels: dict[str, str] = field(default_factory=dict)
    service_account: str = MONITOR_ACCOUNT
    """The monitors' shared ServiceAccount (`monitor_account_manifest`): the monitor workload's identity."""
    credentials_env_from: list[dict[str, Any]] = field(default_factory=list)
    """`envFrom` with static object-store keys, when that is the identity (the Secret is the Platform's)."""
    rule_group: dict[str, Any] | None = None
    """The model's alerting rules (`loopform.alert_rules.rule_group`); None without the Prometheus Operator."""
    prometheus_release: str = "kube-prometheus-stack"
    """`release` label the Prometheus Operator selects the PrometheusRule by."""


def monitor_account_manifest(namespace: str, labels: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
    """The ServiceAccount every model's monitor runs as: one account, so one IAM role trusts one subject.

    `annotations` carry the monitor role under IRSA (`identity.account_annotations(spec, "monitor")`).
    """
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": common.metadata(
            MONITOR_ACCOUNT, namespace, common.labels("drift-monitor", MONITOR_ACCOUNT, labels), annotations or None
        ),
        # The monitors never call the Kubernetes API: no token, no Role.
        "automountServiceAccountToken": False,
    }


def drift_monitor_manifests(args: DriftMonitorArgs) -> list[dict[str, Any]]:
    """CronJob of a model's drift monitor, and its PrometheusRule when there are rules."""
    name = monitor_name(args.model)
    object_labels = common.labels("drift-monitor", name, {**args.labels, "loopform.dev/model": args.model})
    container = {
        "name": "monitor",
        **common.image(args.image),
        "args": [
            "monitor",
            args.model,
            "--stack",
            args.environment,
            "--push-gateway",
            args.pushgateway,
            "--report-dir",
            f"{SCRATCH}/monitor",
        ],
        "env": [
            {"name": "MLFLOW_TRACKING_URI", "value": args.tracking_uri},
            {"name": "MLFLOW_DISABLE_TELEMETRY", "value": "true"},
            {"name": "HOME", "value": SCRATCH},
            {"name": "MPLCONFIGDIR", "value": f"{SCRATCH}/matplotlib"},
        ],
        # The payload log and the reference (MLflow artifacts) are on object storage.
        **common.env_from(args.credentials_env_from),
        # MLflow reads the monitor user's credentials (read-only) from ~/.mlflow/credentials: a file, not env.
        "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH}, registry.credentials_mount(SCRATCH)],
        "resources": common.resources(MONITOR_RESOURCES),
        "securityContext": common.container_security(),
    }
    cron_job = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": common.metadata(name, args.namespace, object_labels, common.workload_skips([args.image])),
        "spec": {
            "schedule": args.schedule,
            "timeZone": "Etc/UTC",
            # A run that outlasts the period is not doubled: the next one waits.
            "concurrencyPolicy": "Forbid",
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": object_labels},
                "spec": {
                    "backoffLimit": 1,
                    "podFailurePolicy": {
                        "rules": [
                            {
                                "action": "FailJob",
                                "onExitCodes": {
                                    "containerName": "monitor",
                                    "operator": "In",
                                    "values": [TRIGGERED_EXIT_CODE],
                                },
                            }
                        ]
                    },
                    "template": {
                        "metadata": {"labels": object_labels},
                        "spec": {
                            "serviceAccountName": args.service_account,
                            "automountServiceAccountToken": False,
                            "restartPolicy": "Never",
                            "securityContext": common.pod_security(MONITOR_UID),
                            "containers": [container],
                            "volumes": [
                                {"name": "scratch", "emptyDir": {}},
                                registry.credentials_volume(registry.MONITOR_USER),
                            ],
                        },
                    },
                },
            },
        },
    }
    manifests = [cron_job]
    if args.rule_group is not None:
        manifests.append(
            {
                "apiVersion": "monitoring.coreos.com/v1",
                "kind": "PrometheusRule",
                "metadata": common.metadata(
                    name, args.namespace, {**object_labels, "release": args.prometheus_release}
                ),
                "spec": {"groups": [args.rule_group]},
            }
        )
    return manifests


@functools.cache
def _classes() -> dict[str, Any]:
    """The typed resource classes of the kinds declared here (large modules: loaded on first use)."""
    return {
        "Deployment": k8s.apps.v1.Deployment,
        "Service": k8s.core.v1.Service,
        "CronJob": k8s.batch.v1.CronJob,
    }


def monitor_account(
    name: str, namespace: str, labels: dict[str, str], annotations: dict[str, str], opts: pulumi.ResourceOptions
) -> k8s.core.v1.ServiceAccount:
    """Declare the monitors' shared ServiceAccount (once per environment, before any DriftMonitor)."""
    manifest = monitor_account_manifest(namespace, labels, annotations)
    return k8s.core.v1.ServiceAccount(
        name,
        metadata=manifest["metadata"],
        automount_service_account_token=manifest["automountServiceAccountToken"],
        opts=opts,
    )


class Pushgateway(pulumi.ComponentResource):
    """Where the drift monitors push their gauges (one per environment, in the monitoring namespace)."""

    url: pulumi.Output[str]

    def __init__(self, name: str, args: PushgatewayArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loopform:monitoring:Pushgateway", name, None, opts)
        common.declare(self, name, pushgateway_manifests(args), _classes())
        self.url = pulumi.Output.from_input(pushgateway_url(args.namespace))
        self.register_outputs({"url": self.url})


class DriftMonitor(pulumi.ComponentResource):
    """A model's drift monitor: scheduled `loopform monitor`, and its alerting rules."""

    cron_job: pulumi.Output[str]

    def __init__(self, name: str, args: DriftMonitorArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loopform:monitoring:DriftMonitor", name, None, opts)
        common.declare(self, name, drift_monitor_manifests(args), _classes())
        self.cron_job = pulumi.Output.from_input(monitor_name(args.model))
        self.register_outputs({"cron_job": self.cron_job})


#: kube-prometheus-stack, pinned: Prometheus Operator, Prometheus, Alertmanager, Grafana, kube-state-metrics.
PROMETHEUS_STACK_CHART = "kube-prometheus-stack"
PROMETHEUS_STACK_VERSION = "77.5.0"
PROMETHEUS_COMMUNITY_REPO = "https://prometheus-community.github.io/helm-charts"
#: The label (and value) kube-prometheus-stack's Grafana sidecar loads dashboard ConfigMaps by.
DASHBOARD_LABEL = ("grafana_dashboard", "1")


def prometheus_stack_values(release: str, install_crds: bool) -> dict[str, Any]:
    """kube-prometheus-stack values: the Operator's CRDs only where the stack installs shared add-ons, and every
    selector on the `release` label the platform's ServiceMonitors, PrometheusRules, AlertmanagerConfig carry."""
    by_release = {"matchLabels": {"release": release}}
    return {
        "crds": {"enabled": install_crds},
        "prometheus": {
            "prometheusSpec": {
                "ruleSelector": by_release,
                "serviceMonitorSelector": by_release,
                # Rules and monitors live in the monitoring, platform and serving namespaces.
                "ruleNamespaceSelector": {},
                "serviceMonitorNamespaceSelector": {},
            }
        },
        "alertmanager": {
            "alertmanagerSpec": {"alertmanagerConfigSelector": by_release, "alertmanagerConfigNamespaceSelector": {}}
        },
        "grafana": {
            "sidecar": {"dashboards": {"enabled": True, "label": DASHBOARD_LABEL[0], "labelValue": DASHBOARD_LABEL[1]}}
        },
    }


@dataclass(frozen=True, kw_only=True)
class PrometheusStackArgs:
    """Inputs of the kube-prometheus-stack release (monitoring.install_prometheus_stack)."""

    namespace: str
    """spec.cluster.namespaces.monitoring."""
    release: str
    """monitoring.prometheus_release: the Helm release name, which its selectors match in `release` labels."""
    install_crds: bool = True
    """Install the Prometheus Operator's CRDs (cluster.shared_addons: one stack per cluster does)."""


class PrometheusStack(pulumi.ComponentResource):
    """kube-prometheus-stack from its pinned chart, when the spec asks the platform to install monitoring."""

    def __init__(self, name: str, args: PrometheusStackArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loopform:monitoring:PrometheusStack", name, None, opts)
        self.chart = Chart(
            f"{name}-chart",
            ChartArgs(
                chart=PROMETHEUS_STACK_CHART,
                version=PROMETHEUS_STACK_VERSION,
                name=args.release,
                namespace=args.namespace,
                repository_opts=RepositoryOptsArgs(repo=PROMETHEUS_COMMUNITY_REPO),
                values=prometheus_stack_values(args.release, args.install_crds),
            ),
            opts=common.child(self),
        )
        self.register_outputs({})


def dashboard_config_map(spec: PlatformSpec, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    """The platform's dashboard (`loopform.dashboard`) as the ConfigMap Grafana's sidecar loads."""
    name = f"loopform-{spec.environment}-dashboard"
    object_labels = common.labels("dashboard", name, {**labels, DASHBOARD_LABEL[0]: DASHBOARD_LABEL[1]})
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": common.metadata(name, namespace, object_labels),
        "data": {f"loopform-{spec.environment}.json": json.dumps(dashboard(spec), indent=1, sort_keys=True)},
    }
