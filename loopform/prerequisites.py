"""What the cluster (and the cloud account) must already have before `pulumi up`.

Derived from the spec alone, so `loopform render` prints it, the README's deploy section is
generated from it, `loopform doctor` checks it against a live cluster, and a test proves
that every object a rendered manifest references is either created by the program or
listed here. Pure functions of the spec: no Pulumi, no cluster.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from loopform import identity
from loopform.spec import (
    ExternalDatabase,
    ExternalRedis,
    InClusterPostgres,
    InClusterRedis,
    IrsaIdentity,
    KarpenterPool,
    PlatformSpec,
    PodIdentity,
    StaticKeys,
)

Kind = Literal[
    "crd",
    "api-service",
    "storage-class",
    "namespace",
    "daemonset",
    "iam-role",
    "iam-oidc-provider",
    "pod-identity-association",
    "bucket",
    "bucket-policy",
    "aws-tag",
    "secret-config",
]

#: Where a prerequisite can be checked: with the kubeconfig, with AWS credentials, or in Pulumi config.
CLUSTER_KINDS = frozenset({"crd", "api-service", "storage-class", "namespace", "daemonset"})
AWS_KINDS = frozenset(
    {"iam-role", "iam-oidc-provider", "pod-identity-association", "bucket", "bucket-policy", "aws-tag"}
)

DEFAULT_STORAGE_CLASS = "(default)"
METRICS_API = "v1beta1.metrics.k8s.io"
KARPENTER_CRDS = ("nodepools.karpenter.sh", "ec2nodeclasses.karpenter.k8s.aws")
SERVICE_MONITOR_CRD = "servicemonitors.monitoring.coreos.com"
PROMETHEUS_RULE_CRD = "prometheusrules.monitoring.coreos.com"
ALERTMANAGER_CONFIG_CRD = "alertmanagerconfigs.monitoring.coreos.com"
POD_IDENTITY_AGENT = "eks-pod-identity-agent"
#: Namespaces every Kubernetes cluster has.
BUILTIN_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})

DB_PASSWORD_CONFIG = "registryDbPassword"
REDIS_PASSWORD_CONFIG = "redisPassword"


@dataclass(frozen=True, order=True)
class Prerequisite:
    """One thing that must exist before `pulumi up`: what, where, who needs it, how to make it."""

    kind: Kind
    name: str
    namespace: str | None = None
    why: str = ""
    fix: str = ""

    @property
    def checked_in(self) -> Literal["cluster", "aws", "pulumi"]:
        if self.kind in CLUSTER_KINDS:
            return "cluster"
        return "aws" if self.kind in AWS_KINDS else "pulumi"

    @property
    def key(self) -> tuple[str, str | None, str]:
        return (self.kind, self.namespace, self.name)

    def line(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {where}{self.name}: {self.why}"


def prerequisites(spec: PlatformSpec) -> list[Prerequisite]:
    """Everything the spec's platform needs and does not create, sorted by kind and name."""
    if spec.is_local:
        return []
    found: dict[tuple[str, str | None, str], Prerequisite] = {}
    for item in (
        *_crds(spec),
        *_cluster_services(spec),
        *_identity(spec),
        *_buckets(spec),
        *_karpenter(spec),
        *_secret_config(spec),
    ):
        found.setdefault(item.key, item)
    return sorted(found.values())


