"""The stack spec: every key of `loopform:platform`, typed, documented and defaulted.

The Pulumi program reads it from stack config; the CLI reads it from the same stack file.
Environments differ only in the data they put here, never in code branches. This module
imports only light packages (pydantic, yaml, croniter) so `pulumi preview` starts fast.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from loopform.image_ref import DIGEST, lock_key_problem, pinned
from loopform.repo_paths import RepoPath

CONFIG_KEY = "loopform:platform"

_QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h))+$")
_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def _quantity(value: str) -> str:
    if not _QUANTITY.match(value):
        raise ValueError(
            f"{value!r} is not a Kubernetes quantity: use a number with an optional suffix "
            "Ki, Mi, Gi, Ti (binary), k, M, G, T (decimal) or m (milli), e.g. 8Gi, 500Mi, 250m"
        )
    return value


def _dns_label(value: str) -> str:
    if not _DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a DNS-1123 label: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value


def _cron(value: str) -> str:
    from croniter import croniter

    if value in _CRON_MACROS:
        return value
    if len(value.split()) != 5 or not croniter.is_valid(value):
        raise ValueError(
            f"{value!r} is not a cron schedule: use five fields 'minute hour day-of-month "
            "month day-of-week' (e.g. '*/30 * * * *') or one of " + ", ".join(sorted(_CRON_MACROS))
        )
    return value


def _workdir(value: str) -> str:
    parts = Path(value).parts
    if not parts or value.strip() in (".", "/") or ".." in parts or Path(value) == Path(value).anchor:
        raise ValueError(
            f"{value!r} cannot be the local workdir: `loopform up` empties it on every run, so it must be "
            "a folder of its own, e.g. .loopform/local (no '..', not '.' or '/')"
        )
    return value


def _duration(value: str) -> str:
    if not _DURATION.match(value):
        raise ValueError(f"{value!r} is not a duration: use e.g. 30s, 5m, 1h, 1h30m")
    return value


def _uri(schemes: tuple[str, ...]) -> Any:
    def check(value: str) -> str:
        scheme, sep, rest = value.partition("://")
        host = rest.split("/", 1)[0]
        if not sep or scheme not in schemes or not rest.strip("/") or (scheme != "file" and not host):
            raise ValueError(f"{value!r} is not a URI of scheme {', '.join(schemes)} (e.g. {schemes[0]}://bucket/path)")
        return value

    return AfterValidator(check)


#: What each string format of the spec accepts, by its JSON schema `format` (the spec reference lists it).
FORMATS = {
    "quantity": "Kubernetes quantity: a number with an optional suffix Ki, Mi, Gi, Ti, k, M, G, T or m (8Gi, 250m)",
    "dns-label": "DNS-1123 label: lower-case letters, digits and '-', at most 63, starting and ending alphanumeric",
    "cron": "cron schedule: five fields (minute hour day-of-month month day-of-week) or "
    + ", ".join(sorted(_CRON_MACROS)),
    "duration": "duration: digits with unit ms, s, m or h, concatenated (30s, 5m, 1h30m)",
    "object-store-uri": "URI of scheme s3, gs, az or file (s3://bucket/path)",
    "git-url": "URL of scheme https, ssh or git",
    "iam-role-arn": "IAM role ARN: arn:aws:iam::<12-digit account>:role/<name>",
}


def _format(name: str) -> WithJsonSchema:
    assert name in FORMATS
    return WithJsonSchema({"type": "string", "format": name})


Quantity = Annotated[str, AfterValidator(_quantity), _format("quantity")]
Name = Annotated[str, AfterValidator(_dns_label), _format("dns-label")]
Cron = Annotated[str, AfterValidator(_cron), _format("cron")]
Duration = Annotated[str, AfterValidator(_duration), _format("duration")]
ObjectStoreUri = Annotated[str, _uri(("s3", "gs", "az", "file")), _format("object-store-uri")]
GitUrl = Annotated[str, _uri(("https", "ssh", "git")), _format("git-url")]
Share = Annotated[float, Field(ge=0.0, le=1.0)]


class Strict(BaseModel):
    """Base for every spec section: unknown keys are errors, values are immutable and never coerced.

    Strict types, so a typo in YAML fails instead of changing meaning: `replicas: true` is not 1 and
    `min_auc: "0.9"` is not 0.9. An integer still serves where a number is declared (YAML writes 1 for 1.0).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Resources(Strict):
    """Container requests and limits."""

    cpu: Quantity = Field("250m", description="CPU request.")
    memory: Quantity = Field("512Mi", description="Memory request, also the memory limit.")
    cpu_limit: Quantity | None = Field(
        None,
        description="CPU limit; none sets four times the request (at least one CPU), so a runaway container "
        "cannot take a node's CPU while a normal burst is not throttled.",
    )

    def manifest(self) -> dict[str, dict[str, str]]:
        """The container `resources` block."""
        limits = {"cpu": self.cpu_limit or _default_cpu_limit(self.cpu), "memory": self.memory}
        return {"requests": {"cpu": self.cpu, "memory": self.memory}, "limits": limits}


def _default_cpu_limit(request: str) -> str:
    """Four times a CPU request, at least one CPU, in millicores (the request is a valid quantity)."""
    millicores = float(request[:-1]) if request.endswith("m") else float(request) * 1000
    return f"{max(int(millicores * 4), 1000)}m"


# --- cluster -----------------------------------------------------------------------------


class Namespaces(Strict):
    """Namespaces the platform creates, one per concern.

    In a stack spec, each one left out is `loopform-<environment>-<suffix>` (system, pipelines,
    serving, monitoring, argocd), so several environments can share a cluster.
    """

    platform: Name = Field("loopform-system", description="MLflow, Feast and their databases.")
    pipelines: Name = Field("loopform-pipelines", description="Argo Workflows and training workflows.")
    serving: Name = Field("loopform-serving", description="BentoML model services.")
    monitoring: Name = Field("loopform-monitoring", description="Drift monitor, rules and the retraining trigger.")
    gitops: Name = Field("argocd", description="Argo CD.")

    @staticmethod
    def for_environment(environment: str) -> dict[str, str]:
        """The environment-scoped default of every namespace."""
        suffixes = {
            "platform": "system",
            "pipelines": "pipelines",
            "serving": "serving",
            "monitoring": "monitoring",
            "gitops": "argocd",
        }
        return {role: f"loopform-{environment}-{suffix}" for role, suffix in suffixes.items()}


_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$")


def _role_arn(value: str) -> str:
    if not _ROLE_ARN.match(value):
        raise ValueError(f"{value!r} is not an IAM role ARN: use arn:aws:iam::<12-digit account>:role/<name>")
    return value


RoleArn = Annotated[str, AfterValidator(_role_arn), _format("iam-role-arn")]


class WorkloadRoles(Strict):
    """The IAM role of each workload that reads or writes object storage: one each, least privilege."""

    registry: RoleArn = Field(description="MLflow server and its migration: the artifact bucket.")
    feature_store: RoleArn = Field(
        description="Feast apply, server and materialisation: the Feast registry and offline store."
    )
    pipelines: RoleArn = Field(
        description="Pipeline steps and the Argo executor: offline store, MLflow artifacts, workflow artifacts."
    )
    serving: RoleArn = Field(description="Model services: MLflow artifacts, the Feast registry, the payload log.")
    monitor: RoleArn = Field(
        description="Drift monitors: the payload log and MLflow artifacts, read (the Pushgateway is in-cluster)."
    )


