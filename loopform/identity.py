"""Who each workload is, and how it reaches object storage.

One table of workloads (namespace, ServiceAccount, role key) that the components, the
prerequisites report and `loopform doctor` all read, so the ServiceAccount an IAM role must
trust and the one a pod runs as cannot differ. Pure functions of the spec: no Pulumi here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from loopform.spec import IrsaIdentity, PlatformSpec, PodIdentity, StaticKeys

WorkloadName = Literal["registry", "feature_store", "pipelines", "serving", "monitor"]

#: Pulumi secret config keys of the static-keys alternative.
ACCESS_KEY_CONFIG = "objectStoreAccessKeyId"
SECRET_KEY_CONFIG = "objectStoreSecretAccessKey"
#: Keys of the static-keys Secret: what the AWS SDKs (boto3, s3fs, Argo's executor) read.
ACCESS_KEY = "AWS_ACCESS_KEY_ID"
SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"

MLFLOW_ACCOUNT = "loopform-mlflow"
FEAST_ACCOUNT = "loopform-feast"
RUNNER_ACCOUNT = "loopform-pipeline-runner"
SERVING_ACCOUNT = "loopform-model-service"
#: One account for every model's drift monitor: they share the monitor role.
MONITOR_ACCOUNT = "loopform-drift-monitor"


@dataclass(frozen=True)
class Workload:
    """A workload that reads or writes object storage, and the ServiceAccount it runs as."""

    name: WorkloadName
    namespace: str
    service_account: str
    what: str

    @property
    def subject(self) -> str:
        """The subject an IAM role's trust policy names for IRSA."""
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def workloads(spec: PlatformSpec) -> dict[WorkloadName, Workload]:
    namespaces = spec.cluster.namespaces
    return {
        "registry": Workload("registry", namespaces.platform, MLFLOW_ACCOUNT, "MLflow server and migration"),
        "feature_store": Workload(
            "feature_store", namespaces.platform, FEAST_ACCOUNT, "Feast apply, feature server and materialisation"
        ),
        "pipelines": Workload("pipelines", namespaces.pipelines, RUNNER_ACCOUNT, "pipeline steps (Argo Workflows)"),
        "serving": Workload("serving", namespaces.serving, SERVING_ACCOUNT, "BentoML model services"),
        "monitor": Workload("monitor", namespaces.monitoring, MONITOR_ACCOUNT, "drift monitors (`loopform monitor`)"),
    }


def role_arn(spec: PlatformSpec, workload: WorkloadName) -> str | None:
    identity = spec.cluster.identity
    if isinstance(identity, IrsaIdentity | PodIdentity):
        return str(getattr(identity.roles, workload))
    return None


def account_annotations(spec: PlatformSpec, workload: WorkloadName) -> dict[str, str]:
    """Annotations of a workload's ServiceAccount: the IRSA role, where IRSA is the identity."""
    if isinstance(spec.cluster.identity, IrsaIdentity):
        return {IRSA_ANNOTATION: str(getattr(spec.cluster.identity.roles, workload))}
    return {}


def static_keys_secret(spec: PlatformSpec) -> str | None:
    """Name of the static-keys Secret, or None when workloads use a workload identity."""
    identity = spec.cluster.identity
    return identity.secret_name if isinstance(identity, StaticKeys) else None


def credentials_env_from(spec: PlatformSpec) -> list[dict[str, Any]]:
    """`envFrom` of a container that talks to object storage: the static keys, if that is the identity."""
    secret = static_keys_secret(spec)
    return [{"secretRef": {"name": secret}}] if secret else []


def static_keys_namespaces(spec: PlatformSpec) -> list[str]:
    """Every namespace whose workloads read the static keys (the Secret is created in each)."""
    return sorted({w.namespace for w in workloads(spec).values()})
