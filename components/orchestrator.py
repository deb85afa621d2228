"""Orchestrator: Argo Workflows and one training pipeline per model.

Argo Workflows comes from its upstream chart, confined to the pipelines namespace
(`singleNamespace`) and restricted to running WorkflowTemplates (`templateReferencing:
Strict`). Around it: the artifact repository ConfigMap (the run directory passes between
steps through it), a runner ServiceAccount with only what the Argo executor needs, a submitter
ServiceAccount that may create Workflows from this component's templates and nothing else
(for the retraining trigger), one WorkflowTemplate per model rendered from
`loopform/pipeline.py` by `components.workflow`, and a CronWorkflow per scheduled model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import yaml
from pulumi_kubernetes.apiextensions import CustomResource
from pulumi_kubernetes.helm.v4 import Chart, ChartArgs, RepositoryOptsArgs

from components import common
from components.workflow import (
    ARTIFACT_REPOSITORY_CONFIGMAP,
    ARTIFACT_REPOSITORY_KEY,
    PipelineContext,
    render_cron_workflow,
    render_workflow_template,
    template_metadata,
    template_name,
)
from loopform.identity import ACCESS_KEY, RUNNER_ACCOUNT, SECRET_KEY
from loopform.spec import ArtifactRepository, ExistingPool, KarpenterPool, ModelSpec, Namespaces, OrchestratorSpec

ARGO_HELM_REPO = "https://argoproj.github.io/argo-helm"
ARGO_API_GROUP = "argoproj.io"
RUNNER_SERVICE_ACCOUNT = RUNNER_ACCOUNT
SUBMITTER_SERVICE_ACCOUNT = "loopform-workflow-submitter"
#: The executor's `init` and `wait` containers in every step pod: the chart leaves them without requests or a
#: memory limit; the wait container archives the run directory to the artifact store.
EXECUTOR_RESOURCES = {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}}


#: Pod-level settings the chart leaves empty and `restricted` requires (non-root, the runtime's seccomp profile).
RESTRICTED_POD = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def argo_workflows_values(
    spec: OrchestratorSpec,
    prometheus_release: str | None,
    install_crds: bool = True,
    images: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """argo-workflows chart values built from the spec.

    `prometheus_release` None means the cluster has no Prometheus Operator: no ServiceMonitor.
    (The chart has no `useDefaultArtifactRepo`, and `controller.workflowNamespaces` does
    nothing with `singleNamespace`: neither is set.)

    `images.tag` runs a later v3.7 patch than the chart's own (0.47.5 ships v3.7.11): argo-helm
    builds no chart for v3.7.12 and later, whose fixes `templateReferencing: Strict` needs
    (loopform/advisories.py). A patch release keeps the chart's CRDs, flags and config keys, so the
    chart fits it; chart 1.x would mean Argo Workflows v4, a major version (docs/hardening.md).

    `images` (controller, server, executor; default `spec.argo_images`) are set block by block, so each
    runs by its digest where the stack's lock pins it and the policy pack sees every one.
    """
    images = images if images is not None else spec.argo_images
    service_monitor: dict[str, Any] = {"enabled": prometheus_release is not None}
    if prometheus_release is not None:
        service_monitor["additionalLabels"] = {"release": prometheus_release}
    return {
        # The version the chart's labels name; the images below run it.
        "images": {"tag": spec.argo_workflows_version},
        # Only the stack with cluster.shared_addons installs the CRDs. keep false: with `keep` the chart marks
        # them helm.sh/resource-policy: keep, Chart v4 retains them on destroy, and the next `up` then fails
        # with AlreadyExists (pulumi-kubernetes >= 4.29 creates rather than upserts).
        "crds": {"install": install_crds, "keep": False},
        # Roles instead of ClusterRoles; the controller only sees its release namespace (pipelines).
        "singleNamespace": True,
        "controller": {
            # Only Workflows that reference a WorkflowTemplate run: submitters cannot run arbitrary pods.
            "workflowRestrictions": {"templateReferencing": "Strict"},
            "clusterWorkflowTemplates": {"enabled": False},
            "metricsConfig": {"enabled": True},
            "serviceMonitor": service_monitor,
            # With the chart's container settings, the pod meets the namespace's `restricted` Pod Security.
            "podSecurityContext": RESTRICTED_POD,
            "image": common.chart_image(images["controller"], registry=True),
        },
        "server": {
            "clusterWorkflowTemplates": {"enabled": False},
            "podSecurityContext": RESTRICTED_POD,
            "image": common.chart_image(images["server"], registry=True),
        },
        # The chart's workflow ServiceAccount and Role are replaced by the runner below.
        "workflow": {"serviceAccount": {"create": False}, "rbac": {"create": False}},
        # The controller adds these containers to every step pod: hardened like the steps (the pod-level
        # non-root user and seccomp profile come from the WorkflowTemplate), so the pods meet `restricted`.
        "executor": {
            "image": common.chart_image(images["executor"], registry=True),
            "resources": EXECUTOR_RESOURCES,
            "securityContext": common.container_security(read_only_root=False),
        },
    }


def chart_verification(keyring: str | None) -> dict[str, Any]:
    """Chart arguments that make Helm check the chart's provenance (.prov) against `keyring`; none without one."""
    if keyring is None:
        return {}
    return {"verify": True, "keyring": pulumi.FileAsset(keyring)}


