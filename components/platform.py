"""Platform: the whole environment, composed from the stack spec.

Namespaces first (with Pod Security labels), then each component in its namespace.
Environments differ only in the spec they pass in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from components import common
from components.feature_store import (
    FeatureStore,
    FeatureStoreArgs,
    feature_files,
    redis_connection_env,
    registry_secret_name,
    registry_url_env,
)
from components.gitops import GitOps, GitOpsArgs, public_keys
from components.gpu_pool import GpuNodePool, GpuNodePoolArgs, NvidiaDevicePlugin, NvidiaDevicePluginArgs
from components.model_service import ModelService, ModelServiceArgs, tokens_secret
from components.monitoring import (
    DriftMonitor,
    DriftMonitorArgs,
    PrometheusStack,
    PrometheusStackArgs,
    Pushgateway,
    PushgatewayArgs,
    dashboard_config_map,
    monitor_account,
    pushgateway_url,
)
from components.network import NetworkPolicies, NetworkPoliciesArgs
from components.orchestrator import SUBMITTER_SERVICE_ACCOUNT, Orchestrator, OrchestratorArgs
from components.registry import (
    MONITOR_USER,
    PIPELINE_USER,
    PROMOTION_USER,
    SERVING_USER,
    ModelRegistry,
    ModelRegistryArgs,
)
from components.retraining import RetrainingRoute, RetrainingRouteArgs
from components.secrets import SharedSecret, SharedSecretArgs, derived_password
from components.serving_limits import serving_limit_manifests
from loopform import identity
from loopform.alert_rules import feature_views, rule_group
from loopform.features import OFFLINE_URI_ENV, REGISTRY_URL_ENV, cluster_config
from loopform.prerequisites import DB_PASSWORD_CONFIG, REDIS_PASSWORD_CONFIG
from loopform.spec import ExternalDatabase, ExternalRedis, PlatformSpec


def common_labels(spec: PlatformSpec) -> dict[str, str]:
    return {"loopform.dev/environment": spec.environment, **spec.cluster.labels}


def model_services(spec: PlatformSpec) -> list[ModelServiceArgs]:
    """The service of every released model, wired to this environment's registry and feature server."""
    platform_ns = spec.cluster.namespaces.platform
    registry = common.service_url(f"{spec.environment}-registry", platform_ns, spec.registry.port)
    return [
        ModelServiceArgs(
            model=model,
            spec=model_spec,
            namespace=spec.cluster.namespaces.serving,
            labels=common_labels(spec),
            tracking_uri=registry,
            feast_config=cluster_config(spec.feature_store),
            redis_env=redis_connection_env(spec.feature_store, f"{spec.environment}-features", platform_ns),
            registry_env=registry_url_env(f"{spec.environment}-features"),
            payload_uri=spec.monitoring.payload_uri,
            service_account=identity.SERVING_ACCOUNT,
            credentials_env_from=identity.credentials_env_from(spec),
            prometheus_release=spec.monitoring.prometheus_release if spec.monitoring.operator else None,
        )
        for model, model_spec in sorted(spec.models.items())
        if model_spec.release is not None
    ]


def pod_security_level(role: str, spec: PlatformSpec) -> str:
    """The Pod Security Standard a namespace enforces: `restricted` wherever every pod is ours or a chart's
    we configure to meet it. The monitoring namespace runs Argo Events' controller and its JetStream
    EventBus, whose pod settings are the chart's and the controller's: `baseline`; and with
    kube-prometheus-stack, node-exporter, which reads the host (hostNetwork, hostPID, hostPath): `privileged`."""
    if role != "monitoring":
        return "restricted"
    return "privileged" if spec.monitoring.install_prometheus_stack else "baseline"


