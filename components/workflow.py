"""The training pipeline of `loopform/pipeline.py`, rendered with hera to Argo Workflows objects.

One WorkflowTemplate per model: a DAG with one container template per declared step, each
running `loopform step NAME` in the pipeline image and handing the run directory to the next
step as an Argo artifact. DAG dependencies mean a failed validate-data stops the run before
training; retries cover infrastructure errors only (`OnError`), never a failed gate. A step
with compute "training" gets the model's GPUs and the scheduling constraints of its pool,
derived from the pool object by `components.gpu_pool.scheduling`; a step that requests GPUs
runs the CUDA pipeline image (`orchestrator.gpu_pipeline_image`), every other the CPU one.

Pure functions of the spec returning plain dicts, so they are testable without Pulumi and
validated against hera's Argo models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# hera's Argo models take most of a second to import, so they load inside the functions that build templates,
# not when the Pulumi program imports this module. Its YAML presenter (multi-line strings as literal blocks,
# y/n quoted) is light and stays eager: every YAML the program dumps (ConfigMap data, the feature store's
# content hash) has been written with it since this module first imported hera, and must not change.
import hera._yaml  # noqa: F401

from components.common import IMAGE_UID
from components.gpu_pool import GPU_RESOURCE, GpuScheduling, gpu_pod_resources, scheduling
from components.registry import CREDENTIALS_KEY, CREDENTIALS_VOLUME, PIPELINE_USER, credentials_secret_name
from loopform.pipeline import PIPELINE, Step
from loopform.spec import ExistingPool, KarpenterPool, ModelSpec, OrchestratorSpec

if TYPE_CHECKING:
    from hera.workflows import Container
    from hera.workflows import models as m
    from hera.workflows.retry_strategy import RetryStrategy

RUN_DIR = "/work/run"
WORK_DIR = "/work"
RUN_ARTIFACT = "run"
ENTRYPOINT = "pipeline"
ARTIFACT_REPOSITORY_CONFIGMAP = "artifact-repositories"
ARTIFACT_REPOSITORY_KEY = "default-v1"
STEP_USER = IMAGE_UID  # images/pipeline/Dockerfile's user
#: The pipeline images' home (`useradd --create-home loopform`): MLflow reads ~/.mlflow/credentials there.
STEP_HOME = "/home/loopform"
#: The workflow-level custom metric a successful run emits (`last_success_metric`).
LAST_SUCCESS_METRIC = "loopform_pipeline_last_success_timestamp_seconds"


def template_name(model: str) -> str:
    """Name of a model's WorkflowTemplate (what the retraining trigger submits)."""
    return f"{model}-pipeline"


def cron_name(model: str) -> str:
    """Name of a model's scheduled retraining CronWorkflow."""
    return f"{model}-retrain"


@dataclass(frozen=True, kw_only=True)
class PipelineContext:
    """What every model's pipeline shares: environment, namespace, image, policies, pools."""

    environment: str
    namespace: str
    orchestrator: OrchestratorSpec
    pools: Mapping[str, KarpenterPool | ExistingPool]
    service_account: str
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment of every step (e.g. MLFLOW_TRACKING_URI), plain strings."""
    secret_env: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Environment of every step from Secrets in `namespace`: name -> (Secret, key)."""
    env_from_secrets: Sequence[str] = ()
    """Secrets in `namespace` whose keys become environment variables of every step."""
    mlflow_credentials: str | None = credentials_secret_name(PIPELINE_USER)
    """Secret in `namespace` with the pipeline's MLflow credentials file, mounted at ~/.mlflow (None: no auth)."""


def step_scheduling(
    step: Step, model: ModelSpec, pools: Mapping[str, KarpenterPool | ExistingPool]
) -> GpuScheduling | None:
    """The pool constraints of a step: only a training step on a model with a GPU pool has any."""
    pool_name = model.training.gpu_pool
    if step.compute != "training" or pool_name is None:
        return None
    if pool_name not in pools:
        # The spec validator rejects this already; keep the error clear for direct callers.
        raise ValueError(f"GPU pool {pool_name!r} is not defined (defined: {', '.join(sorted(pools)) or 'none'})")
    return scheduling(pool_name, pools[pool_name])


def step_resources(step: Step, model: ModelSpec, orchestrator: OrchestratorSpec) -> dict[str, dict[str, str]]:
    """Container resources: the model's training resources and GPUs for a training step, else step_resources."""
    if step.compute == "training":
        return gpu_pod_resources(model.training.gpus, model.training.resources.manifest())
    return orchestrator.step_resources.manifest()