class IrsaIdentity(Strict):
    """IAM Roles for Service Accounts: each workload's ServiceAccount is annotated with its role ARN.

    Each role must trust the cluster's OIDC provider for exactly that ServiceAccount (`loopform render`
    lists the subjects).
    """

    kind: Literal["irsa"] = Field("irsa", description="Selects IAM Roles for Service Accounts.")
    roles: WorkloadRoles = Field(
        description="Role ARN of each workload; each ServiceAccount is annotated with its own."
    )


class PodIdentity(Strict):
    """EKS Pod Identity: an association maps each workload's ServiceAccount to its role.

    Associations are AWS objects, not Kubernetes ones: `loopform render` lists the
    `aws eks create-pod-identity-association` command for each.
    """

    kind: Literal["pod-identity"] = Field("pod-identity", description="Selects EKS Pod Identity.")
    cluster_name: str = Field(min_length=1, description="EKS cluster name the associations belong to.")
    roles: WorkloadRoles = Field(description="Role ARN of each workload; one association per ServiceAccount.")


class StaticKeys(Strict):
    """Static access keys (MinIO, or no workload identity): the explicit alternative.

    The keys come from Pulumi secret config (`loopform:objectStoreAccessKeyId`,
    `loopform:objectStoreSecretAccessKey`); the program creates the Secret in every namespace
    whose workloads read it.
    """

    kind: Literal["static-keys"] = Field("static-keys", description="Selects static access keys from secret config.")
    secret_name: Name = Field("loopform-object-store", description="Name of the Secret the program creates.")


Identity = Annotated[IrsaIdentity | PodIdentity | StaticKeys, Field(discriminator="kind")]


class ClusterSpec(Strict):
    """The existing Kubernetes cluster the stack deploys into."""

    kind: Literal["kubernetes", "none"] = Field(
        "kubernetes",
        description="kubernetes: `pulumi up` declares the platform in a cluster. none: the stack runs on this "
        "machine with `loopform up` (SQLite, local files, localhost) and declares nothing; Pulumi refuses it.",
    )
    kube_context: str | None = Field(
        None,
        description="kubeconfig context the stack deploys to, always through an explicit provider. Required "
        "unless kind is none: without it Pulumi would deploy wherever kubectl points.",
    )
    namespaces: Namespaces = Field(
        default_factory=Namespaces, description="Namespaces; each left out is loopform-<environment>-<suffix>."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Labels added to every object.")
    storage_class: str | None = Field(None, description="StorageClass for volumes; none uses the default.")
    protect_data: bool = Field(
        True,
        description="The environment holds data: the namespace with the databases, the PostgreSQL and Redis "
        "StatefulSets, their volumes and the database Secret are protected (Pulumi refuses to delete or replace "
        "them) and retained on delete. Turn off only for a throw-away environment.",
    )
    shared_addons: bool = Field(
        True,
        description="This stack installs the cluster-wide add-ons: the Argo CRDs, the NVIDIA device plugin and "
        "the DCGM exporter. On a cluster shared by several environments, exactly one stack keeps this on.",
    )
    identity: Identity | None = Field(
        None,
        description="How workloads reach object storage: irsa, pod-identity or static-keys. Required when any "
        "URI of the spec is s3:// (unless kind is none: such a stack runs no pods).",
    )


# --- model registry (MLflow) ----------------------------------------------------------------


_POSTGRES_TAG = re.compile(r":(\d+)(\.\d+)*([-@].*)?$")


def _postgres_image(value: str) -> str:
    if not _POSTGRES_TAG.search(value.split("/")[-1]):
        raise ValueError(
            f"{value!r} has no version tag: name the PostgreSQL version (e.g. postgres:16.4), since a major "
            "version change needs a dump and restore that the platform refuses to do implicitly"
        )
    return value


class InClusterPostgres(Strict):
    """A PostgreSQL StatefulSet with a volume, for environments without a managed database."""

    kind: Literal["in-cluster"] = Field("in-cluster", description="Selects a PostgreSQL StatefulSet in the cluster.")
    image: Annotated[str, AfterValidator(_postgres_image)] = Field(
        "postgres:16.4", description="PostgreSQL image, tagged with its version (the major version is guarded)."
    )

    @property
    def major_version(self) -> str:
        """The PostgreSQL major version of the image tag (16 for postgres:16.4)."""
        match = _POSTGRES_TAG.search(self.image.split("/")[-1])
        assert match is not None  # the validator guarantees it
        return match.group(1)

    storage: Quantity = Field("10Gi", description="Volume size.")
    database: Name = Field("mlflow", description="Database name.")
    user: Name = Field("mlflow", description="Database user.")
    resources: Resources = Field(
        default_factory=lambda: Resources(cpu="250m", memory="512Mi"), description="Of the PostgreSQL container."
    )


class ExternalDatabase(Strict):
    """A managed PostgreSQL (RDS, Cloud SQL); its password is the secret config `loopform:registryDbPassword`."""

    kind: Literal["external"] = Field("external", description="Selects a managed PostgreSQL outside the cluster.")
    host: str = Field(min_length=1, description="Database host name.")
    port: int = Field(5432, ge=1, le=65535, description="Database port.")
    database: Name = Field("mlflow", description="Database name.")
    user: Name = Field("mlflow", description="Database user.")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        "require", description="libpq sslmode of the connection."
    )


class ArtifactStore(Strict):
    """Where MLflow keeps model artifacts."""

    uri: ObjectStoreUri = Field("s3://loopform-mlflow/artifacts", description="Default artifact root.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2); none uses AWS.")


class RegistrySpec(Strict):
    """MLflow tracking server and model registry."""

    mlflow_version: str = Field("3.17.2", description="MLflow version; selects the image tag.")
    image: str | None = Field(
        None,
        description="Server image; none uses ghcr.io/loopform/mlflow:v<mlflow_version> (images/mlflow: "
        "MLflow with the PostgreSQL and S3 drivers, pinned by constraints.txt).",
    )
    replicas: int = Field(1, ge=1, le=20, description="Tracking server replicas.")
    port: int = Field(5000, ge=1, le=65535, description="Service port.")
    workers: int = Field(2, ge=1, le=32, description="Server worker processes.")
    resources: Resources = Field(
        default_factory=lambda: Resources(cpu="500m", memory="1Gi"), description="Of the tracking server container."
    )
    backend: InClusterPostgres | ExternalDatabase = Field(
        default_factory=InClusterPostgres, discriminator="kind", description="Backend store."
    )
    artifacts: ArtifactStore = Field(default_factory=ArtifactStore, description="Where model artifacts are stored.")

    @property
    def server_image(self) -> str:
        return self.image or f"{IMAGE_REGISTRY}/mlflow:v{self.mlflow_version}"


# --- feature store (Feast) -------------------------------------------------------------------


class InClusterRedis(Strict):
    """A Redis StatefulSet for the online store."""

    kind: Literal["in-cluster"] = Field("in-cluster", description="Selects a Redis StatefulSet in the cluster.")
    image: str = Field("redis:7.4", description="Redis image.")
    storage: Quantity = Field("1Gi", description="Volume size for the append-only file.")
    resources: Resources = Field(
        default_factory=lambda: Resources(cpu="100m", memory="256Mi"), description="Of the Redis container."
    )