def network_policies_args(spec: PlatformSpec, labels: dict[str, str]) -> NetworkPoliciesArgs:
    """What the NetworkPolicies need from the spec: namespaces, ports, and where Prometheus runs."""
    monitoring = spec.monitoring
    external = [
        backend.port
        for backend in (spec.registry.backend, spec.feature_store.online_store)
        if isinstance(backend, ExternalDatabase | ExternalRedis)
    ]
    ports = {model.serving.port for model in spec.models.values()}
    return NetworkPoliciesArgs(
        namespaces=spec.cluster.namespaces.model_dump(),
        registry_port=spec.registry.port,
        feature_server_port=spec.feature_store.server.port,
        serving_ports=sorted(ports),
        prometheus_namespace=(monitoring.prometheus_namespace or spec.cluster.namespaces.monitoring)
        if monitoring.operator
        else None,
        external_ports=sorted(set(external)),
        labels=labels,
    )


def secret_config(config: pulumi.Config, spec: PlatformSpec) -> dict[str, Any]:
    """The secrets PlatformArgs takes, from the stack's secret config: those the spec needs, each required.

    A missing one stops the program with Pulumi's own message naming the key to set.
    """
    secrets: dict[str, Any] = {"registry_db_password": config.require_secret(DB_PASSWORD_CONFIG)}
    online = spec.feature_store.online_store
    if isinstance(online, ExternalRedis) and online.auth:
        secrets["redis_password"] = config.require_secret(REDIS_PASSWORD_CONFIG)
    if identity.static_keys_secret(spec):
        secrets["object_store_keys"] = (
            config.require_secret(identity.ACCESS_KEY_CONFIG),
            config.require_secret(identity.SECRET_KEY_CONFIG),
        )
    return secrets


@dataclass
class PlatformArgs:
    """Inputs of the platform."""

    spec: PlatformSpec
    """The validated stack spec."""
    root: Path
    """Repository root, where model folders (their contracts) are read from."""
    registry_db_password: pulumi.Input[str] | None = None
    """Secret password of the MLflow database user (config loopform:registryDbPassword)."""
    redis_password: pulumi.Input[str] | None = None
    """AUTH password of an external Redis (config loopform:redisPassword)."""
    object_store_keys: tuple[pulumi.Input[str], pulumi.Input[str]] | None = None
    """Access key id and secret key, where cluster.identity is static-keys
    (config loopform:objectStoreAccessKeyId, loopform:objectStoreSecretAccessKey)."""


