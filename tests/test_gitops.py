"""GitOps under Pulumi mocks: Argo CD chart, the Secret that replaces its redis-secret-init hook,
the AppProject fence and the environment's Application."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pulumi
import pytest

from components.gitops import DEFAULT_ARGOCD_IMAGE, GitOps, GitOpsArgs, argocd_values
from loopform.render import RenderedResource, render_components
from loopform.spec import GitOpsSpec, PlatformSpec, RetryPolicy, load_stack, stack_file

STACKS = ("dev", "staging", "prod")


def _spec(stack: str) -> PlatformSpec:
    return load_stack(stack_file(stack))


def _args(spec: PlatformSpec, **extra: Any) -> GitOpsArgs:
    return GitOpsArgs(
        spec=spec.gitops,
        environment=spec.environment,
        namespaces=spec.cluster.namespaces,
        labels=spec.cluster.labels,
        **{"redis_password": "argocd-redis-password", **extra},
    )


def _render(args: GitOpsArgs) -> tuple[dict[str, RenderedResource], dict[str, Any]]:
    outputs: dict[str, Any] = {}
    names = ("namespace", "project_name", "application_name", "application_path")

    def run():
        component = GitOps("gitops", args)
        return pulumi.Output.all(*[getattr(component, n) for n in names]).apply(
            lambda values: outputs.update(zip(names, values, strict=True))
        )

    return {r.name: r for r in render_components(run)}, outputs


@pytest.mark.parametrize("stack", STACKS)
def test_gitops_children_names_parents_and_outputs(stack: str) -> None:
    spec = _spec(stack)
    resources, outputs = _render(_args(spec))
    assert set(resources) == {
        "gitops",
        "gitops-redis-password",
        "gitops-argo-cd",
        "gitops-project",
        "gitops-application",
    }
    component = resources["gitops"]
    assert component.type_ == "loopform:gitops:GitOps" and not component.custom
    assert all(r.parent == component.urn for name, r in resources.items() if name != "gitops")
    assert outputs == {
        "namespace": spec.cluster.namespaces.gitops,
        "project_name": f"loopform-{spec.environment}",
        "application_name": f"loopform-serving-{spec.environment}",
        "application_path": f"{spec.gitops.path}/{spec.environment}",
    }

    chart = resources["gitops-argo-cd"].manifest()
    assert chart["chart"] == "argo-cd"
    assert chart["version"] == spec.gitops.chart_version
    assert chart["repositoryOpts"]["repo"] == "https://argoproj.github.io/argo-helm"
    assert chart["namespace"] == spec.cluster.namespaces.gitops


def test_redis_secret_hook_is_replaced_by_a_declared_secret() -> None:
    """The chart's hook is off (Pulumi would never run it); the Secret its pods read is declared before the chart,
    so no Job and no account that may create Secrets is left in the namespace."""
    spec = _spec("dev")
    resources, _ = _render(_args(spec, argocd_image="quay.io/argoproj/argocd:v3.4.8"))
    chart = resources["gitops-argo-cd"]
    values = chart.manifest()["values"]
    assert values["redisSecretInit"] == {"enabled": False}
    assert values["global"]["image"] == {"repository": "quay.io/argoproj/argocd", "tag": "v3.4.8"}
    secret = resources["gitops-redis-password"]
    assert secret.urn in chart.dependencies
    manifest = secret.manifest()
    assert manifest["metadata"]["name"] == "argocd-redis"
    assert manifest["metadata"]["namespace"] == spec.cluster.namespaces.gitops
    assert manifest["stringData"] == {"auth": "<redacted>"}  # a Pulumi secret: state and previews hide it
    assert not [r for r in resources.values() if r.kind in {"Job", "Role", "RoleBinding", "ServiceAccount"}]


def test_a_new_redis_password_restarts_every_argocd_pod() -> None:
    """Argo CD's pods read the password at start: its digest in every pod's annotations rolls them together."""
    spec = _spec("dev")

    def annotation(password: str) -> str:
        resources, _ = _render(_args(spec, redis_password=password))
        annotations = resources["gitops-argo-cd"].manifest()["values"]["global"]["podAnnotations"]
        return annotations["loopform.dev/redis-password-checksum"]

    first = annotation("first-password")
    assert first and "first-password" not in first
    assert annotation("first-password") == first
    assert annotation("second-password") != first


@pytest.mark.parametrize("stack", STACKS)
def test_core_objects_are_valid_kubernetes(stack: str) -> None:
    resources, _ = _render(_args(_spec(stack)))
    core = [
        r for r in resources.values() if r.is_kubernetes_object and not r.type_.startswith("kubernetes:argoproj.io")
    ]
    assert sorted(r.kind for r in core) == ["Secret"]
    for resource in core:
        kubernetes_validate.validate(resource.manifest(), "1.30", strict=True)


@pytest.mark.parametrize("stack", STACKS)
def test_project_is_fenced_to_the_repository_and_serving_namespace(stack: str) -> None:
    spec = _spec(stack)
    resources, _ = _render(_args(spec))
    project = resources["gitops-project"]
    assert project.type_ == "kubernetes:argoproj.io/v1alpha1:AppProject"
    manifest = project.manifest()
    assert manifest["metadata"]["name"] == f"loopform-{spec.environment}"
    assert manifest["metadata"]["namespace"] == spec.cluster.namespaces.gitops
    assert manifest["spec"]["sourceRepos"] == [spec.gitops.repo_url]
    assert manifest["spec"]["destinations"] == [
        {"server": "https://kubernetes.default.svc", "namespace": spec.cluster.namespaces.serving}
    ]
    assert manifest["spec"]["clusterResourceWhitelist"] == []
    kinds = {(k["group"], k["kind"]) for k in manifest["spec"]["namespaceResourceWhitelist"]}
    assert ("apps", "Deployment") in kinds and ("", "Service") in kinds
    assert ("rbac.authorization.k8s.io", "Role") not in kinds
    assert resources["gitops-argo-cd"].urn in project.dependencies


@pytest.mark.parametrize("stack", STACKS)
def test_application_syncs_the_environment_folder_automatically(stack: str) -> None:
    spec = _spec(stack)
    resources, _ = _render(_args(spec))
    application = resources["gitops-application"]
    assert application.type_ == "kubernetes:argoproj.io/v1alpha1:Application"
    manifest = application.manifest()
    assert manifest["metadata"]["name"] == f"loopform-serving-{spec.environment}"
    assert manifest["metadata"]["namespace"] == spec.cluster.namespaces.gitops
    assert manifest["metadata"]["finalizers"] == ["resources-finalizer.argocd.argoproj.io"]
    app = manifest["spec"]
    assert app["project"] == resources["gitops-project"].manifest()["metadata"]["name"]
    assert app["source"] == {
        "repoURL": spec.gitops.repo_url,
        "targetRevision": spec.gitops.target_revision,
        "path": f"deploy/{spec.environment}",
    }
    assert app["destination"] == {
        "server": "https://kubernetes.default.svc",
        "namespace": spec.cluster.namespaces.serving,
    }
    assert app["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
    assert app["syncPolicy"]["retry"] == {
        "limit": 5,
        "backoff": {"duration": "10s", "factor": 2, "maxDuration": "3m"},
    }
    assert {resources["gitops-argo-cd"].urn, resources["gitops-project"].urn} <= set(application.dependencies)


def test_application_follows_spec_path_revision_and_retry() -> None:
    spec = _spec("prod")
    gitops = GitOpsSpec(repo_url="ssh://git@example.com/ml/deploy.git", target_revision="release", path="manifests/")
    resources, outputs = _render(
        GitOpsArgs(
            spec=gitops,
            environment="prod",
            namespaces=spec.cluster.namespaces,
            redis_password="argocd-redis-password",
            sync_retry=RetryPolicy(limit=2, backoff="5s", factor=3, max_backoff="1m"),
        )
    )
    app = resources["gitops-application"].manifest()["spec"]
    assert app["source"] == {"repoURL": gitops.repo_url, "targetRevision": "release", "path": "manifests/prod"}
    assert app["syncPolicy"]["retry"] == {"limit": 2, "backoff": {"duration": "5s", "factor": 3, "maxDuration": "1m"}}
    assert resources["gitops-project"].manifest()["spec"]["sourceRepos"] == [gitops.repo_url]
    assert outputs["application_path"] == "manifests/prod"


def test_the_default_image_is_the_spec_default_and_a_digest_follows_the_tag() -> None:
    """GitOpsArgs without an image runs what the spec defaults to; a pinned image keeps its digest after the tag,
    which the chart appends to the repository (`repository:tag`), so every Argo CD pod runs it by digest."""
    version = GitOpsSpec().argocd_version
    assert argocd_values(DEFAULT_ARGOCD_IMAGE)["global"]["image"] == {
        "repository": "quay.io/argoproj/argocd",
        "tag": version,
    }
    digest = "sha256:" + "a" * 64
    pinned = argocd_values(f"quay.io/argoproj/argocd:{version}@{digest}")["global"]["image"]
    assert f"{pinned['repository']}:{pinned['tag']}" == f"quay.io/argoproj/argocd:{version}@{digest}"


def test_the_chart_is_verified_only_with_a_keyring() -> None:
    """Helm checks argo-helm's signature (the chart's .prov) when the spec names a keyring; without one (the
    default, for users who have not fetched the key) the chart installs unverified rather than failing."""
    spec = _spec("prod")
    resources, _ = _render(_args(spec))
    chart = resources["gitops-argo-cd"]
    assert "verify" not in chart.inputs and "keyring" not in chart.inputs

    signed = spec.model_copy(
        update={"gitops": spec.gitops.model_copy(update={"chart_keyring": "deploy/keys/argo-helm.gpg"})}
    )
    resources, _ = _render(_args(signed))
    chart = resources["gitops-argo-cd"]
    assert chart.inputs["verify"] is True
    assert chart.inputs["keyring"].path == "deploy/keys/argo-helm.gpg"