def _crds(spec: PlatformSpec) -> Iterable[Prerequisite]:
    karpenter = sorted(name for name, pool in spec.gpu.pools.items() if isinstance(pool, KarpenterPool))
    for crd in KARPENTER_CRDS if karpenter else ():
        yield Prerequisite(
            "crd",
            crd,
            why=f"Karpenter v1, for the karpenter pools ({', '.join(f'gpu.pools.{p}' for p in karpenter)})",
            fix="install Karpenter v1 with its CRDs: https://karpenter.sh/docs/getting-started/",
        )
    if not spec.cluster.shared_addons:
        for crd in _shared_crds(spec):
            yield Prerequisite(
                "crd",
                crd,
                why="cluster.shared_addons is off: the stack that has it on installs the Argo CRDs",
                fix="pulumi up the stack whose spec sets cluster.shared_addons: true first",
            )
    operator_crds = {
        SERVICE_MONITOR_CRD: "ServiceMonitors",
        PROMETHEUS_RULE_CRD: "the drift alerts' PrometheusRules",
        ALERTMANAGER_CONFIG_CRD: "the AlertmanagerConfig routing drift alerts to retraining",
    }
    # Installed by this stack's kube-prometheus-stack only where it installs shared add-ons (CRDs are cluster-wide).
    installed_here = spec.monitoring.install_prometheus_stack and spec.cluster.shared_addons
    for crd, what in operator_crds.items() if spec.monitoring.operator and not installed_here else ():
        yield Prerequisite(
            "crd",
            crd,
            why=f"monitoring.prometheus_operator is on: the platform declares {what}",
            fix="install the Prometheus Operator (e.g. the kube-prometheus-stack chart), "
            "or set monitoring.prometheus_operator: false",
        )


def _shared_crds(spec: PlatformSpec) -> list[str]:
    """The Argo CRDs this stack's objects need (WorkflowTemplate, CronWorkflow; AppProject, Application; the
    Argo Events kinds of the retraining route)."""
    crds = ["workflowtemplates.argoproj.io"]
    if any(model.training.schedule for model in spec.models.values()):
        crds.append("cronworkflows.argoproj.io")
    if spec.gitops.enabled:
        crds += ["appprojects.argoproj.io", "applications.argoproj.io"]
    if spec.monitoring.operator:  # the retraining route: Argo Events' EventBus, EventSource and Sensors
        crds += ["eventbus.argoproj.io", "eventsources.argoproj.io", "sensors.argoproj.io"]
    return crds


def _cluster_services(spec: PlatformSpec) -> Iterable[Prerequisite]:
    stateful = [
        what
        for what, in_cluster in (
            ("registry.backend (PostgreSQL)", isinstance(spec.registry.backend, InClusterPostgres)),
            ("feature_store.online_store (Redis)", isinstance(spec.feature_store.online_store, InClusterRedis)),
        )
        if in_cluster
    ]
    if stateful:
        name = spec.cluster.storage_class or DEFAULT_STORAGE_CLASS
        yield Prerequisite(
            "storage-class",
            name,
            why=f"volumes of {', '.join(stateful)}; its provisioner must run (on EKS: the EBS CSI driver add-on) "
            "and allowVolumeExpansion be true, so volumes grow in place",
            fix=(
                "aws eks create-addon --cluster-name <cluster> --addon-name aws-ebs-csi-driver; then make a "
                "StorageClass the default (provisioner ebs.csi.aws.com, annotation "
                'storageclass.kubernetes.io/is-default-class: "true"), or set cluster.storage_class'
                if name == DEFAULT_STORAGE_CLASS
                else f"create StorageClass {name} (provisioner ebs.csi.aws.com on EKS) or set cluster.storage_class"
            ),
        )
    if spec.models:
        yield Prerequisite(
            "api-service",
            METRICS_API,
            why="HorizontalPodAutoscalers of the model services scale on CPU from metrics-server",
            fix="aws eks create-addon --cluster-name <cluster> --addon-name metrics-server "
            "(or: helm install metrics-server metrics-server/metrics-server -n kube-system)",
        )
    if spec.gpu.pools and spec.gpu.namespace not in _created_namespaces(spec):
        yield Prerequisite(
            "namespace",
            spec.gpu.namespace,
            why="gpu.namespace: the NVIDIA device plugin and DCGM exporter run there (privileged pods)",
            fix=f"kubectl create namespace {spec.gpu.namespace}",
        )


def _created_namespaces(spec: PlatformSpec) -> set[str]:
    return set(spec.cluster.namespaces.model_dump().values()) | BUILTIN_NAMESPACES


