"""GitOps: Argo CD, an AppProject fenced to the serving namespace and repository, and the
Application that keeps this environment's model services in sync with git.

Pulumi's Helm chart resource does not run Helm hooks. The argo-cd chart has one that
matters: a pre-install Job (`redisSecretInit`) that runs `argocd admin redis-initial-password`
to create the `argocd-redis` Secret every Argo CD pod reads its Redis password from. Here the
hook is switched off and the Secret is declared directly, as the chart documents for
`redisSecretInit.enabled: false`, with a password derived from the platform's root secret:
no Job, and no account left holding `create secrets` in the namespace once it has run. The
Secret exists before the chart's pods, and a checksum of the password in every Argo CD pod's
annotations rolls them all (Redis included) when it rotates, so no pod keeps the old one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
from pulumi_kubernetes.apiextensions import CustomResource
from pulumi_kubernetes.helm.v4 import Chart, ChartArgs, RepositoryOptsArgs

from components import common, secrets
from components.orchestrator import chart_verification
from loopform.spec import GitOpsSpec, Namespaces, RetryPolicy

ARGO_HELM_REPO = "https://argoproj.github.io/argo-helm"
IN_CLUSTER = "https://kubernetes.default.svc"
REDIS_SECRET = "argocd-redis"
#: The key of `argocd-redis` the chart's pods read (`argocd admin redis-initial-password` writes the same).
REDIS_SECRET_KEY = "auth"
REDIS_PASSWORD_CHECKSUM = "loopform.dev/redis-password-checksum"
RELEASES_ANNOTATION = "loopform.dev/releases"

#: Kinds a model service consists of (ModelService component); the AppProject allows only these.
SERVICE_KINDS: tuple[tuple[str, str], ...] = (
    ("apps", "Deployment"),
    ("", "Service"),
    ("", "ConfigMap"),
    ("", "ServiceAccount"),
    ("autoscaling", "HorizontalPodAutoscaler"),
    ("policy", "PodDisruptionBudget"),
    ("monitoring.coreos.com", "ServiceMonitor"),
)

#: Argo CD image of the default chart version (argo-cd chart 10.1.3 ships v3.4.5; v3.4.9 is that line's latest
#: patch). Not 2.14: past its support, and affected by CVE-2026-45738, fixed only in 3.x (loopform/advisories.py).
DEFAULT_ARGOCD_IMAGE = GitOpsSpec().argocd_image


def project_name(environment: str) -> str:
    return f"loopform-{environment}"


def application_name(environment: str) -> str:
    return f"loopform-serving-{environment}"


def application_path(spec: GitOpsSpec, environment: str) -> str:
    """Folder of this environment's rendered model-service manifests: `<gitops.path>/<environment>`."""
    return f"{spec.path.rstrip('/')}/{environment}"


def argocd_values(
    argocd_image: str,
    install_crds: bool = True,
    gpg_keys: Mapping[str, str] | None = None,
    redis_password_checksum: pulumi.Input[str] = "",
) -> dict[str, Any]:
    """argo-cd chart values: the redis-secret-init hook is off, its Secret declared here (see module doc)."""
    return {
        # Only the stack with cluster.shared_addons installs the CRDs. keep false: with `keep` the chart marks
        # them helm.sh/resource-policy: keep, Chart v4 retains them on destroy, and the next `up` then fails
        # with AlreadyExists (pulumi-kubernetes >= 4.29 creates rather than upserts).
        "crds": {"install": install_crds, "keep": False},
        # The chart's own NetworkPolicies (one per component) and a default deny of ingress: no pod of another
        # namespace reaches the repo-server or the Redis cache (components/network.py adds egress rules).
        "global": {
            # Every component's image; pinned, the digest follows the tag, which the chart appends to the repository.
            "image": common.chart_image(argocd_image),
            "networkPolicy": {"create": True, "defaultDenyIngress": True},
            # Every Argo CD pod reads the Redis password at start: a new one restarts them all together.
            "podAnnotations": {REDIS_PASSWORD_CHECKSUM: redis_password_checksum},
        },
        "redisSecretInit": {"enabled": False},
        # No SSO is configured, so Dex would only be an idle attack surface.
        "dex": {"enabled": False},
        # The release keys the AppProject's signatureKeys name (argocd-gpg-keys-cm).
        "configs": {"gpg": {"keys": dict(gpg_keys or {})}},
    }


