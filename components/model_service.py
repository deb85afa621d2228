"""ModelService: the BentoML service of a released model version.

Every model runs the serving image (images/serving, `loopform serve`) the release record names; the version and
its files' digest are environment variables, so a promotion is a rolling update of the same image.

The manifests are built by one pure function, `manifests`, so they can take either road:
with GitOps enabled, `loopform render` writes them to `<gitops.path>/<environment>/` and
Argo CD syncs them (Pulumi declares none, so no object has two owners); without GitOps, the
`ModelService` component declares them directly. Either way the Deployment carries the signed
release record as an annotation, so what runs says why it was allowed to, and the service
loads exactly the version and files the record names (LOOPFORM_ARTIFACTS_DIGEST).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from components import common, registry, secrets
from loopform import record
from loopform.identity import SERVING_ACCOUNT
from loopform.payloads import DEFAULT_SPILL_MAX_BYTES, ENV_SPILL_DIR, ENV_SPILL_MAX_BYTES
from loopform.spec import ModelSpec

COMPONENT = "model-service"
SERVING_UID = common.IMAGE_UID  # the user images/serving/Dockerfile runs as
ANNOTATION_PREFIX = "loopform.dev/"
SPILL_MOUNT = "/var/spool/loopform-payloads"
#: Room for the payload log's bounded spill plus the file being written.
SPILL_SIZE_LIMIT = f"{DEFAULT_SPILL_MAX_BYTES * 3 // 2 // 2**20}Mi"
#: The callers' bearer tokens (a JSON object caller -> token), mounted from the Secret `tokens_secret_name(model)`;
#: the service reads the file LOOPFORM_API_TOKENS_FILE names (loopform/serving).
TOKENS_KEY = "tokens.json"
TOKENS_DIR = "/var/run/secrets/loopform/api"
TOKENS_ENV = "LOOPFORM_API_TOKENS_FILE"
#: The serving image's home (images/serving: `useradd --create-home loopform`): MLflow reads ~/.mlflow/credentials.
HOME = "/home/loopform"


def tokens_secret_name(model: str) -> str:
    """The Secret with `model`'s callers' tokens, in the serving namespace."""
    return f"{service_name(model)}-tokens"


def caller_tokens(
    root_secret: pulumi.Input[str], environment: str, model: str, callers: Sequence[str]
) -> pulumi.Output[str]:
    """tokens.json: one token per caller, derived from the stack's root secret (stable, rotates with it, and never
    written anywhere but the Secret: the GitOps manifests name the Secret only). The environment is part of the
    derivation, so a dev token never opens prod even where both stacks were given the same root secret."""
    tokens = [secrets.derived_password(root_secret, f"api-token/{environment}/{model}/{caller}") for caller in callers]
    return pulumi.Output.secret(
        pulumi.Output.all(*tokens).apply(
            lambda values: json.dumps(dict(zip(callers, values, strict=True)), sort_keys=True)
        )
    )


def tokens_secret(
    name: str,
    environment: str,
    model: str,
    callers: Sequence[str],
    root_secret: pulumi.Input[str],
    namespace: str,
    labels: dict[str, str],
    opts: pulumi.ResourceOptions,
) -> k8s.core.v1.Secret:
    """The tokens Secret, declared by Pulumi on both roads (with GitOps, Argo CD syncs only the Deployment that
    references it by name, so no token reaches git)."""
    secret_name = tokens_secret_name(model)
    return k8s.core.v1.Secret(
        name,
        metadata=common.metadata(secret_name, namespace, common.labels("api-tokens", secret_name, labels)),
        type="Opaque",
        string_data={TOKENS_KEY: caller_tokens(root_secret, environment, model, callers)},
        opts=opts,
    )


def service_name(model: str) -> str:
    return f"{model}-service"


def release_annotations(spec: ModelSpec) -> dict[str, str]:
    """The signed release record (what the policy pack verifies and judges), and its version for people."""
    release = spec.release
    if release is None:
        return {}
    return {
        f"{ANNOTATION_PREFIX}model-version": str(release.version),
        f"{ANNOTATION_PREFIX}release": json.dumps(release.record(), sort_keys=True, separators=(",", ":")),
    }


def pod_annotations(spec: ModelSpec) -> dict[str, str]:
    """What the pods carry: which version, the record's signature (a new release rolls the pods)."""
    release = spec.release
    if release is None:
        return {}
    return {
        f"{ANNOTATION_PREFIX}model-version": str(release.version),
        f"{ANNOTATION_PREFIX}release-signature": release.signature,
    }