class ExternalRedis(Strict):
    """A managed Redis (ElastiCache); with `auth`, its password is the secret config `loopform:redisPassword`.

    The program builds Feast's connection string from these and creates the Secret in every
    namespace that reads the online store.
    """

    kind: Literal["external"] = Field("external", description="Selects a managed Redis outside the cluster.")
    host: str = Field(min_length=1, description="Redis host name (the primary or configuration endpoint).")
    port: int = Field(6379, ge=1, le=65535, description="Redis port.")
    ssl: bool = Field(True, description="TLS to Redis (in-transit encryption).")
    auth: bool = Field(True, description="Redis AUTH with the password from `loopform:redisPassword`.")


class FeastRegistry(Strict):
    """Feast's registry: the SQL registry, in a database of its own on the platform's PostgreSQL.

    The `feast apply` Job and every materialisation write the registry. A file registry on object
    storage is rewritten whole by each writer, so two at once lose one's write (Feast's docs warn of
    it); the SQL registry writes row by row in transactions. Its role and database are created, and
    its password set, by a Job that connects as the MLflow database user (the in-cluster PostgreSQL's
    superuser, or a managed database's user, which needs CREATEROLE and CREATEDB).
    """

    database: Name = Field("feast", description="Database of the registry on the platform's PostgreSQL.")
    user: Name = Field("feast", description="Role the Feast pods, pipeline steps and model services connect as.")
    cache_ttl_seconds: int = Field(60, ge=0, description="How long servers cache the registry.")
    client_image: str = Field(
        "postgres:16.4", description="Image with psql for the Job that creates role and database."
    )


class OfflineStore(Strict):
    """Feast offline store: Parquet files on object storage, read with Feast's file store."""

    type: Literal["file", "dask", "duckdb"] = Field("file", description="Feast offline store type.")
    data_uri: ObjectStoreUri = Field("s3://loopform-feast/offline", description="Where the source tables live.")


class FeatureServer(Strict):
    """The Feast feature server Deployment."""

    replicas: int = Field(1, ge=1, le=50, description="Feature server replicas.")
    port: int = Field(6566, ge=1, le=65535, description="Port the feature server listens on and its Service exposes.")
    resources: Resources = Field(
        default_factory=lambda: Resources(cpu="250m", memory="512Mi"),
        description="Of the Feast containers: the feature server, the `feast apply` Job and materialisation.",
    )


class FeatureStoreSpec(Strict):
    """Feast: registry, offline store, Redis online store, feature server, materialisation."""

    image: str | None = Field(
        None,
        description="Image of the feature server and jobs; none uses orchestrator.pipeline_image, "
        "which carries Feast and everything the feature definitions import.",
    )
    project: Name = Field("loopform", description="Feast project name.")
    registry: FeastRegistry = Field(default_factory=FeastRegistry, description="Feast's SQL registry.")
    offline_store: OfflineStore = Field(default_factory=OfflineStore, description="Historical feature data.")
    online_store: InClusterRedis | ExternalRedis = Field(
        default_factory=InClusterRedis, discriminator="kind", description="Redis online store: in-cluster or external."
    )
    server: FeatureServer = Field(default_factory=FeatureServer, description="The feature server Deployment.")
    materialization_schedule: Cron = Field("*/30 * * * *", description="When to run materialize-incremental.")


# --- GPU node pools ---------------------------------------------------------------------------


