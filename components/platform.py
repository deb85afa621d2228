"""Platform: the whole environment, composed from the stack spec.

Namespaces first (with Pod Security labels), then each component in its namespace.
Environments differ only in the spec they pass in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_kubernetes as k8s

from components import common
from components.feature_store import FeatureStore, FeatureStoreArgs, feature_files, redis_connection_env
from components.gitops import GitOps, GitOpsArgs
from components.gpu_pool import GpuNodePool, GpuNodePoolArgs, NvidiaDevicePlugin, NvidiaDevicePluginArgs
from components.model_service import ModelService, ModelServiceArgs
from components.orchestrator import Orchestrator, OrchestratorArgs
from components.registry import ModelRegistry, ModelRegistryArgs
from loopform.features import OFFLINE_URI_ENV, cluster_config
from loopform.spec import PlatformSpec


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
            payload_uri=spec.monitoring.payload_uri,
        )
        for model, model_spec in sorted(spec.models.items())
        if model_spec.release is not None
    ]


@dataclass
class PlatformArgs:
    """Inputs of the platform."""

    spec: PlatformSpec
    """The validated stack spec."""
    root: Path
    """Repository root, where model folders (features.py) are read from."""
    registry_db_password: pulumi.Input[str] | None = None
    """Secret password of the in-cluster MLflow database (config loopform:registryDbPassword)."""


class Platform(pulumi.ComponentResource):
    """Every component of one environment."""

    tracking_uri: pulumi.Output[str]
    feature_server_url: pulumi.Output[str]
    namespaces: dict[str, str]
    workflow_templates: pulumi.Output[dict[str, str]]
    """WorkflowTemplate name per model, for the retraining trigger."""
    workflow_submitter: pulumi.Output[str]
    """ServiceAccount (in the monitoring namespace) allowed to submit those templates."""

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
                        "pod-security.kubernetes.io/enforce": "baseline",
                        "pod-security.kubernetes.io/warn": "restricted",
                    },
                },
                opts=common.child(self),
            )

        in_platform = common.child(self, depends_on=[created["platform"]])
        registry = ModelRegistry(
            f"{name}-registry",
            ModelRegistryArgs(
                spec=spec.registry,
                namespace=cluster.namespaces.platform,
                labels=labels,
                storage_class=cluster.storage_class,
                db_password=args.registry_db_password,
            ),
            in_platform,
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
            ),
            in_platform,
        )

        pools = []
        for pool_name, pool in sorted(spec.gpu.pools.items()):
            pools.append(
                GpuNodePool(
                    f"{name}-gpu-{pool_name}",
                    GpuNodePoolArgs(pool_name=pool_name, pool=pool, labels=labels),
                    common.child(self),
                )
            )
        if spec.gpu.pools:
            NvidiaDevicePlugin(
                f"{name}-nvidia",
                NvidiaDevicePluginArgs(
                    gpu=spec.gpu, namespace=spec.gpu.namespace, prometheus_release=spec.monitoring.prometheus_release
                ),
                common.child(self),
            )

        step_env = {
            "MLFLOW_TRACKING_URI": registry.tracking_uri,
            "LOOPFORM_FEATURE_SERVER_URL": features.feature_server_url,
            OFFLINE_URI_ENV: spec.feature_store.offline_store.data_uri,
        }
        secrets = [s for s in (spec.registry.artifacts.credentials_secret, spec.feature_store.credentials_secret) if s]
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
                step_env_from_secrets=sorted(set(secrets)),
                prometheus_release=spec.monitoring.prometheus_release,
            ),
            common.child(self, depends_on=[created["pipelines"], created["monitoring"], *pools]),
        )

        if spec.gitops.enabled:
            GitOps(
                f"{name}-gitops",
                GitOpsArgs(
                    spec=spec.gitops,
                    environment=spec.environment,
                    namespaces=cluster.namespaces,
                    labels=labels,
                    argocd_version=spec.gitops.argocd_version,
                ),
                common.child(self, depends_on=[created["gitops"], created["serving"]]),
            )

        # With GitOps, Argo CD applies the services from the rendered folder; else Pulumi does.
        if not spec.gitops.enabled:
            in_serving = common.child(self, depends_on=[created["serving"], registry, features])
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
            }
        )