def _identity(spec: PlatformSpec) -> Iterable[Prerequisite]:
    chosen = spec.cluster.identity
    workloads = identity.workloads(spec)
    if isinstance(chosen, IrsaIdentity):
        yield Prerequisite(
            "iam-oidc-provider",
            "the cluster's OIDC issuer",
            why="cluster.identity is irsa: roles trust ServiceAccount tokens through it",
            fix="eksctl utils associate-iam-oidc-provider --cluster <cluster> --approve",
        )
        for workload in workloads.values():
            arn = identity.role_arn(spec, workload.name)
            yield Prerequisite(
                "iam-role",
                str(arn),
                why=f"{workload.what}: trust {workload.subject} (sts:AssumeRoleWithWebIdentity), "
                f"allow {_access(spec, workload.name)}",
                fix=f"aws iam get-role --role-name {str(arn).rsplit('/', 1)[-1]}",
            )
    elif isinstance(chosen, PodIdentity):
        yield Prerequisite(
            "daemonset",
            POD_IDENTITY_AGENT,
            namespace="kube-system",
            why="cluster.identity is pod-identity: the agent hands pods their role's credentials",
            fix=f"aws eks create-addon --cluster-name {chosen.cluster_name} --addon-name {POD_IDENTITY_AGENT}",
        )
        for workload in workloads.values():
            arn = identity.role_arn(spec, workload.name)
            yield Prerequisite(
                "pod-identity-association",
                f"{workload.namespace}/{workload.service_account}",
                why=f"{workload.what} runs as this ServiceAccount and needs role {arn} (trusting "
                f"pods.eks.amazonaws.com) that allows {_access(spec, workload.name)}",
                fix=f"aws eks create-pod-identity-association --cluster-name {chosen.cluster_name} "
                f"--namespace {workload.namespace} --service-account {workload.service_account} --role-arn {arn}",
            )


def _access(spec: PlatformSpec, workload: identity.WorkloadName) -> str:
    """The object-store access a workload's role needs."""
    artifacts, offline = spec.registry.artifacts.uri, spec.feature_store.offline_store.data_uri
    payload = spec.monitoring.payload_uri
    bucket = artifacts.removeprefix("s3://").split("/", 1)[0]
    needs: dict[identity.WorkloadName, str] = {
        "registry": f"Get/Put/List on {artifacts} and the schema backups in s3://{bucket}/loopform-backups/mlflow/",
        "feature_store": f"Get/Put/List on {offline} (read)",
        "pipelines": f"Get/Put/List on {offline}, {artifacts}, s3://{spec.orchestrator.artifact_repository.bucket}",
        "serving": f"Get/Put/List on {artifacts} (read), {payload}",
        # It only reads: the payload log, and the reference data among the MLflow artifacts.
        "monitor": f"Get/List on {payload}, {artifacts}",
    }
    return f"s3 {needs[workload]}"


def _buckets(spec: PlatformSpec) -> Iterable[Prerequisite]:
    by_bucket: dict[str, list[str]] = {}
    for key, uri in spec.bucket_uris().items():
        if uri.startswith("s3://"):
            by_bucket.setdefault(uri.removeprefix("s3://").split("/", 1)[0], []).append(key)
    for bucket, keys in sorted(by_bucket.items()):
        yield Prerequisite(
            "bucket",
            bucket,
            why=f"object storage of {', '.join(sorted(keys))}",
            fix=f"aws s3api head-bucket --bucket {bucket} (create it: aws s3 mb s3://{bucket})",
        )
    yield from _payload_bucket_policy(spec)


def _payload_bucket_policy(spec: PlatformSpec) -> Iterable[Prerequisite]:
    """The payload log holds entity ids and amounts: its objects expire, are encrypted at rest and never public
    (docs/payload-log.md). The platform does not own the bucket, so the rule is a prerequisite."""
    uri = spec.monitoring.payload_uri
    if not uri.startswith("s3://"):
        return
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    days = spec.monitoring.payload_retention_days
    lifecycle = {
        "Rules": [
            {
                "ID": "loopform-payload-retention",
                "Filter": {"Prefix": f"{prefix.rstrip('/')}/" if prefix else ""},
                "Status": "Enabled",
                "Expiration": {"Days": days},
            }
        ]
    }
    encryption = {
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"}, "BucketKeyEnabled": True}]
    }
    yield Prerequisite(
        "bucket-policy",
        f"{bucket}/{prefix}",
        why=f"the payload log (entity ids, amounts) expires after {days} days (monitoring.payload_retention_days), "
        "is encrypted with a KMS key and is never public",
        fix=f"aws s3api put-bucket-lifecycle-configuration --bucket {bucket} --lifecycle-configuration "
        f"'{_compact(lifecycle)}' && aws s3api put-bucket-encryption --bucket {bucket} "
        f"--server-side-encryption-configuration '{_compact(encryption)}' "
        f"&& aws s3api put-public-access-block --bucket {bucket} --public-access-block-configuration "
        "BlockPublicAcls=true,IgnorePublicAcls=true,BlockPublicPolicy=true,RestrictPublicBuckets=true",
    )