class Taint(Strict):
    """A node taint."""

    key: str = Field(description="Taint key; pods sent to the pool tolerate it.")
    value: str = Field("", description="Taint value; empty tolerates the key with any value (operator Exists).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = Field("NoSchedule", description="Taint effect.")


GPU_TAINT = Taint(key="nvidia.com/gpu", value="present", effect="NoSchedule")


class KarpenterNodeClass(Strict):
    """The EC2NodeClass the NodePool's nodes are launched from."""

    role: str = Field(
        min_length=1,
        description="IAM role name of the nodes (the node role your Karpenter installation created; "
        "it needs an EKS access entry or aws-auth mapping). No default: a wrong role never makes a node.",
    )
    ami_alias: str = Field(
        "al2023@v20260923",
        pattern=r"^[a-z0-9]+@(latest|v[0-9]{8})$",
        description="amiSelectorTerms alias, <family>@v<YYYYMMDD> (an EKS AMI release; GPU AMIs are picked per "
        "instance). `@latest` drifts every node to each new AMI as AWS publishes it; the tests refuse it in the "
        "repository's stacks.",
    )
    discovery_tag: str = Field(
        min_length=1,
        description="Value of tag karpenter.sh/discovery on the cluster's subnets and security groups "
        "(usually the cluster name). No default: with no match no node launches.",
    )
    volume_size: Quantity = Field("200Gi", description="Root volume size.")


class KarpenterPool(Strict):
    """GPU nodes that Karpenter launches on demand and removes when empty (scale to zero)."""

    kind: Literal["karpenter"] = Field("karpenter", description="Selects a Karpenter NodePool the stack declares.")
    instance_families: list[str] = Field(
        default_factory=lambda: ["g5", "g6"],
        min_length=1,
        description="EC2 instance families the nodes may be (requirement karpenter.k8s.aws/instance-family).",
    )
    capacity_types: list[Literal["spot", "on-demand"]] = Field(
        default_factory=lambda: ["on-demand"],
        min_length=1,
        description="Capacity types the nodes may be (requirement karpenter.sh/capacity-type).",
    )
    gpu_limit: int = Field(8, ge=1, description="Most GPUs the pool may hold at once.")
    gpus_per_node: int = Field(1, ge=1, le=16, description="Largest GPU count of one node in this pool.")
    consolidate_after: Duration = Field("5m", description="How long an empty node waits before removal.")
    node_class: KarpenterNodeClass = Field(description="Node role and discovery tag of the cluster (required).")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra node labels.")

    def node_labels(self, pool: str) -> dict[str, str]:
        return {"loopform.dev/gpu-pool": pool, **self.labels}

    def node_taints(self) -> list[Taint]:
        return [GPU_TAINT]


class ExistingPool(Strict):
    """A GPU node group the cluster already has, described by its labels and taints."""

    kind: Literal["existing"] = Field("existing", description="Selects a node group the cluster already has.")
    labels: dict[str, str] = Field(min_length=1, description="Labels that select the pool's nodes.")
    taints: list[Taint] = Field(
        default_factory=lambda: [GPU_TAINT],
        description="Taints the pool's nodes carry; pods sent to the pool tolerate each. Default: nvidia.com/gpu=present.",
    )
    gpu_limit: int = Field(8, ge=1, description="GPUs the pool offers in all.")
    gpus_per_node: int = Field(1, ge=1, le=16, description="GPUs on each node.")

    def node_labels(self, pool: str) -> dict[str, str]:
        return dict(self.labels)

    def node_taints(self) -> list[Taint]:
        return list(self.taints)


GpuPool = Annotated[KarpenterPool | ExistingPool, Field(discriminator="kind")]


class GpuSpec(Strict):
    """GPU pools and the NVIDIA device plugin."""

    pools: dict[Name, GpuPool] = Field(default_factory=dict, description="Pools by name.")
    namespace: Name = Field(
        "kube-system", description="Namespace of the device plugin and DCGM exporter (privileged pods)."
    )
    device_plugin_chart_version: str = Field("0.17.1", description="nvidia-device-plugin chart version.")
    dcgm_exporter_chart_version: str = Field("4.1.1", description="dcgm-exporter chart version.")


# --- orchestration and GitOps --------------------------------------------------------------------


class RetryPolicy(Strict):
    """Retries of pipeline steps on infrastructure errors (never on a failed gate)."""

    limit: int = Field(3, ge=0, le=10, description="Retries of a step after its first try.")
    backoff: Duration = Field("30s", description="First delay.")
    factor: int = Field(2, ge=1, le=10, description="Each delay is the one before times this.")
    max_backoff: Duration = Field(
        "10m",
        description="Longest single delay between Argo CD sync retries (its backoff maxDuration). Pipeline step "
        "retries ignore it: Argo Workflows' maxDuration would bound all tries and cut a retried step's run.",
    )


class ArtifactRepository(Strict):
    """S3-compatible bucket where workflows keep their artifacts."""

    bucket: str = Field("loopform-argo-artifacts", description="Bucket name (no scheme).")
    endpoint: str = Field("s3.amazonaws.com", description="host[:port] of the S3 API.")
    region: str | None = Field(None, description="Bucket region; none lets the S3 client look it up.")
    insecure: bool = Field(False, description="Plain HTTP (MinIO in a lab).")
    key_format: str = Field(
        "{{workflow.name}}/{{pod.name}}",
        description="Object key of each step's artifacts and logs, in Argo template variables.",
    )


#: Where `.github/workflows/images.yml` publishes the repository's images, and the tag of this version (each image
#: is also tagged with the git SHA); the project's version in pyproject.toml.
IMAGE_REGISTRY = "ghcr.io/loopform"
IMAGE_TAG = "0.1.0"
#: The Argo Workflows chart's images, by component: each runs `orchestrator.argo_workflows_version`.
ARGO_WORKFLOWS_IMAGES = {
    "controller": "quay.io/argoproj/workflow-controller",
    "server": "quay.io/argoproj/argocli",
    "executor": "quay.io/argoproj/argoexec",
}
#: Argo CD's image: every Argo CD component runs it, at `gitops.argocd_version`.
ARGOCD_IMAGE_REPOSITORY = "quay.io/argoproj/argocd"


class OrchestratorSpec(Strict):
    """Argo Workflows and the per-model training pipelines."""

    chart_version: str = Field(
        "0.47.5", description="argo-workflows chart version (the last for Argo Workflows v3.7; it ships v3.7.11)."
    )
    argo_workflows_version: str = Field(
        "v3.7.18",
        pattern=r"^v[0-9]+\.[0-9]+\.[0-9]+$",
        description="Argo Workflows image tag (controller, server, executor): a v3.7 patch past the chart's own "
        "v3.7.11, which `templateReferencing: Strict` submitters can bypass (loopform/advisories.py).",
    )
    chart_keyring: RepoPath | None = Field(
        None,
        description="Binary GnuPG keyring (in the repository) holding argo-helm's signing key: set, Helm verifies "
        "the provenance of the argo-workflows chart, and of the argo-events chart the retraining route installs, "
        "before installing them (docs/hardening.md, Patched versions). None: unverified.",
    )
    pipeline_image: str = Field(
        f"{IMAGE_REGISTRY}/pipeline:{IMAGE_TAG}",
        description="Image of the CPU steps (`loopform step`; images/pipeline, the CPU build of torch).",
    )
    gpu_pipeline_image: str = Field(
        f"{IMAGE_REGISTRY}/pipeline-cuda:{IMAGE_TAG}",
        description="Image of the steps that request GPUs (images/pipeline-cuda, the CUDA build of torch).",
    )
    artifact_repository: ArtifactRepository = Field(
        default_factory=ArtifactRepository, description="Where workflows keep step artifacts and logs."
    )
    active_deadline_seconds: int = Field(6 * 3600, ge=60, description="Hard limit of one pipeline run.")
    ttl_seconds_after_completion: int = Field(24 * 3600, ge=0, description="How long finished workflows stay.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy, description="Retries of pipeline steps.")
    step_resources: Resources = Field(
        default_factory=lambda: Resources(cpu="500m", memory="1Gi"),
        description="Of every pipeline step but training (models.<name>.training.resources).",
    )

    @property
    def argo_images(self) -> dict[str, str]:
        """The chart's controller, server and executor images at `argo_workflows_version`."""
        return {
            role: f"{repository}:{self.argo_workflows_version}" for role, repository in ARGO_WORKFLOWS_IMAGES.items()
        }


class GitOpsSpec(Strict):
    """Argo CD and the Application that syncs model services."""

    enabled: bool = Field(
        True,
        description="Argo CD syncs the model services from the rendered manifests in git. Off, `pulumi up` "
        "deploys them itself.",
    )
    chart_version: str = Field("10.1.3", description="argo-cd chart version (for Argo CD 3.4; it ships v3.4.5).")
    argocd_version: str = Field(
        "v3.4.9",
        pattern=r"^v[0-9]+\.[0-9]+\.[0-9]+$",
        description="Argo CD image tag: the chart's minor version, at its latest patch (loopform/advisories.py). "
        "3.4, not 3.5: 3.5 deprecates AppProject signatureKeys, which `signature_keys` relies on.",
    )
    chart_keyring: RepoPath | None = Field(
        None,
        description="Binary GnuPG keyring (in the repository) holding argo-helm's signing key: set, Helm verifies "
        "the chart's provenance before installing it (docs/hardening.md, Patched versions). None: unverified.",
    )
    repo_url: GitUrl = Field("https://github.com/loopform/loopform.git", description="Repository Argo CD syncs.")
    target_revision: str = Field("main", description="Branch, tag or commit of repo_url Argo CD syncs.")
    path: RepoPath = Field("deploy", description="Folder of rendered service manifests; the environment is appended.")
    signature_keys: list[Annotated[str, Field(pattern=r"^[0-9A-F]{16}$")]] = Field(
        default_factory=list,
        description="GnuPG key ids (16 upper-case hex digits) of release keys: Argo CD syncs only commits signed "
        "by one of them (AppProject signatureKeys). Empty: any commit syncs, which the policy pack refuses in "
        "staging and prod.",
    )
    public_keys: RepoPath = Field(
        "deploy/keys",
        description="Folder (in the repository) with each signature key's ASCII-armored public key, named "
        "<KEY_ID>.asc; Argo CD imports them (argocd-gpg-keys-cm).",
    )

    @property
    def argocd_image(self) -> str:
        return f"{ARGOCD_IMAGE_REPOSITORY}:{self.argocd_version}"


# --- models, gates, monitoring ----------------------------------------------------------------------


class TrainingSpec(Strict):
    """Where and how the train step runs."""

    gpu_pool: Name | None = Field(None, description="Pool from gpu.pools; none trains on CPU nodes.")
    gpus: int = Field(0, ge=0, le=16, description="GPUs for the train step.")
    resources: Resources = Field(
        default_factory=lambda: Resources(cpu="2", memory="4Gi"), description="Of the train step's container."
    )
    schedule: Cron | None = Field(None, description="Scheduled retraining (CronWorkflow); none means on demand.")
    window_days: int = Field(30, ge=1, description="Days of labelled events, back from the newest, a run trains on.")

    @model_validator(mode="after")
    def _gpus_need_pool(self) -> TrainingSpec:
        if self.gpus and not self.gpu_pool:
            raise ValueError("gpus > 0 needs gpu_pool: name a pool from gpu.pools")
        return self


class ServingSpec(Strict):
    """The BentoML service of a released model."""

    min_replicas: int = Field(2, ge=1, description="Replicas of the Deployment and the autoscaler's minimum.")
    max_replicas: int = Field(6, ge=1, description="The autoscaler's maximum; not below min_replicas.")
    target_cpu_utilization: int = Field(
        70, ge=10, le=100, description="Average CPU use, in percent of the request, the autoscaler keeps."
    )
    port: int = Field(3000, ge=1, le=65535, description="Port the service listens on and its Service exposes.")
    resources: Resources = Field(
        default_factory=lambda: Resources(cpu="500m", memory="1Gi"), description="Of the service container."
    )
    max_error_rate: Share = Field(
        0.01, description="Share of requests answered 5xx above which the serving alert fires (Prometheus rules)."
    )
    max_p99_seconds: float = Field(
        1.0, gt=0, description="99th percentile request latency above which the serving alert fires."
    )
    callers: list[Name] = Field(
        default_factory=lambda: ["default"],
        min_length=1,
        description=(
            "Names of the clients allowed to call the service: each gets its own bearer token (derived from the "
            "stack's secret, in the Secret `<model>-service-tokens`, key tokens.json), and its requests are "
            "logged and monitored under its name."
        ),
    )

    @model_validator(mode="after")
    def _replica_range(self) -> ServingSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self

    @model_validator(mode="after")
    def _distinct_callers(self) -> ServingSpec:
        # One token per name: a caller listed twice would be one identity under two entries.
        if len(set(self.callers)) != len(self.callers):
            raise ValueError(
                f"callers are listed twice: {sorted(c for c in set(self.callers) if self.callers.count(c) > 1)}"
            )
        return self


class StagingProof(Strict):
    """The signed staging release of the same version, carried by a production record."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(description="Service image of the staging release.")
    released_at: str = Field(description="ISO-8601 time the staging release was signed.")
    key_id: str = Field(description="Id of the Ed25519 key that signed the staging release.")
    signature: str = Field(description="Ed25519 signature (base64) of the staging record.")


class Release(Strict):
    """A signed release record (written by `loopform promote`; see `loopform.record`).

    The full evidence stays in the MLflow run; the record carries its digest, the model's
    artifacts digest and the few numbers the policy pack judges, signed with Ed25519.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Registered model name (the key under `models`).")
    version: int = Field(ge=1, description="MLflow model version.")
    run_id: str = Field(description="MLflow run that produced the version.")
    image: str = Field(description="Service image that serves the version (services.image unless given; by digest).")
    artifacts: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="Digest over the model's files.")
    evidence: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="Digest of the full evidence artifact.")
    created_at: str = Field(description="ISO-8601 time the evidence was sealed.")
    released_at: str = Field(description="ISO-8601 time this release was signed.")
    gates: dict[str, dict[str, bool | int | float | str | None]] = Field(
        description="Each gate's verdict and the numbers the rules judge."
    )
    staging: StagingProof | None = Field(None, description="The signed staging release (production records).")
    key_id: str = Field(description="Id of the Ed25519 key that signed the record.")
    signature: str = Field(description="Ed25519 signature (base64) over the record and its environment.")

    def record(self) -> dict[str, Any]:
        """The record as signed: plain JSON data, without an absent staging proof."""
        return self.model_dump(mode="json", exclude_none=False, exclude={"staging"} if self.staging is None else None)