def artifact_repository(spec: ArtifactRepository, static_keys_secret: str | None = None) -> dict[str, Any]:
    """One Argo ArtifactRepository (S3-compatible): the static-keys Secret when named, else workload identity."""
    s3: dict[str, Any] = {
        "bucket": spec.bucket,
        "endpoint": spec.endpoint,
        "insecure": spec.insecure,
        "keyFormat": spec.key_format,
    }
    if spec.region:
        s3["region"] = spec.region
    if static_keys_secret:
        s3["accessKeySecret"] = {"name": static_keys_secret, "key": ACCESS_KEY}
        s3["secretKeySecret"] = {"name": static_keys_secret, "key": SECRET_KEY}
    else:
        s3["useSDKCreds"] = True
    # Step logs are kept with the run so pods can be deleted as soon as they finish.
    return {"archiveLogs": True, "s3": s3}


def runner_rules() -> list[dict[str, Any]]:
    """What the Argo executor in each step pod needs (Argo >= 3.4): report its task results."""
    return [{"apiGroups": [ARGO_API_GROUP], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}]


def submitter_rules(templates: Sequence[str]) -> list[dict[str, Any]]:
    """Create and follow Workflows, read only the named WorkflowTemplates."""
    rules: list[dict[str, Any]] = [
        {"apiGroups": [ARGO_API_GROUP], "resources": ["workflows"], "verbs": ["create", "get", "list", "watch"]}
    ]
    if templates:  # an empty resourceNames would grant every template
        rules.append(
            {
                "apiGroups": [ARGO_API_GROUP],
                "resources": ["workflowtemplates"],
                "verbs": ["get"],
                "resourceNames": sorted(templates),
            }
        )
    return rules


@dataclass(frozen=True, kw_only=True)
class OrchestratorArgs:
    """Inputs of the Orchestrator; every value comes from the stack spec."""

    spec: OrchestratorSpec
    """orchestrator section: chart version, pipeline images (CPU, and CUDA for GPU steps), artifact repository,
    deadlines, retries."""
    environment: str
    """Environment name; steps load `stacks/Pulumi.<environment>.yaml` from the pipeline image."""
    namespaces: Namespaces
    """Argo Workflows and the pipelines run in `pipelines`; the submitter account lives in `monitoring`."""
    models: Mapping[str, ModelSpec]
    """Models of the spec: one WorkflowTemplate each, a CronWorkflow when training.schedule is set."""
    gpu_pools: Mapping[str, KarpenterPool | ExistingPool]
    """gpu.pools: the training step's tolerations and node selector are derived from its pool."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Common labels added to every object."""
    step_env: Mapping[str, pulumi.Input[str]] = field(default_factory=dict)
    """Environment of every step (e.g. MLFLOW_TRACKING_URI, LOOPFORM_FEAST_OFFLINE_URI); values may be Outputs."""
    step_secret_env: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Environment of every step from Secrets in the pipelines namespace: name -> (Secret, key)."""
    static_keys_secret: str | None = None
    """Secret (in the pipelines namespace) with static object-store keys: every step loads it, and the
    artifact repository reads it. None: steps and the executor use the runner's workload identity."""
    runner_annotations: Mapping[str, str] = field(default_factory=dict)
    """Annotations of the runner ServiceAccount, e.g. the IRSA role ARN."""
    prometheus_release: str | None = None
    """`release` label for the controller's ServiceMonitor; None (no Prometheus Operator) installs none."""
    install_crds: bool = True
    """Install the Argo Workflows CRDs (cluster.shared_addons: one stack per cluster does)."""
    argo_images: Mapping[str, str] | None = None
    """Controller, server and executor images as they run (the stack's digest lock applied); None:
    `spec.argo_images`."""


