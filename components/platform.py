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
from components.feature_store import FeatureStore, FeatureStoreArgs, feature_files
from components.registry import ModelRegistry, ModelRegistryArgs
from loopform.spec import PlatformSpec


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

    def __init__(self, name: str, args: PlatformArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loopform:platform:Platform", name, None, opts)
        spec = args.spec
        cluster = spec.cluster
        common_labels = {"loopform.dev/environment": spec.environment, **cluster.labels}

        self.namespaces = cluster.namespaces.model_dump()
        created: dict[str, k8s.core.v1.Namespace] = {}
        for role, namespace in sorted(self.namespaces.items()):
            created[role] = k8s.core.v1.Namespace(
                f"{name}-ns-{role}",
                metadata={
                    "name": namespace,
                    "labels": {
                        **common.labels("namespace", namespace, common_labels),
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
                labels=common_labels,
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
                labels=common_labels,
                storage_class=cluster.storage_class,
            ),
            in_platform,
        )

        self.tracking_uri = registry.tracking_uri
        self.feature_server_url = features.feature_server_url
        self.register_outputs({"tracking_uri": self.tracking_uri, "feature_server_url": self.feature_server_url})