class ModelSpec(Strict):
    """One model: its code, pipeline, service, own gates and current release."""

    path: RepoPath = Field(
        description="Folder with the model's contract.py, model.py, train.py and data.py, relative to the repository "
        "(`loopform.model_code`)."
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="The model's training pipeline.")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="The model's service.")
    gates: dict[str, Any] = Field(
        default_factory=dict,
        description="This model's gates over the environment's `gates`: any key of gates (drift merges key by key), "
        "e.g. max_rmse for a regressor.",
    )
    release: Release | None = Field(None, description="The released version; none deploys no service.")


class DriftGate(Strict):
    """Drift of new data against the reference (training) data."""

    feature_threshold: float = Field(0.1, gt=0, description="Per-feature drift score threshold (distance methods).")
    p_value: float = Field(0.05, gt=0, lt=1, description="Per-feature p-value threshold (test methods).")
    max_drift_share: Share = Field(0.3, description="Most share of features that may drift.")
    false_alarm_rate: float = Field(
        0.01,
        gt=0,
        lt=0.5,
        description="Chance that a window of clean traffic triggers retraining: each decision is calibrated to the "
        "window's own size, so small windows are not noisier alarms.",
    )
    label_shift_ratio: float = Field(
        2.0,
        gt=1,
        description="A positive rate this many times higher (or lower) than the reference's is a label shift.",
    )
    label_shift_p_value: float = Field(
        0.01, gt=0, lt=1, description="Significance of the proportion test that decides a label shift."
    )


class ServicesSpec(Strict):
    """The model services' image: one per repository version, serving any model and version from its environment."""

    image: str = Field(
        f"{IMAGE_REGISTRY}/serving:{IMAGE_TAG}",
        description="Image `loopform promote` records for a release unless given one (images/serving: the runtime, "
        "models/ and bentos/; `loopform serve <model>`). Pin it by digest (REF@sha256:...) where policy requires.",
    )


class GatesSpec(Strict):
    """Thresholds every release must meet in this environment."""

    max_missing_share: Share = Field(0.05, description="Most share of missing values in any column.")
    max_out_of_range_share: Share = Field(0.01, description="Most share of values outside the schema's range.")
    drift: DriftGate = Field(default_factory=DriftGate, description="The drift gate.")
    max_ood_rate: Share = Field(0.05, description="Most share of rows flagged out of distribution.")
    min_auc: Share = Field(0.75, description="Least ROC AUC of a classifier on the holdout set.")
    max_auc_drop: Share = Field(
        0.01,
        description="Non-inferiority margin: the lower bound of the paired interval of challenger minus champion AUC "
        "must be above -max_auc_drop.",
    )
    min_brier_skill: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Least Brier skill score (1 - Brier / Brier of always predicting the base rate): a base-rate "
        "model scores 0 and fails.",
    )
    min_positives: int = Field(100, ge=1, description="Fewest positive labels the holdout needs to judge a classifier.")
    max_rmse: float | None = Field(
        None,
        gt=0,
        description="Most RMSE of a regressor on the holdout, in the label's unit; every regressor needs one "
        "(usually under models.<m>.gates).",
    )
    min_r2: float = Field(
        0.1,
        lt=1,
        description="Least R² of a regressor on the holdout: always predicting the training mean scores about 0 "
        "and fails.",
    )
    max_rmse_increase: Share = Field(
        0.02,
        description="Non-inferiority margin of a regressor: the upper bound of the paired interval of challenger "
        "RMSE / champion RMSE - 1 must be below it.",
    )
    min_holdout_rows: int = Field(200, ge=1, description="Fewest holdout rows a regressor is judged on.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Level of the bootstrap intervals.")
    bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap resamples behind each interval.")
    alert_rate: Share = Field(
        0.01, description="Share of traffic the operations team can review: precision and recall are reported there."
    )
    max_evidence_age_days: int = Field(30, ge=1, description="Evidence older than this is stale.")
    require_staging: bool = Field(False, description="A release must have been released to staging first.")