class Orchestrator(pulumi.ComponentResource):
    """Argo Workflows, artifact repository, least-privilege accounts and the per-model pipelines."""

    namespace: pulumi.Output[str]
    workflow_templates: pulumi.Output[dict[str, str]]
    """Model name -> WorkflowTemplate name (what the retraining trigger submits)."""
    cron_workflows: pulumi.Output[dict[str, str]]
    """Model name -> CronWorkflow name, for models with a training schedule."""
    runner_service_account: pulumi.Output[str]
    submitter_service_account: pulumi.Output[str]
    """ServiceAccount (in submitter_namespace) allowed to create Workflows from the templates."""
    submitter_namespace: pulumi.Output[str]
    template_names: dict[str, str]
    """The same as workflow_templates as plain data (names are fixed by the spec)."""

    def __init__(self, name: str, args: OrchestratorArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        from pulumi_kubernetes.core.v1 import ConfigMap  # typed Kubernetes modules are slow to import: load on use

        super().__init__("loopform:orchestrator:Orchestrator", name, None, opts)
        spec = args.spec
        namespace = args.namespaces.pipelines
        submitter_namespace = args.namespaces.monitoring
        base_labels = dict(args.labels)
        self.template_names = {model: template_name(model) for model in sorted(args.models)}

        chart = Chart(
            f"{name}-argo-workflows",
            ChartArgs(
                chart="argo-workflows",
                version=spec.chart_version,
                namespace=namespace,
                repository_opts=RepositoryOptsArgs(repo=ARGO_HELM_REPO),
                values=argo_workflows_values(spec, args.prometheus_release, args.install_crds, args.argo_images),
                **chart_verification(spec.chart_keyring),
            ),
            opts=common.child(self),
        )

        artifacts = ConfigMap(
            f"{name}-artifact-repository",
            metadata=common.metadata(
                ARTIFACT_REPOSITORY_CONFIGMAP,
                namespace,
                common.labels("artifact-repository", name, base_labels),
                {"workflows.argoproj.io/default-artifact-repository": ARTIFACT_REPOSITORY_KEY},
            ),
            data={
                ARTIFACT_REPOSITORY_KEY: yaml.safe_dump(
                    artifact_repository(spec.artifact_repository, args.static_keys_secret), sort_keys=True
                )
            },
            opts=common.child(self),
        )

        runner, runner_binding = common.service_account_with_role(
            self,
            f"{name}-runner",
            RUNNER_SERVICE_ACCOUNT,
            account_namespace=namespace,
            role_namespace=namespace,
            rules=runner_rules(),
            labels=common.labels("pipeline-runner", name, base_labels),
            annotations=dict(args.runner_annotations),
        )
        submitter, _ = common.service_account_with_role(
            self,
            f"{name}-submitter",
            SUBMITTER_SERVICE_ACCOUNT,
            account_namespace=submitter_namespace,
            role_namespace=namespace,
            rules=submitter_rules(list(self.template_names.values())),
            labels=common.labels("workflow-submitter", name, base_labels),
        )

        pipeline_labels = common.labels("training-pipeline", name, base_labels)
        templates: dict[str, pulumi.Output[str]] = {}
        crons: dict[str, pulumi.Output[str]] = {}
        for model, model_spec in sorted(args.models.items()):
            # Metadata never depends on the step environment; the spec may wait for Outputs in it.
            template = CustomResource(
                f"{name}-{model}-template",
                api_version=f"{ARGO_API_GROUP}/v1alpha1",
                kind="WorkflowTemplate",
                metadata=template_metadata(_context(args, namespace, pipeline_labels, {}), model),
                spec=_template_spec(args, namespace, pipeline_labels, model, model_spec),
                opts=common.child(self, depends_on=[chart, artifacts, runner, runner_binding]),
            )
            templates[model] = template.metadata.apply(common.metadata_name)
            if model_spec.training.schedule:
                cron_doc = render_cron_workflow(
                    _context(args, namespace, pipeline_labels, {}), model, model_spec.training.schedule
                )
                cron = common.custom_resource(
                    f"{name}-{model}-cron", cron_doc, common.child(self, depends_on=[template])
                )
                crons[model] = cron.metadata.apply(common.metadata_name)

        self.namespace = pulumi.Output.from_input(namespace)
        self.workflow_templates = pulumi.Output.all(**templates) if templates else pulumi.Output.from_input({})
        self.cron_workflows = pulumi.Output.all(**crons) if crons else pulumi.Output.from_input({})
        self.runner_service_account = runner.metadata.name
        self.submitter_service_account = submitter.metadata.name
        self.submitter_namespace = pulumi.Output.from_input(submitter_namespace)
        self.register_outputs(
            {
                "namespace": self.namespace,
                "workflow_templates": self.workflow_templates,
                "cron_workflows": self.cron_workflows,
                "runner_service_account": self.runner_service_account,
                "submitter_service_account": self.submitter_service_account,
                "submitter_namespace": self.submitter_namespace,
            }
        )


def _context(args: OrchestratorArgs, namespace: str, labels: dict[str, str], env: Mapping[str, str]) -> PipelineContext:
    return PipelineContext(
        environment=args.environment,
        namespace=namespace,
        orchestrator=args.spec,
        pools=args.gpu_pools,
        service_account=RUNNER_SERVICE_ACCOUNT,
        labels=labels,
        env=env,
        secret_env=dict(args.step_secret_env),
        env_from_secrets=(args.static_keys_secret,) if args.static_keys_secret else (),
    )


def _template_spec(
    args: OrchestratorArgs, namespace: str, labels: dict[str, str], model: str, model_spec: ModelSpec
) -> pulumi.Input[dict[str, Any]]:
    """The WorkflowTemplate spec, rendered once the step environment (possibly Outputs) is known."""

    def render(env: Mapping[str, str]) -> dict[str, Any]:
        return render_workflow_template(_context(args, namespace, labels, env), model, model_spec)["spec"]

    if not args.step_env:
        return render({})
    return pulumi.Output.all(**dict(args.step_env)).apply(render)