def app_project_spec(spec: GitOpsSpec, namespaces: Namespaces, kinds: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """An AppProject that may only deploy the listed kinds, from the spec's repository, into the serving namespace,
    and (with signature keys) only from commits signed by a release key."""
    project: dict[str, Any] = {
        "description": "Model services released by loopform",
        "sourceRepos": [spec.repo_url],
        "destinations": [{"server": IN_CLUSTER, "namespace": namespaces.serving}],
        "clusterResourceWhitelist": [],
        "namespaceResourceWhitelist": [{"group": group, "kind": kind} for group, kind in kinds],
    }
    if spec.signature_keys:
        project["signatureKeys"] = [{"keyID": key_id} for key_id in spec.signature_keys]
    return project


def public_keys(spec: GitOpsSpec, root: Path) -> dict[str, str]:
    """The release keys' ASCII-armored public keys, by key id, as the chart's `configs.gpg.keys` takes them."""
    return {key_id: (root / spec.public_keys / f"{key_id}.asc").read_text() for key_id in spec.signature_keys}


def releases_annotation(releases: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The signed records of the services the Application syncs: what the policy pack judges on this road."""
    if not releases:
        return {}
    return {RELEASES_ANNOTATION: json.dumps(dict(releases), sort_keys=True, separators=(",", ":"))}


def application_spec(spec: GitOpsSpec, environment: str, namespaces: Namespaces, retry: RetryPolicy) -> dict[str, Any]:
    """The environment's Application: automated sync with prune, self-heal and retry."""
    return {
        "project": project_name(environment),
        "source": {
            "repoURL": spec.repo_url,
            "targetRevision": spec.target_revision,
            "path": application_path(spec, environment),
        },
        "destination": {"server": IN_CLUSTER, "namespace": namespaces.serving},
        "syncPolicy": {
            "automated": {"prune": True, "selfHeal": True},
            "syncOptions": ["PrunePropagationPolicy=foreground", "PruneLast=true"],
            "retry": {
                "limit": retry.limit,
                "backoff": {"duration": retry.backoff, "factor": retry.factor, "maxDuration": retry.max_backoff},
            },
        },
    }


@dataclass(frozen=True, kw_only=True)
class GitOpsArgs:
    """Inputs of GitOps."""

    spec: GitOpsSpec
    """gitops section: chart version, repository, revision and manifest path."""
    environment: str
    """Environment whose Application this stack declares (`<gitops.path>/<environment>`)."""
    namespaces: Namespaces
    """Argo CD runs in `gitops`; the Application deploys into `serving`."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Common labels added to every object."""
    redis_password: pulumi.Input[str]
    """Password of Argo CD's Redis cache (the `argocd-redis` Secret's `auth`); rotating it restarts Argo CD."""
    argocd_image: str = DEFAULT_ARGOCD_IMAGE
    """Argo CD image of every Argo CD component (repository:tag, with its digest where pinned)."""
    sync_retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(limit=5, backoff="10s", factor=2, max_backoff="3m")
    )
    """Retry of failed syncs."""
    service_kinds: Sequence[tuple[str, str]] = SERVICE_KINDS
    """(API group, kind) pairs the AppProject lets the Application deploy."""
    install_crds: bool = True
    """Install the Argo CD CRDs (cluster.shared_addons: one stack per cluster does)."""
    gpg_keys: Mapping[str, str] = field(default_factory=dict)
    """Release keys' armored public keys by key id (`public_keys`), imported for commit verification."""
    releases: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Signed release record of each model the Application syncs, for the policy pack."""


class GitOps(pulumi.ComponentResource):
    """Argo CD from its chart, the AppProject and this environment's Application."""

    namespace: pulumi.Output[str]
    project_name: pulumi.Output[str]
    application_name: pulumi.Output[str]
    application_path: pulumi.Output[str]

    def __init__(self, name: str, args: GitOpsArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loopform:gitops:GitOps", name, None, opts)
        spec = args.spec
        namespace = args.namespaces.gitops
        base_labels = dict(args.labels)

        redis_secret = k8s.core.v1.Secret(
            f"{name}-redis-password",
            metadata=common.metadata(REDIS_SECRET, namespace, common.labels("argocd-redis", name, base_labels)),
            type="Opaque",
            string_data={REDIS_SECRET_KEY: pulumi.Output.secret(args.redis_password)},
            opts=common.child(self),
        )

        chart = Chart(
            f"{name}-argo-cd",
            ChartArgs(
                chart="argo-cd",
                version=spec.chart_version,
                namespace=namespace,
                repository_opts=RepositoryOptsArgs(repo=ARGO_HELM_REPO),
                values=argocd_values(
                    args.argocd_image,
                    args.install_crds,
                    args.gpg_keys,
                    secrets.checksum(args.redis_password, "argocd-redis"),
                ),
                **chart_verification(spec.chart_keyring),
            ),
            opts=common.child(self, depends_on=[redis_secret]),
        )

        gitops_labels = common.labels("gitops", name, base_labels)
        project = CustomResource(
            f"{name}-project",
            api_version="argoproj.io/v1alpha1",
            kind="AppProject",
            metadata=common.metadata(project_name(args.environment), namespace, gitops_labels),
            spec=app_project_spec(spec, args.namespaces, args.service_kinds),
            opts=common.child(self, depends_on=[chart]),
        )
        application_metadata = common.metadata(
            application_name(args.environment), namespace, gitops_labels, releases_annotation(args.releases)
        )
        # Deleting the Application deletes the services it deployed (cascading), not only the record.
        application_metadata["finalizers"] = ["resources-finalizer.argocd.argoproj.io"]
        CustomResource(
            f"{name}-application",
            api_version="argoproj.io/v1alpha1",
            kind="Application",
            metadata=application_metadata,
            spec=application_spec(spec, args.environment, args.namespaces, args.sync_retry),
            opts=common.child(self, depends_on=[chart, project]),
        )

        self.namespace = pulumi.Output.from_input(namespace)
        self.project_name = pulumi.Output.from_input(project_name(args.environment))
        self.application_name = pulumi.Output.from_input(application_name(args.environment))
        self.application_path = pulumi.Output.from_input(application_path(spec, args.environment))
        self.register_outputs(
            {
                "namespace": self.namespace,
                "project_name": self.project_name,
                "application_name": self.application_name,
                "application_path": self.application_path,
            }
        )