class MonitoringSpec(Strict):
    """The drift monitor and the retraining trigger."""

    schedule: Cron = Field("0 * * * *", description="When the drift monitor runs.")
    window: Duration = Field("24h", description="How far back the monitor reads payloads.")
    min_rows: int = Field(500, ge=1, description="Fewest payload rows the monitor needs to decide.")
    payload_uri: ObjectStoreUri = Field("s3://loopform-lake/payloads", description="Payload log (partitioned Parquet).")
    payload_retention_days: int = Field(
        30,
        ge=1,
        le=3650,
        description="Days payload rows are kept: the payload bucket's lifecycle rule expires objects under "
        "payload_uri after this many days (the prerequisites report prints the rule). Rows hold entity ids and "
        "amounts: keep them no longer than the monitor and retraining need.",
    )
    alert_for: Duration = Field("15m", description="How long drift must hold before the alert fires.")
    pushgateway_image: str = Field(
        "prom/pushgateway:v1.11.1", description="Image of the Pushgateway the monitors push their gauges to."
    )
    prometheus_operator: bool = Field(
        False,
        description="The cluster has the Prometheus Operator CRDs (ServiceMonitor, PrometheusRule). Off, nothing "
        "that needs them is declared or rendered by a chart.",
    )
    prometheus_release: str = Field(
        "kube-prometheus-stack", description="`release` label the Prometheus Operator selects rules by."
    )
    prometheus_namespace: Name | None = Field(
        None,
        description="Namespace the cluster's Prometheus and Alertmanager run in: NetworkPolicies let its "
        "Prometheus scrape every namespace and its Alertmanager reach the retraining webhook. None: the "
        "platform's monitoring namespace (where install_prometheus_stack installs them).",
    )
    install_prometheus_stack: bool = Field(
        False,
        description="Install kube-prometheus-stack (Prometheus Operator, Prometheus, Alertmanager, Grafana, "
        "kube-state-metrics) from its pinned chart as release `prometheus_release`. Off, the rules, monitors "
        "and dashboard target an existing Prometheus Operator through that release label.",
    )

    @property
    def operator(self) -> bool:
        """The Prometheus Operator's CRDs exist: installed by this stack, or already on the cluster."""
        return self.prometheus_operator or self.install_prometheus_stack


class LocalSpec(Strict):
    """The embedded default: the whole loop on one machine (SQLite, local files, localhost)."""

    workdir: Annotated[str, AfterValidator(_workdir)] = Field(
        ".loopform/local",
        description="Everything the local loop writes: a folder of its own inside the repo (or an absolute path).",
    )
    rows: int = Field(
        30000,
        ge=1000,
        description="Rows of synthetic history per model (30 days, from its generator): the holdout (its newest 20%) "
        "needs gates.min_positives positives (a classifier) or min_holdout_rows (a regressor).",
    )
    traffic: int = Field(
        600, ge=10, description="Requests of live traffic per model, one at a time (a share by entity id)."
    )
    drift_rows: int = Field(
        25000,
        ge=100,
        description="Events of drifted traffic per model (over drift_days, scored in batches after the first `traffic`): "
        "enough labelled rows that a retrained model learns the new regime and its holdout can be judged.",
    )
    drift_days: int = Field(6, ge=1, description="Days the drifted traffic spans (its event times).")
    label_delay: Duration = Field(
        "6h", description="Labels of served events arrive this long after each event (e.g. fraud reports)."
    )
    seed: int = Field(7, description="Seed of data generation and training.")
    serve_port: int = Field(
        3311, ge=1024, le=65535, description="Port of the local BentoML services (one model at a time)."
    )
    drift: Literal["covariate", "label", "none"] = Field("covariate", description="Drift injected into traffic.")