@dataclass
class ModelServiceArgs:
    """Inputs of one model's service."""

    model: str
    """Model name (the key under `models` in the spec)."""
    spec: ModelSpec
    """The model's spec; its `release` says which version and image to run."""
    namespace: str = "loopform-serving"
    labels: dict[str, str] = field(default_factory=dict)
    tracking_uri: str = ""
    """MLflow tracking URI the service loads the model version from."""
    feast_config: str = ""
    """The platform's feature_store.yaml: the service reads the online store through the feature service."""
    redis_env: dict[str, Any] = field(default_factory=dict)
    """The REDIS_CONNECTION_STRING variable that feature_store.yaml reads (a value or a secretKeyRef)."""
    registry_env: dict[str, Any] = field(default_factory=dict)
    """The FEAST_REGISTRY_URL variable that feature_store.yaml reads (a secretKeyRef)."""
    payload_uri: str = ""
    """Payload log root (partitioned Parquet)."""
    service_account: str = SERVING_ACCOUNT
    """ServiceAccount the service runs as (created by the Platform, with its IAM role where IRSA is used)."""
    credentials_env_from: list[dict[str, Any]] = field(default_factory=list)
    """`envFrom` with static object-store keys, when that is the identity (the Secret is the Platform's)."""
    prometheus_release: str | None = None
    """`release` label of its ServiceMonitor (BentoML's `/metrics`); None (no Prometheus Operator): none."""