def _compact(document: dict[str, Any]) -> str:
    """A JSON argument of an `aws` command, on one line."""
    return json.dumps(document, separators=(",", ":"))


def _karpenter(spec: PlatformSpec) -> Iterable[Prerequisite]:
    for name, pool in sorted(spec.gpu.pools.items()):
        if not isinstance(pool, KarpenterPool):
            continue
        node_class = pool.node_class
        yield Prerequisite(
            "iam-role",
            node_class.role,
            why=f"gpu.pools.{name}.node_class.role: the instance role of the pool's nodes, "
            "with an EKS access entry (type EC2_LINUX)",
            fix=f"aws iam get-role --role-name {node_class.role}",
        )
        yield Prerequisite(
            "aws-tag",
            f"karpenter.sh/discovery={node_class.discovery_tag}",
            why=f"gpu.pools.{name}.node_class.discovery_tag: on the subnets and security groups nodes launch into",
            fix=f"aws ec2 describe-subnets --filters Name=tag:karpenter.sh/discovery,Values={node_class.discovery_tag}",
        )


def _secret_config(spec: PlatformSpec) -> Iterable[Prerequisite]:
    backend = spec.registry.backend
    if isinstance(backend, InClusterPostgres | ExternalDatabase):
        where = (
            "in-cluster PostgreSQL"
            if isinstance(backend, InClusterPostgres)
            else f"database at {backend.host} (user {backend.user} needs CREATEROLE and CREATEDB: a Job makes "
            f"Feast's registry role and database with it)"
        )
        yield Prerequisite(
            "secret-config",
            f"loopform:{DB_PASSWORD_CONFIG}",
            why=f"password of the MLflow {where}",
            fix=f'pulumi config set --secret loopform:{DB_PASSWORD_CONFIG} "$(openssl rand -hex 24)"'
            if isinstance(backend, InClusterPostgres)
            else f"pulumi config set --secret loopform:{DB_PASSWORD_CONFIG} <the database user's password>",
        )
    online = spec.feature_store.online_store
    if isinstance(online, ExternalRedis) and online.auth:
        yield Prerequisite(
            "secret-config",
            f"loopform:{REDIS_PASSWORD_CONFIG}",
            why=f"AUTH password of Redis at {online.host}",
            fix=f"pulumi config set --secret loopform:{REDIS_PASSWORD_CONFIG} <the Redis AUTH token>",
        )
    if isinstance(spec.cluster.identity, StaticKeys):
        for key in (identity.ACCESS_KEY_CONFIG, identity.SECRET_KEY_CONFIG):
            yield Prerequisite(
                "secret-config",
                f"loopform:{key}",
                why="cluster.identity is static-keys: the object-store key the program puts in its Secret",
                fix=f"pulumi config set --secret loopform:{key} <value>",
            )


def report(spec: PlatformSpec) -> str:
    """The prerequisites as Markdown-friendly text, grouped by where they are checked."""
    items = prerequisites(spec)
    if not items:
        return f"Stack {spec.environment}: no prerequisites (it runs no cluster objects).\n"
    titles = {
        "cluster": "In the cluster (`loopform doctor` checks these with your kubeconfig)",
        "aws": "In the AWS account",
        "pulumi": "In the stack's secret config",
    }
    lines = [f"Prerequisites of stack {spec.environment} (the program does not create these):"]
    for where, title in titles.items():
        group = [item for item in items if item.checked_in == where]
        if not group:
            continue
        lines.append(f"\n{title}:")
        lines.extend(f"- {item.line()}\n  fix: {item.fix}" for item in group)
    return "\n".join(lines) + "\n"