class PlatformSpec(Strict):
    """The whole platform of one environment."""

    environment: Name = Field(description="Environment name: dev, staging, prod, local.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    registry: RegistrySpec = Field(default_factory=RegistrySpec)
    feature_store: FeatureStoreSpec = Field(default_factory=FeatureStoreSpec)
    gpu: GpuSpec = Field(default_factory=GpuSpec)
    orchestrator: OrchestratorSpec = Field(default_factory=OrchestratorSpec)
    gitops: GitOpsSpec = Field(default_factory=GitOpsSpec)
    models: dict[Name, ModelSpec] = Field(default_factory=dict)
    services: ServicesSpec = Field(default_factory=ServicesSpec)
    gates: GatesSpec = Field(default_factory=GatesSpec)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    image_digests: dict[str, Annotated[str, Field(pattern=DIGEST.pattern)]] = Field(
        default_factory=dict,
        description="The digest lock: each image reference the stack runs (repository:tag) to the digest "
        "`loopform pin-images` resolved it to. Every image the platform names (image fields, the Pushgateway, "
        "the PostgreSQL and Redis images, the Argo images of argo_workflows_version and argocd_version) runs as "
        "repository:tag@digest where this names its tag; a changed tag runs unpinned until its digest is added.",
    )
    local: LocalSpec = Field(default_factory=LocalSpec, description="Settings of `loopform up` (local stack).")

    def gates_for(self, model: str) -> GatesSpec:
        """The gates model `model` is judged by: the environment's, with its own `models.<m>.gates` over them."""
        base = self.gates.model_dump()
        own = dict(self.models[model].gates) if model in self.models else {}
        drift = own.pop("drift", None) or {}
        if not isinstance(drift, dict):
            raise ValueError("drift: must be a mapping of drift gate keys")
        return GatesSpec.model_validate({**base, **own, "drift": {**base["drift"], **drift}})

    @property
    def is_local(self) -> bool:
        """A stack with no cluster (`loopform up`): runs no pods, so cluster-only settings do not apply."""
        return self.cluster.kind == "none"

    def pinned(self, reference: str) -> str:
        """`reference` as it runs: with the digest `image_digests` gives its tag."""
        return pinned(reference, self.image_digests)

    def _image_fields(self) -> dict[tuple[str, ...], str]:
        """Each image field that names an image, by path (`registry.image` is the MLflow server's, defaulted)."""
        fields = {
            ("orchestrator", "pipeline_image"): self.orchestrator.pipeline_image,
            ("orchestrator", "gpu_pipeline_image"): self.orchestrator.gpu_pipeline_image,
            ("registry", "image"): self.registry.server_image,
            ("services", "image"): self.services.image,
            ("feature_store", "registry", "client_image"): self.feature_store.registry.client_image,
            ("monitoring", "pushgateway_image"): self.monitoring.pushgateway_image,
        }
        if self.feature_store.image is not None:  # else the feature server runs the pipeline image
            fields[("feature_store", "image")] = self.feature_store.image
        if isinstance(self.registry.backend, InClusterPostgres):
            fields[("registry", "backend", "image")] = self.registry.backend.image
        if isinstance(self.feature_store.online_store, InClusterRedis):
            fields[("feature_store", "online_store", "image")] = self.feature_store.online_store.image
        return fields

    def images(self) -> dict[str, str]:
        """Every image the platform names, as it runs (digest lock applied), by the spec key that sets it. Charts'
        other images are pinned by the charts' versions."""
        found = {".".join(path): image for path, image in self._image_fields().items()}
        found["gitops.argocd_version"] = self.pinned(self.gitops.argocd_image)
        for role, image in self.orchestrator.argo_images.items():
            found[f"orchestrator.argo_workflows_version ({role})"] = self.pinned(image)
        return found

    def bucket_uris(self) -> dict[str, str]:
        """Every object-store location the platform's workloads read or write, by spec key."""
        return {
            "registry.artifacts.uri": self.registry.artifacts.uri,
            "feature_store.offline_store.data_uri": self.feature_store.offline_store.data_uri,
            "monitoring.payload_uri": self.monitoring.payload_uri,
            "orchestrator.artifact_repository.bucket": f"s3://{self.orchestrator.artifact_repository.bucket}",
        }

    @model_validator(mode="before")
    @classmethod
    def _environment_namespaces(cls, data: Any) -> Any:
        """Fill the namespaces left out with the environment-scoped defaults."""
        if not isinstance(data, dict) or not isinstance(data.get("environment"), str):
            return data
        cluster = data.get("cluster", {})
        given = cluster.get("namespaces", {}) if isinstance(cluster, dict) else None
        if not isinstance(given, dict):
            return data  # the field validators report the wrong type
        namespaces = {**Namespaces.for_environment(data["environment"]), **given}
        return {**data, "cluster": {**cluster, "namespaces": namespaces}}

    @field_validator("image_digests")
    @classmethod
    def _lock_keys(cls, value: dict[str, str]) -> dict[str, str]:
        problems = [f"{key}: {problem}" for key in value if (problem := lock_key_problem(key))]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @model_validator(mode="after")
    def _pin_images(self) -> PlatformSpec:
        """Each image field holds the image as it runs, so every consumer (components, `loopform promote`) sees
        the digest the lock gives its tag."""
        for path, image in self._image_fields().items():
            if (running := self.pinned(image)) != image:
                _set_path(self, path, running)
        return self

    @model_validator(mode="after")
    def _cluster_stacks_name_their_cluster(self) -> PlatformSpec:
        if not self.is_local and not self.cluster.kube_context:
            raise SpecReferenceError(
                ("cluster", "kube_context"),
                "required on every stack with a cluster: name the kubeconfig context this environment deploys to "
                "(else `pulumi up` goes wherever kubectl points), or set cluster.kind: none for `loopform up`",
            )
        return self

    @model_validator(mode="after")
    def _identity_for_object_storage(self) -> PlatformSpec:
        if self.is_local or self.cluster.identity is not None:
            return self
        s3 = sorted(key for key, uri in self.bucket_uris().items() if uri.startswith("s3://"))
        if s3:
            raise SpecReferenceError(
                ("cluster", "identity"),
                f"required: {', '.join(s3)} are on s3://, and pods get no credentials without it; "
                "set kind irsa (roles per workload), pod-identity (cluster_name and roles) or static-keys",
            )
        return self

    @model_validator(mode="after")
    def _releases_name_their_model(self) -> PlatformSpec:
        for name, model in self.models.items():
            if model.release is not None and model.release.model != name:
                raise SpecReferenceError(
                    ("models", name, "release", "model"),
                    f"is {model.release.model!r}: a release record of another model cannot serve as {name!r}",
                )
        return self

    @model_validator(mode="after")
    def _model_gates(self) -> PlatformSpec:
        for name in self.models:
            try:
                self.gates_for(name)
            except (ValidationError, ValueError) as error:
                problems = (
                    [f"{'.'.join(map(str, loc))}: {message}" for loc, message in _located(error, GatesSpec)]
                    if isinstance(error, ValidationError)
                    else [str(error)]
                )
                raise SpecReferenceError(
                    ("models", name, "gates"), "is not a valid overlay of gates: " + "; ".join(problems)
                ) from None
        return self

    @model_validator(mode="after")
    def _references(self) -> PlatformSpec:
        for name, model in self.models.items():
            pool_name = model.training.gpu_pool
            if pool_name is None:
                continue
            pool = self.gpu.pools.get(pool_name)
            if pool is None:
                known = ", ".join(sorted(self.gpu.pools)) or "none defined"
                raise SpecReferenceError(
                    ("models", name, "training", "gpu_pool"),
                    f"names GPU pool {pool_name!r}, which gpu.pools does not define (defined: {known})",
                )
            if model.training.gpus > pool.gpus_per_node:
                raise SpecReferenceError(
                    ("models", name, "training", "gpus"),
                    f"asks for {model.training.gpus} GPUs but a node of pool {pool_name!r} has "
                    f"{pool.gpus_per_node} (gpu.pools.{pool_name}.gpus_per_node)",
                )
        return self


def _set_path(model: BaseModel, path: tuple[str, ...], value: str) -> None:
    """Set a field of a frozen model, nested along `path`, in copies of the models on the way (validation only)."""
    head, *rest = path
    if rest:
        child = getattr(model, head).model_copy()
        _set_path(child, tuple(rest), value)
        value = child  # type: ignore[assignment]
    object.__setattr__(model, head, value)


# --- loading and errors -------------------------------------------------------------------------


class SpecReferenceError(ValueError):
    """A cross reference that does not resolve; carries the key path it belongs to."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class SpecError(Exception):
    """A stack file that is not a valid spec; the message names file, key path and fix."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: invalid stack spec ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")


def _path(loc: tuple[Any, ...]) -> str:
    path = CONFIG_KEY
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _problems(error: ValidationError) -> list[str]:
    return [f"{_path(loc)}: {message}" for loc, message in _located(error, PlatformSpec)]


def _located(error: ValidationError, root: type[BaseModel]) -> list[tuple[tuple[Any, ...], str]]:
    """Each error of a section of type `root`, at the key path the user typed, with its fix."""
    problems = []
    for err in error.errors(include_url=False):
        loc, holders, models = _resolve(err["loc"], root)
        ctx = err.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, SpecReferenceError):
            loc = loc + inner.loc
            message = str(inner)
        elif err["type"] == "extra_forbidden":
            message = "unknown key" + _allowed_keys(str(loc[-1]), holders)
        elif err["type"] == "union_tag_invalid":
            message = f"kind {ctx.get('tag')!r} is not one of {ctx.get('expected_tags')}"
        elif err["type"] == "union_tag_not_found":
            message = "needs a kind: one of " + ", ".join(repr(variant_tag(m)) for m in models)
        else:
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] != "missing" and not isinstance(err["input"], dict):
                message += f" (got {err['input']!r}{_strict_hint(err['type'], err['input'])})"
        problems.append((loc, message))
    return problems


def _strict_hint(error_type: str, value: Any) -> str:
    """Why a value YAML reads as another type is not taken as a number."""
    if error_type not in ("int_type", "float_type"):
        return ""
    if isinstance(value, bool):
        return ": a boolean, not a number"
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
        kind = "int" if error_type == "int_type" else "float"
        return f": a quoted number is a string; write it without quotes (`pulumi config set --path`: add --type {kind})"
    return ""