def step_image(resources: Mapping[str, Mapping[str, str]], orchestrator: OrchestratorSpec) -> str:
    """The CUDA pipeline image where the container requests GPUs, the CPU one everywhere else: read from the
    resources themselves, so no step gets GPUs without CUDA torch, and no CPU step pulls the CUDA libraries."""
    return orchestrator.gpu_pipeline_image if GPU_RESOURCE in resources["limits"] else orchestrator.pipeline_image


def _single_need(step: Step) -> str:
    if len(step.needs) != 1:
        raise ValueError(
            f"step {step.name!r} needs {list(step.needs)}: the run directory is handed along one chain, "
            "so a step may depend on one step only"
        )
    return step.needs[0]


def _retry(orchestrator: OrchestratorSpec) -> RetryStrategy:
    from hera.workflows import models as m
    from hera.workflows.retry_strategy import RetryPolicy, RetryStrategy

    retry = orchestrator.retry
    return RetryStrategy(
        limit=retry.limit,
        # OnError: pod/node/controller errors are retried; a step that exits non-zero (a failed gate) is not.
        retry_policy=RetryPolicy.on_error,
        # No maxDuration: in Argo Workflows it bounds all tries together and becomes a retried pod's deadline,
        # so a long training step would be cut short on its retry.
        backoff=m.Backoff(duration=retry.backoff, factor=m.IntOrString(root=retry.factor)),
    )


def _container(ctx: PipelineContext, model: str, spec: ModelSpec, step: Step, first: bool) -> Container:
    from hera.workflows import Artifact, Container, EmptyDirVolume, Env, SecretEnv, SecretEnvFrom, SecretVolume
    from hera.workflows import models as m

    sched = step_scheduling(step, spec, ctx.pools)
    resources = step_resources(step, spec, ctx.orchestrator)
    volumes: list[Any] = [EmptyDirVolume(name="work", mount_path=WORK_DIR)]
    env = [Env(name=key, value=value) for key, value in sorted(ctx.env.items())]
    if ctx.mlflow_credentials:
        # A file, not MLFLOW_TRACKING_PASSWORD: the password stays out of the template and the pod's environment.
        env.append(Env(name="HOME", value=STEP_HOME))
        volumes.append(
            SecretVolume(
                name=CREDENTIALS_VOLUME,
                secret_name=ctx.mlflow_credentials,
                mount_path=f"{STEP_HOME}/.mlflow",
                read_only=True,
                items=[m.KeyToPath(key=CREDENTIALS_KEY, path=CREDENTIALS_KEY)],
                default_mode=0o440,
            )
        )
    return Container(
        name=step.name,
        image=step_image(resources, ctx.orchestrator),
        command=["loopform"],
        args=["step", step.name, "--model", model, "--stack", ctx.environment, "--run-dir", RUN_DIR],
        env=[
            *env,
            *(
                SecretEnv(name=key, secret_name=ref[0], secret_key=ref[1])
                for key, ref in sorted(ctx.secret_env.items())
            ),
        ]
        or None,
        env_from=[SecretEnvFrom(name=secret) for secret in ctx.env_from_secrets] or None,
        resources=m.ResourceRequirements(requests=resources["requests"], limits=resources["limits"]),
        inputs=None if first else [Artifact(name=RUN_ARTIFACT, path=RUN_DIR)],
        outputs=[Artifact(name=RUN_ARTIFACT, path=RUN_DIR)],
        volumes=volumes,
        retry_strategy=_retry(ctx.orchestrator),
        tolerations=[m.Toleration(**t) for t in sched.tolerations()] if sched else None,
        node_selector=sched.node_selector() if sched else None,
        security_context=m.SecurityContext(
            allow_privilege_escalation=False, capabilities=m.Capabilities(drop=["ALL"]), run_as_non_root=True
        ),
        annotations={"loopform.dev/step-description": step.description},
    )


def mutex_name(model: str) -> str:
    """The Argo Workflows mutex every run of `model`'s pipeline holds."""
    return f"retrain-{model}"