class Platform(pulumi.ComponentResource):
    """Every component of one environment."""

    tracking_uri: pulumi.Output[str]
    feature_server_url: pulumi.Output[str]
    namespaces: dict[str, str]
    workflow_templates: pulumi.Output[dict[str, str]]
    """WorkflowTemplate name per model, for the retraining trigger."""
    workflow_submitter: pulumi.Output[str]
    """ServiceAccount (in the monitoring namespace) allowed to submit those templates."""
    argocd_application: pulumi.Output[str | None]
    """The Argo CD Application that syncs this environment's model services (None without GitOps)."""

    def __init__(self, name: str, args: PlatformArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loopform:platform:Platform", name, None, opts)
        spec = args.spec
        cluster = spec.cluster
        labels = common_labels(spec)

        self.namespaces = cluster.namespaces.model_dump()
        created: dict[str, k8s.core.v1.Namespace] = {}
        for role, namespace in sorted(self.namespaces.items()):
            created[role] = k8s.core.v1.Namespace(
                f"{name}-ns-{role}",
                metadata={
                    "name": namespace,
                    "labels": {
                        **common.labels("namespace", namespace, labels),
                        "pod-security.kubernetes.io/enforce": pod_security_level(role, spec),
                        "pod-security.kubernetes.io/warn": "restricted",
                    },
                },
                # Deleting a namespace deletes everything in it: the one holding the databases is protected.
                opts=common.stateful(self, cluster.protect_data and role == "platform"),
            )

        for manifest in serving_limit_manifests(spec, labels):
            kind = manifest["kind"]
            resource = k8s.core.v1.ResourceQuota if kind == "ResourceQuota" else k8s.core.v1.LimitRange
            resource(
                f"{name}-serving-{kind.lower()}",
                metadata=manifest["metadata"],
                spec=manifest["spec"],
                opts=common.child(self, depends_on=[created["serving"]]),
            )
        NetworkPolicies(
            f"{name}-network",
            network_policies_args(spec, labels),
            common.child(self, depends_on=list(created.values())),
        )

        credentials = self._credentials(name, args, labels, list(created.values()))
        serving_account = common.service_account(
            self,
            f"{name}-serving-sa",
            identity.SERVING_ACCOUNT,
            cluster.namespaces.serving,
            common.labels("model-service", identity.SERVING_ACCOUNT, labels),
            identity.account_annotations(spec, "serving"),
        )
        env_from = identity.credentials_env_from(spec)
        prometheus_release = spec.monitoring.prometheus_release if spec.monitoring.operator else None

        registry = ModelRegistry(
            f"{name}-registry",
            ModelRegistryArgs(
                spec=spec.registry,
                environment=spec.environment,
                namespace=cluster.namespaces.platform,
                labels=labels,
                storage_class=cluster.storage_class,
                db_password=args.registry_db_password,
                account_annotations=identity.account_annotations(spec, "registry"),
                credentials_env_from=env_from,
                protect_data=cluster.protect_data,
                prometheus_release=prometheus_release,
                # Each workload acts as its own MLflow user; promotion runs outside the cluster, from the
                # credentials an operator reads in the platform namespace (docs/hardening.md).
                credential_namespaces={
                    PIPELINE_USER: [cluster.namespaces.pipelines],
                    SERVING_USER: [cluster.namespaces.serving],
                    MONITOR_USER: [cluster.namespaces.monitoring],
                    PROMOTION_USER: [cluster.namespaces.platform],
                },
            ),
            common.child(
                self,
                depends_on=[
                    created["platform"],
                    created["pipelines"],
                    created["serving"],
                    created["monitoring"],
                    *credentials,
                ],
            ),
        )
        features = FeatureStore(
            f"{name}-features",
            FeatureStoreArgs(
                spec=spec.feature_store,
                image=spec.feature_store.image or spec.orchestrator.pipeline_image,
                feature_files=feature_files(args.root, {m: model.path for m, model in spec.models.items()}),
                namespace=cluster.namespaces.platform,
                labels=labels,
                storage_class=cluster.storage_class,
                account_annotations=identity.account_annotations(spec, "feature_store"),
                credentials_env_from=env_from,
                # An in-cluster Redis gets a password of its own, derived like the Feast registry's.
                redis_password=args.redis_password
                if isinstance(spec.feature_store.online_store, ExternalRedis)
                else derived_password(args.registry_db_password, f"redis:{spec.environment}"),
                client_namespaces=[cluster.namespaces.serving],
                protect_data=cluster.protect_data,
                registry_database=registry.database,
                registry_password=derived_password(args.registry_db_password, f"feast-registry:{spec.environment}"),
                registry_client_namespaces=[cluster.namespaces.pipelines, cluster.namespaces.serving],
                prometheus_release=prometheus_release,
            ),
            # Its SQL registry lives on the registry's PostgreSQL.
            common.child(
                self, depends_on=[created["platform"], created["serving"], created["pipelines"], *credentials, registry]
            ),
        )

        pools = []
        for pool_name, pool in sorted(spec.gpu.pools.items()):
            pools.append(
                GpuNodePool(
                    f"{name}-gpu-{pool_name}",
                    GpuNodePoolArgs(pool_name=pool_name, pool=pool, environment=spec.environment, labels=labels),
                    common.child(self),
                )
            )
        if spec.gpu.pools and cluster.shared_addons:  # once per cluster: two plugins would fight over the GPUs
            NvidiaDevicePlugin(
                f"{name}-nvidia",
                NvidiaDevicePluginArgs(
                    gpu=spec.gpu, namespace=spec.gpu.namespace, prometheus_release=prometheus_release
                ),
                common.child(self),
            )

        step_env = {
            "MLFLOW_TRACKING_URI": registry.tracking_uri,
            OFFLINE_URI_ENV: spec.feature_store.offline_store.data_uri,
        }
        orchestrator = Orchestrator(
            f"{name}-orchestrator",
            OrchestratorArgs(
                spec=spec.orchestrator,
                environment=spec.environment,
                namespaces=cluster.namespaces,
                models=spec.models,
                gpu_pools=spec.gpu.pools,
                labels=labels,
                step_env=step_env,
                step_secret_env={REGISTRY_URL_ENV: (registry_secret_name(f"{name}-features"), "url")},
                static_keys_secret=identity.static_keys_secret(spec),
                runner_annotations=identity.account_annotations(spec, "pipelines"),
                prometheus_release=prometheus_release,
                install_crds=cluster.shared_addons,
                argo_images={role: spec.pinned(image) for role, image in spec.orchestrator.argo_images.items()},
            ),
            # Pipelines train against the registry and the feature store: both must be up first.
            common.child(
                self,
                depends_on=[created["pipelines"], created["monitoring"], *credentials, *pools, registry, features],
            ),
        )

        # One Pushgateway per environment; each model's monitor pushes to it.
        monitoring_ns = cluster.namespaces.monitoring
        pushgateway = Pushgateway(
            f"{name}-pushgateway",
            PushgatewayArgs(
                namespace=monitoring_ns,
                image=spec.monitoring.pushgateway_image,
                labels=labels,
                prometheus_release=prometheus_release,
            ),
            common.child(self, depends_on=[created["monitoring"]]),
        )
        monitor_sa = monitor_account(
            f"{name}-monitor-sa",
            monitoring_ns,
            labels,
            identity.account_annotations(spec, "monitor"),
            common.child(self, depends_on=[created["monitoring"]]),
        )
        views = feature_views(spec, args.root)
        for model in sorted(spec.models):
            DriftMonitor(
                f"{name}-{model}-monitor",
                DriftMonitorArgs(
                    model=model,
                    environment=spec.environment,
                    image=spec.orchestrator.pipeline_image,
                    namespace=monitoring_ns,
                    schedule=spec.monitoring.schedule,
                    pushgateway=pushgateway_url(monitoring_ns),
                    tracking_uri=common.service_url(
                        f"{spec.environment}-registry", cluster.namespaces.platform, spec.registry.port
                    ),
                    labels=labels,
                    credentials_env_from=env_from,
                    rule_group=rule_group(spec, model, views[model]) if prometheus_release is not None else None,
                    prometheus_release=spec.monitoring.prometheus_release,
                ),
                common.child(self, depends_on=[created["monitoring"], *credentials, monitor_sa, pushgateway, registry]),
            )

        if prometheus_release is not None:
            self._alerting(name, spec, labels, prometheus_release, [created["monitoring"], orchestrator])

        # For every model, released or not: a promotion's Deployment reaches the cluster through Argo CD
        # before any `pulumi up` runs, so its Secret must already be there.
        tokens = [
            tokens_secret(
                f"{name}-{model}-tokens",
                spec.environment,
                model,
                model_spec.serving.callers,
                args.registry_db_password,
                cluster.namespaces.serving,
                labels,
                common.child(self, depends_on=[created["serving"]]),
            )
            for model, model_spec in sorted(spec.models.items())
        ]
        self.argocd_application: pulumi.Output[str | None] = pulumi.Output.from_input(None)
        if spec.gitops.enabled:
            # The services Argo CD syncs load models from the registry and features from the store.
            gitops = GitOps(
                f"{name}-gitops",
                GitOpsArgs(
                    spec=spec.gitops,
                    environment=spec.environment,
                    namespaces=cluster.namespaces,
                    labels=labels,
                    argocd_image=spec.pinned(spec.gitops.argocd_image),
                    redis_password=derived_password(args.registry_db_password, f"argocd-redis:{spec.environment}"),
                    install_crds=cluster.shared_addons,
                    gpg_keys=public_keys(spec.gitops, args.root),
                    releases={
                        model: model_spec.release.record()
                        for model, model_spec in sorted(spec.models.items())
                        if model_spec.release is not None
                    },
                ),
                common.child(
                    self,
                    depends_on=[
                        created["gitops"],
                        created["serving"],
                        serving_account,
                        *credentials,
                        *tokens,
                        registry,
                        features,
                    ],
                ),
            )
            self.argocd_application = gitops.application_name

        # With GitOps, Argo CD applies the services from the rendered folder; else Pulumi does. The callers' tokens
        # (above) are Pulumi's either way: the rendered Deployment names the Secret; its value never reaches git.
        if not spec.gitops.enabled:
            in_serving = common.child(
                self, depends_on=[created["serving"], serving_account, *credentials, *tokens, registry, features]
            )
            for service in model_services(spec):
                ModelService(f"{name}-{service.model}", service, in_serving)

        self.tracking_uri = registry.tracking_uri
        self.feature_server_url = features.feature_server_url
        self.workflow_templates = orchestrator.workflow_templates
        self.workflow_submitter = orchestrator.submitter_service_account
        self.register_outputs(
            {
                "tracking_uri": self.tracking_uri,
                "feature_server_url": self.feature_server_url,
                "workflow_templates": self.workflow_templates,
                "workflow_submitter": self.workflow_submitter,
                "argocd_application": self.argocd_application,
            }
        )

    def _alerting(
        self,
        name: str,
        spec: PlatformSpec,
        labels: dict[str, str],
        prometheus_release: str,
        depends_on: list[pulumi.Resource],
    ) -> None:
        """With a Prometheus Operator: kube-prometheus-stack where the spec installs it, the dashboard, and the
        retraining route (Alertmanager -> Argo Events -> one Workflow per drift incident)."""
        cluster = spec.cluster
        monitoring_ns = cluster.namespaces.monitoring
        stack: list[pulumi.Resource] = []
        if spec.monitoring.install_prometheus_stack:
            stack.append(
                PrometheusStack(
                    f"{name}-prometheus-stack",
                    PrometheusStackArgs(
                        namespace=monitoring_ns, release=prometheus_release, install_crds=cluster.shared_addons
                    ),
                    common.child(self, depends_on=depends_on),
                )
            )
        dashboard = dashboard_config_map(spec, monitoring_ns, labels)
        k8s.core.v1.ConfigMap(
            f"{name}-dashboard",
            metadata=dashboard["metadata"],
            data=dashboard["data"],
            opts=common.child(self, depends_on=depends_on),
        )
        RetrainingRoute(
            f"{name}-retraining",
            RetrainingRouteArgs(
                environment=spec.environment,
                namespace=monitoring_ns,
                pipelines_namespace=cluster.namespaces.pipelines,
                models=sorted(spec.models),
                submitter_service_account=SUBMITTER_SERVICE_ACCOUNT,
                labels=labels,
                prometheus_release=prometheus_release,
                install_crds=cluster.shared_addons,
                # Argo Events comes from argo-helm, as Argo Workflows does: the same signing key.
                chart_keyring=spec.orchestrator.chart_keyring,
            ),
            common.child(self, depends_on=[*depends_on, *stack]),
        )

    def _credentials(
        self, name: str, args: PlatformArgs, labels: dict[str, str], namespaces: list[pulumi.Resource]
    ) -> list[pulumi.Resource]:
        """The static-keys Secret in every namespace whose workloads read object storage (none otherwise)."""
        secret = identity.static_keys_secret(args.spec)
        if secret is None:
            return []
        if args.object_store_keys is None:
            raise ValueError(
                "cluster.identity is static-keys: pulumi config set --secret loopform:"
                f"{identity.ACCESS_KEY_CONFIG} <id> and loopform:{identity.SECRET_KEY_CONFIG} <key>"
            )
        access_key, secret_key = args.object_store_keys
        return [
            SharedSecret(
                f"{name}-object-store",
                SharedSecretArgs(
                    secret_name=secret,
                    namespaces=identity.static_keys_namespaces(args.spec),
                    string_data={identity.ACCESS_KEY: access_key, identity.SECRET_KEY: secret_key},
                    labels=common.labels("object-store-credentials", secret, labels),
                ),
                common.child(self, depends_on=namespaces),
            )
        ]