def field_shape(annotation: Any) -> tuple[Literal["section", "map", "list", "leaf"], tuple[type[BaseModel], ...]]:
    """What a field holds: a section (one model, or a union of models told apart by `kind`), a map of names to
    sections, a list of sections, or a leaf value; with the section models. The spec reference and the error
    messages both walk the spec by it."""
    models = _models(annotation)
    if models:
        return "section", models
    annotation = _strip(annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is dict and (models := _models(args[1])):
        return "map", models
    if origin is list and (models := _models(args[0])):
        return "list", models
    return "leaf", ()


def variant_tag(model: type[BaseModel]) -> str | None:
    """The `kind` that selects this model in a union of sections."""
    field = model.model_fields.get("kind")
    return field.default if field is not None and isinstance(field.default, str) else None


def _strip(annotation: Any) -> Any:
    """The annotation without Annotated metadata and without `| None`."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation):
            rest = tuple(a for a in get_args(annotation) if a is not type(None))
            annotation = rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007 (a runtime union of members)
        else:
            return annotation


def _models(annotation: Any) -> tuple[type[BaseModel], ...]:
    annotation = _strip(annotation)
    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    models = tuple(_strip(m) for m in members)
    if all(isinstance(m, type) and issubclass(m, BaseModel) for m in models):
        return models
    return ()


def _resolve(
    loc: tuple[Any, ...], root: type[BaseModel]
) -> tuple[tuple[Any, ...], tuple[type[BaseModel], ...], tuple[type[BaseModel], ...]]:
    """Pydantic's error location as the key path the user typed (union tags and validator names dropped, told
    apart from keys by the spec's structure), the sections that may hold its last key, and those it may be."""
    path: list[Any] = []
    shape, models = "section", (root,)
    holders: tuple[type[BaseModel], ...] = ()
    for part in loc:
        if shape in ("map", "list"):  # a name the user chose, or a list index
            path.append(part)
            shape, holders = "section", ()
            continue
        if isinstance(part, str) and part.startswith("function-"):
            continue
        if shape == "section" and len(models) > 1:
            tagged = tuple(m for m in models if variant_tag(m) == part)
            if tagged:
                models = tagged
                continue
        path.append(part)
        holders = models if shape == "section" else ()
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        shape, models = field_shape(field.annotation) if field is not None else ("leaf", ())
    return tuple(path), holders, models


def _allowed_keys(key: str, holders: tuple[type[BaseModel], ...]) -> str:
    """For an unknown key, the closest key its section allows and all of them."""
    if len(holders) != 1:
        return ""
    fields = list(holders[0].model_fields)
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint}; allowed here: {', '.join(fields)}"


def parse_spec(data: Any, source: str) -> PlatformSpec:
    """Validate plain data (the value of `loopform:platform`) or raise SpecError."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"{CONFIG_KEY}: must be a mapping of sections, got {type(data).__name__}"])
    try:
        return PlatformSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(source, _problems(error)) from None


def read_stack_file(path: Path) -> dict[str, Any]:
    """The parsed stack file, or SpecError naming what is wrong with it."""
    source = str(path)
    if not path.exists():
        raise SpecError(source, ["file not found"])
    try:
        # libyaml's safe loader where PyYAML has it: the same documents, several times faster on a large stack.
        document = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as error:
        raise SpecError(source, [f"not valid YAML: {error}"]) from None
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise SpecError(source, ["a Pulumi stack file needs a top-level 'config' mapping"])
    return document


def load_stack(path: Path, root: Path | None = None) -> PlatformSpec:
    """The spec in a Pulumi stack file (`config: {loopform:platform: ...}`).

    With `root`, the model folders it names are checked in that repository too.
    """
    config = read_stack_file(path)["config"]
    if CONFIG_KEY not in config:
        raise SpecError(str(path), [f"config has no key {CONFIG_KEY!r}"])
    spec = parse_spec(config[CONFIG_KEY], str(path))
    stack = _STACK_FILE.match(path.name)
    if stack and stack.group(1) != spec.environment:
        raise SpecError(
            str(path),
            [f"{CONFIG_KEY}.environment: is {spec.environment!r} but this is the stack file of {stack.group(1)!r}"],
        )
    if root is not None:
        check_repository(spec, root, str(path))
    return spec


_STACK_FILE = re.compile(r"^Pulumi\.([^.]+)\.yaml$")


def check_repository(spec: PlatformSpec, root: Path, source: str) -> None:
    """Each model's folder supplies the model interface with a contract of that model, and a regressor has
    a max_rmse gate; each signature key has its public key."""
    from loopform.model_code import ModelCode, ModelCodeError

    problems = []
    for name, model in sorted(spec.models.items()):
        code = ModelCode(name, root, model.path)
        missing = code.missing()
        if missing:
            problems.append(
                f"{CONFIG_KEY}.models.{name}.path: {model.path!r} has no {', '.join(missing)} (a model folder holds "
                f"contract.py, model.py, train.py and data.py, relative to {root}; `loopform new model` writes one)"
            )
            continue
        try:
            contract = code.contract
        except (ModelCodeError, ValueError, ImportError) as error:
            problems.append(f"{CONFIG_KEY}.models.{name}.path: {error}")
            continue
        if contract.task == "regression" and spec.gates_for(name).max_rmse is None:
            problems.append(
                f"{CONFIG_KEY}.models.{name}.gates.max_rmse: required for a regressor ({model.path}/contract.py "
                f"declares task regression): the most holdout RMSE, in {contract.label}'s unit, a release may have"
            )
    if spec.gitops.enabled:
        for key_id in spec.gitops.signature_keys:
            if not (root / spec.gitops.public_keys / f"{key_id}.asc").is_file():
                problems.append(
                    f"{CONFIG_KEY}.gitops.signature_keys: key {key_id} has no public key at "
                    f"{spec.gitops.public_keys}/{key_id}.asc (export it with `gpg --export --armor {key_id}`)"
                )
    if problems:
        raise SpecError(source, problems)


def stack_file(stack: str, root: Path | None = None) -> Path:
    """Where stack config lives (Pulumi.yaml sets stackConfigDir: stacks)."""
    return (root or repo_root()) / "stacks" / f"Pulumi.{stack}.yaml"


ROOT_ENV = "LOOPFORM_ROOT"


PROJECT_FILE = "Pulumi.yaml"


class ProjectNotFound(Exception):
    """Run outside a loopform project, with no --root or $LOOPFORM_ROOT."""


def repo_root(start: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The project (stacks/, models/) loopform works on: $LOOPFORM_ROOT when set (an image), else the nearest
    folder at or above `start` (the current directory) holding Pulumi.yaml, as pulumi finds its project.

    Never the checkout loopform was installed from: run from a copy of the repository, it reads the copy.
    """
    import os

    environ = os.environ if environ is None else environ
    if environ.get(ROOT_ENV):
        return Path(environ[ROOT_ENV])
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PROJECT_FILE).is_file():
            return folder
    raise ProjectNotFound(
        f"{here} is not inside a loopform project (no {PROJECT_FILE} here or in any folder above): run loopform "
        f"in your project, or name it with --root or ${ROOT_ENV}"
    )


def load_from_pulumi_config(root: Path) -> PlatformSpec:
    """The spec of the running Pulumi stack, checked against the repository at `root`."""
    import pulumi

    config = pulumi.Config("loopform")
    raw = config.get(CONFIG_KEY.split(":", 1)[1])
    stack = pulumi.get_stack()
    source = f"stacks/Pulumi.{stack}.yaml"
    if raw is None:
        raise SpecError(source, [f"config has no key {CONFIG_KEY!r}"])
    spec = parse_spec(json.loads(raw), source)
    if spec.environment != stack:
        raise SpecError(source, [f"{CONFIG_KEY}.environment: is {spec.environment!r} but the stack is {stack!r}"])
    check_repository(spec, root, source)
    return spec