def last_success_metric(model: str) -> m.Prometheus:
    """A workflow-level custom metric the Argo controller exposes once a run succeeds: when that run started
    (the dashboard's "last retraining", which matches the name with or without the `argo_workflows_` prefix the
    controller's exporter may add)."""
    from hera.workflows import models as m

    return m.Prometheus(
        name=LAST_SUCCESS_METRIC,
        help="Unix time the last successful pipeline run of the model started.",
        labels=[m.MetricLabel(key="model", value=model)],
        when="{{status}} == Succeeded",
        gauge=m.Gauge(value="{{workflow.creationTimestamp.s}}", realtime=False),
    )


def template_metadata(ctx: PipelineContext, model: str) -> dict[str, Any]:
    """The WorkflowTemplate's metadata, without building the template (it needs no step environment)."""
    return {
        "annotations": {
            "workflows.argoproj.io/description": f"Training pipeline of model {model} ({ctx.environment})."
        },
        "labels": {**ctx.labels, "loopform.dev/model": model},
        "name": template_name(model),
        "namespace": ctx.namespace,
    }


def render_workflow_template(ctx: PipelineContext, model: str, spec: ModelSpec) -> dict[str, Any]:
    """The model's WorkflowTemplate as a plain Argo object (apiVersion, kind, metadata, spec)."""
    from hera.workflows import DAG, Artifact, WorkflowTemplate
    from hera.workflows import models as m

    metadata = template_metadata(ctx, model)
    labels = metadata["labels"]
    with WorkflowTemplate(
        name=metadata["name"],
        namespace=metadata["namespace"],
        labels=labels,
        annotations=metadata["annotations"],
        entrypoint=ENTRYPOINT,
        service_account_name=ctx.service_account,
        active_deadline_seconds=ctx.orchestrator.active_deadline_seconds,
        # Pods go as soon as they finish (logs and the run directory are kept as artifacts), so an
        # idle GPU node is empty right away and Karpenter can remove it.
        pod_gc=m.PodGC(strategy="OnPodCompletion"),
        ttl_strategy=m.TTLStrategy(seconds_after_completion=ctx.orchestrator.ttl_seconds_after_completion),
        artifact_repository_ref=m.ArtifactRepositoryRef(
            config_map=ARTIFACT_REPOSITORY_CONFIGMAP, key=ARTIFACT_REPOSITORY_KEY
        ),
        pod_metadata=m.Metadata(labels=labels),
        workflow_metadata=m.WorkflowMetadata(labels=labels),
        metrics=m.Metrics(prometheus=[last_success_metric(model)]),
        # One run of a model at a time, whoever starts it (the schedule, a drift alert, a person): on the
        # template, because `templateReferencing: Strict` rejects a submitted Workflow that sets it.
        synchronization=m.Synchronization(mutexes=[m.Mutex(name=mutex_name(model))]),
        security_context=m.PodSecurityContext(
            run_as_non_root=True,
            run_as_user=STEP_USER,
            run_as_group=STEP_USER,
            fs_group=STEP_USER,
            seccomp_profile=m.SeccompProfile(type="RuntimeDefault"),
        ),
    ) as template:
        containers = {step.name: _container(ctx, model, spec, step, first=not step.needs) for step in PIPELINE}
        with DAG(name=ENTRYPOINT):
            tasks = {}
            for step in PIPELINE:  # declared in dependency order
                if not step.needs:
                    tasks[step.name] = containers[step.name]()
                    continue
                # The run directory flows along one chain: a step reads the directory its dependency wrote.
                need = _single_need(step)
                source = f"{{{{tasks.{need}.outputs.artifacts.{RUN_ARTIFACT}}}}}"
                tasks[step.name] = containers[step.name](arguments=[Artifact(name=RUN_ARTIFACT, from_=source)])
                tasks[need] >> tasks[step.name]
    return template.to_dict()


def render_cron_workflow(ctx: PipelineContext, model: str, schedule: str) -> dict[str, Any]:
    """A CronWorkflow that runs the model's WorkflowTemplate on `schedule` (one run at a time)."""
    from hera.workflows import CronWorkflow
    from hera.workflows import models as m

    labels = {**ctx.labels, "loopform.dev/model": model}
    cron = CronWorkflow(
        name=cron_name(model),
        namespace=ctx.namespace,
        labels=labels,
        schedules=[schedule],
        concurrency_policy="Forbid",
        starting_deadline_seconds=600,
        successful_jobs_history_limit=3,
        failed_jobs_history_limit=3,
        workflow_template_ref=m.WorkflowTemplateRef(name=template_name(model)),
        workflow_metadata=m.WorkflowMetadata(labels={**labels, "loopform.dev/trigger": "schedule"}),
    )
    return cron.to_dict()