def manifests(args: ModelServiceArgs) -> list[dict[str, Any]]:
    """Deployment, Service, HorizontalPodAutoscaler and PodDisruptionBudget of a released model, and the
    ServiceMonitor of BentoML's `/metrics` with the Prometheus Operator."""
    release = args.spec.release
    if release is None:
        return []
    serving = args.spec.serving
    name = service_name(args.model)
    object_labels = common.labels(COMPONENT, name, {**args.labels, f"{ANNOTATION_PREFIX}model": args.model})
    meta = common.metadata(name, args.namespace, object_labels, release_annotations(args.spec))
    selector = common.selector(COMPONENT, name)
    env = [
        *({"name": name, "value": value} for name, value in record.release_env(release.record()).items()),
        {"name": "LOOPFORM_TRACKING_URI", "value": args.tracking_uri},
        {"name": "LOOPFORM_PAYLOAD_URI", "value": args.payload_uri},
        {"name": "BENTOML_DO_NOT_TRACK", "value": "true"},
        # The payload log spills here while the lake is down (bounded), and ships it when the lake is back.
        {"name": ENV_SPILL_DIR, "value": SPILL_MOUNT},
        {"name": ENV_SPILL_MAX_BYTES, "value": str(DEFAULT_SPILL_MAX_BYTES)},
        {"name": "MLFLOW_DISABLE_TELEMETRY", "value": "true"},
        # Callers authenticate with a bearer token from this file; MLflow reads as the serving user from ~/.mlflow.
        {"name": TOKENS_ENV, "value": f"{TOKENS_DIR}/{TOKENS_KEY}"},
        {"name": "HOME", "value": HOME},
    ]
    if args.feast_config:
        feast_env = [{"name": "LOOPFORM_FEAST_CONFIG", "value": args.feast_config}, args.redis_env, args.registry_env]
        env += [variable for variable in feast_env if variable]
    container = {
        "name": "bento",
        **common.image(release.image),
        # The image's entrypoint is `loopform serve`: it serves the model LOOPFORM_MODEL_URI names, on this port.
        "args": ["--port", str(serving.port)],
        "env": env,
        # MLflow artifacts, the Feast registry and the payload log are on object storage.
        **common.env_from(args.credentials_env_from),
        "ports": [{"name": "http", "containerPort": serving.port}],
        # Start-up loads and checks the release before the server starts, then once more in the worker: liveness
        # counts only once it is up, so a slow registry delays the pod instead of restarting it.
        "startupProbe": {**common.http_probe("/livez", "http", period=5), "failureThreshold": 60},
        "readinessProbe": common.http_probe("/readyz", "http", period=5),
        "livenessProbe": common.http_probe("/livez", "http", period=20, initial_delay=0),
        # Let endpoints drop the pod before it stops taking requests; BentoML then drains.
        "lifecycle": {"preStop": {"sleep": {"seconds": 10}}},
        "resources": common.resources(serving.resources),
        "securityContext": common.container_security(read_only_root=False),
        "volumeMounts": [
            {"name": "payload-spill", "mountPath": SPILL_MOUNT},
            {"name": "api-tokens", "mountPath": TOKENS_DIR, "readOnly": True},
            registry.credentials_mount(HOME),
        ],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": common.metadata(
            name,
            args.namespace,
            object_labels,
            {
                **release_annotations(args.spec),
                **common.workload_skips([release.image], *((common.FEAST_ENV_EXCEPTION,) if args.feast_config else ())),
            },
        ),
        "spec": {
            "replicas": serving.min_replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": object_labels,
                    "annotations": {
                        **pod_annotations(args.spec),
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(serving.port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": args.service_account,
                    "terminationGracePeriodSeconds": 40,
                    "automountServiceAccountToken": False,
                    "securityContext": common.pod_security(SERVING_UID),
                    "containers": [container],
                    # Outlives a container restart (an OOM kill), so rows spilled before it still ship.
                    "volumes": [
                        {"name": "payload-spill", "emptyDir": {"sizeLimit": SPILL_SIZE_LIMIT}},
                        {
                            "name": "api-tokens",
                            "secret": {
                                "secretName": tokens_secret_name(args.model),
                                "items": [{"key": TOKENS_KEY, "path": TOKENS_KEY}],
                                "defaultMode": 0o440,
                            },
                        },
                        registry.credentials_volume(registry.SERVING_USER),
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"selector": selector, "ports": [{"name": "http", "port": serving.port, "targetPort": "http"}]},
    }
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": serving.min_replicas,
            "maxReplicas": serving.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": serving.target_cpu_utilization},
                    },
                }
            ],
        },
    }
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta,
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }
    manifests = [deployment, service, autoscaler, budget]
    if args.prometheus_release is not None:
        manifests.append(common.service_monitor(name, args.namespace, object_labels, selector, args.prometheus_release))
    return manifests


@functools.cache
def _classes() -> dict[str, Any]:
    """The typed resource classes of the kinds declared here (large modules: loaded on first use)."""
    return {
        "Deployment": k8s.apps.v1.Deployment,
        "Service": k8s.core.v1.Service,
        "HorizontalPodAutoscaler": k8s.autoscaling.v2.HorizontalPodAutoscaler,
        "PodDisruptionBudget": k8s.policy.v1.PodDisruptionBudget,
    }


class ModelService(pulumi.ComponentResource):
    """A released model's service, declared directly (the road without GitOps)."""

    url: pulumi.Output[str]

    def __init__(self, name: str, args: ModelServiceArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loopform:serving:ModelService", name, None, opts)
        common.declare(self, name, manifests(args), _classes())
        port = args.spec.serving.port
        self.url = pulumi.Output.from_input(common.service_url(service_name(args.model), args.namespace, port))
        self.register_outputs({"url": self.url})
