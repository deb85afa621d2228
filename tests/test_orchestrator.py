"""Orchestrator under Pulumi mocks, and the pipeline rendered to Argo objects with hera.

Argo objects are validated with hera's models (extra="forbid", so misspelt fields fail);
core objects with kubernetes-validate (strict).
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pulumi
import pytest
import yaml
from hera.workflows import models as argo

from components.gpu_pool import scheduling
from components.orchestrator import (
    RUNNER_SERVICE_ACCOUNT,
    SUBMITTER_SERVICE_ACCOUNT,
    Orchestrator,
    OrchestratorArgs,
)
from components.workflow import (
    RUN_DIR,
    PipelineContext,
    render_cron_workflow,
    render_workflow_template,
    step_scheduling,
)
from loopform.pipeline import PIPELINE, STEP_NAMES
from loopform.render import RenderedResource, render_components
from loopform.spec import ModelSpec, PlatformSpec, load_stack, parse_spec, read_stack_file, stack_file

STACKS = ("dev", "staging", "prod")


def _spec(stack: str) -> PlatformSpec:
    return load_stack(stack_file(stack))


def _context(spec: PlatformSpec, env: dict[str, str] | None = None) -> PipelineContext:
    return PipelineContext(
        environment=spec.environment,
        namespace=spec.cluster.namespaces.pipelines,
        orchestrator=spec.orchestrator,
        pools=spec.gpu.pools,
        service_account="runner",
        labels={"loopform.dev/environment": spec.environment},
        env=env or {},
    )


def _templates(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in doc["spec"]["templates"]}


def _args(spec: PlatformSpec, **extra: Any) -> OrchestratorArgs:
    return OrchestratorArgs(
        spec=spec.orchestrator,
        environment=spec.environment,
        namespaces=spec.cluster.namespaces,
        models=spec.models,
        gpu_pools=spec.gpu.pools,
        labels={"loopform.dev/environment": spec.environment, **spec.cluster.labels},
        **extra,
    )


def _render(args: OrchestratorArgs) -> tuple[dict[str, RenderedResource], dict[str, Any]]:
    outputs: dict[str, Any] = {}
    names = (
        "namespace",
        "workflow_templates",
        "cron_workflows",
        "runner_service_account",
        "submitter_service_account",
        "submitter_namespace",
    )

    def run():
        component = Orchestrator("orch", args)
        return pulumi.Output.all(*[getattr(component, n) for n in names]).apply(
            lambda values: outputs.update(zip(names, values, strict=True))
        )

    return {r.name: r for r in render_components(run)}, outputs


# --- the WorkflowTemplate -----------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_workflow_template_is_the_declared_pipeline(stack: str) -> None:
    spec = _spec(stack)
    for model, model_spec in spec.models.items():
        doc = render_workflow_template(_context(spec), model, model_spec)
        argo.WorkflowTemplate.model_validate(doc, extra="forbid")
        assert doc["metadata"]["name"] == f"{model}-pipeline"
        assert doc["metadata"]["namespace"] == spec.cluster.namespaces.pipelines

        (dag,) = [t for t in doc["spec"]["templates"] if "dag" in t]
        assert doc["spec"]["entrypoint"] == dag["name"]
        tasks = {t["name"]: t for t in dag["dag"]["tasks"]}
        assert list(tasks) == list(STEP_NAMES)
        for step in PIPELINE:
            task = tasks[step.name]
            # Plain DAG dependencies: a failed (not skipped) dependency stops everything after it,
            # so validate-data failing stops the run before training.
            assert task.get("depends") == (" && ".join(step.needs) or None)
            artifacts = task.get("arguments", {}).get("artifacts", [])
            assert artifacts == [
                {"name": "run", "from": f"{{{{tasks.{need}.outputs.artifacts.run}}}}"} for need in step.needs
            ]

        templates = _templates(doc)
        for step in PIPELINE:
            template = templates[step.name]
            container = template["container"]
            assert container["image"] in (spec.orchestrator.pipeline_image, spec.orchestrator.gpu_pipeline_image)
            assert [*container["command"], *container["args"]] == [
                "loopform", "step", step.name, "--model", model, "--stack", spec.environment, "--run-dir", RUN_DIR,
            ]  # fmt: skip
            assert template["outputs"]["artifacts"] == [{"name": "run", "path": RUN_DIR}]
            assert template.get("inputs", {}).get("artifacts", []) == (
                [{"name": "run", "path": RUN_DIR}] if step.needs else []
            )
            assert {"name": "work", "mountPath": "/work"} in container["volumeMounts"]


@pytest.mark.parametrize("stack", STACKS)
def test_retries_deadline_gc_and_account_come_from_the_spec(stack: str) -> None:
    spec = _spec(stack)
    orchestrator = spec.orchestrator
    for model, model_spec in spec.models.items():
        doc = render_workflow_template(_context(spec), model, model_spec)
        workflow = doc["spec"]
        assert workflow["activeDeadlineSeconds"] == orchestrator.active_deadline_seconds
        assert workflow["ttlStrategy"] == {"secondsAfterCompletion": orchestrator.ttl_seconds_after_completion}
        assert workflow["podGC"]["strategy"] in ("OnPodCompletion", "OnWorkflowSuccess")
        assert workflow["serviceAccountName"] == "runner"
        assert workflow["artifactRepositoryRef"] == {"configMap": "artifact-repositories", "key": "default-v1"}
        for step in PIPELINE:
            retry = _templates(doc)[step.name]["retryStrategy"]
            # Only infrastructure errors are retried; a failed gate (non-zero exit) is not.
            assert retry == {
                "limit": orchestrator.retry.limit,
                "retryPolicy": "OnError",
                # No maxDuration: Argo would make it a retried pod's deadline and cut a long step short.
                "backoff": {"duration": orchestrator.retry.backoff, "factor": orchestrator.retry.factor},
            }
    assert stack != "prod" or spec.orchestrator.active_deadline_seconds == 14400


@pytest.mark.parametrize("stack", STACKS)
def test_every_gpu_step_tolerates_its_pool_taints_and_selects_its_pool_labels(stack: str) -> None:
    spec = _spec(stack)
    gpu_steps = 0
    for model, model_spec in spec.models.items():
        templates = _templates(render_workflow_template(_context(spec), model, model_spec))
        for step in PIPELINE:
            template = templates[step.name]
            resources = template["container"]["resources"]
            gpus = resources["limits"].get("nvidia.com/gpu")
            if gpus is None:
                assert "tolerations" not in template and "nodeSelector" not in template
                assert "nvidia.com/gpu" not in resources["requests"]
                continue
            gpu_steps += 1
            pool_name = model_spec.training.gpu_pool
            pool = spec.gpu.pools[pool_name]
            assert gpus == resources["requests"]["nvidia.com/gpu"] == str(model_spec.training.gpus)
            assert template["nodeSelector"] == pool.node_labels(pool_name)
            tolerated = [(t["key"], t.get("value", ""), t["effect"]) for t in template["tolerations"]]
            assert tolerated == [(t.key, t.value, t.effect) for t in pool.node_taints()]
            assert template["tolerations"] == scheduling(pool_name, pool).tolerations()
    assert gpu_steps == sum(1 for m in spec.models.values() if m.training.gpus)
    assert gpu_steps >= 1  # every shipped stack trains on a GPU pool


@pytest.mark.parametrize("stack", STACKS)
def test_steps_that_request_gpus_run_the_cuda_image_and_every_other_step_the_cpu_image(stack: str) -> None:
    spec = _spec(stack)
    orchestrator = spec.orchestrator
    assert orchestrator.gpu_pipeline_image != orchestrator.pipeline_image
    images, gpu_steps = {}, set()
    for model, model_spec in spec.models.items():
        for step in PIPELINE:
            container = _templates(render_workflow_template(_context(spec), model, model_spec))[step.name]["container"]
            images[model, step.name] = container["image"]
            if "nvidia.com/gpu" in container["resources"]["limits"]:
                gpu_steps.add((model, step.name))
    cuda = {key for key, image in images.items() if image == orchestrator.gpu_pipeline_image}
    assert cuda == gpu_steps == {("fraud", "train")}  # every shipped stack trains fraud on GPUs, delivery on CPU
    assert all(image == orchestrator.pipeline_image for key, image in images.items() if key not in cuda)


def test_a_training_step_on_a_gpu_pool_without_gpus_runs_the_cpu_image() -> None:
    """The image follows the GPUs a step requests, not the pool it is scheduled on."""
    spec = _spec("dev")
    pooled = ModelSpec.model_validate({"path": "models/fraud", "training": {"gpu_pool": "gpu", "gpus": 0}})
    train = _templates(render_workflow_template(_context(spec), "pooled", pooled))["train"]
    assert "nodeSelector" in train and "nvidia.com/gpu" not in train["container"]["resources"]["limits"]
    assert train["container"]["image"] == spec.orchestrator.pipeline_image


def test_cpu_only_model_has_no_gpu_constraints() -> None:
    spec = _spec("dev")
    cpu_model = ModelSpec.model_validate({"path": "models/fraud"})
    doc = render_workflow_template(_context(spec), "cpu", cpu_model)
    train = _templates(doc)["train"]
    assert "tolerations" not in train and "nodeSelector" not in train
    assert train["container"]["resources"] == cpu_model.training.resources.manifest()
    assert train["container"]["image"] == spec.orchestrator.pipeline_image
    assert all(step_scheduling(step, cpu_model, spec.gpu.pools) is None for step in PIPELINE)


def test_step_scheduling_rejects_an_unknown_pool() -> None:
    spec = _spec("dev")
    with pytest.raises(ValueError, match="'gpu' is not defined"):
        render_workflow_template(
            PipelineContext(
                environment="dev", namespace="p", orchestrator=spec.orchestrator, pools={}, service_account="r"
            ),
            "fraud",
            spec.models["fraud"],
        )


@pytest.mark.parametrize("stack", STACKS)
def test_cron_workflow_runs_the_template_on_the_spec_schedule(stack: str) -> None:
    spec = _spec(stack)
    for model, model_spec in spec.models.items():
        schedule = model_spec.training.schedule
        if schedule is None:
            continue
        doc = render_cron_workflow(_context(spec), model, schedule)
        argo.CronWorkflow.model_validate(doc, extra="forbid")
        assert doc["spec"]["schedules"] == [schedule]
        assert doc["spec"]["concurrencyPolicy"] == "Forbid"
        assert doc["spec"]["workflowSpec"]["workflowTemplateRef"] == {"name": f"{model}-pipeline"}


def test_hera_validation_catches_a_misspelt_field() -> None:
    """The check the tests rely on does reject typos (so passing it means something)."""
    spec = _spec("dev")
    doc = render_workflow_template(_context(spec), "fraud", spec.models["fraud"])
    doc["spec"]["templates"][0]["retryStrategy"]["retryPolicyy"] = "OnError"
    with pytest.raises(ValueError, match="retryPolicyy"):
        argo.WorkflowTemplate.model_validate(doc, extra="forbid")


# --- the component ------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_orchestrator_children_names_parents_and_outputs(stack: str) -> None:
    spec = _spec(stack)
    resources, outputs = _render(_args(spec))
    scheduled = sorted(m for m, s in spec.models.items() if s.training.schedule)
    expected = {
        "orch",
        "orch-argo-workflows",
        "orch-artifact-repository",
        "orch-runner-sa",
        "orch-runner-role",
        "orch-runner-binding",
        "orch-submitter-sa",
        "orch-submitter-role",
        "orch-submitter-binding",
        *(f"orch-{m}-template" for m in spec.models),
        *(f"orch-{m}-cron" for m in scheduled),
    }
    assert set(resources) == expected
    component = resources["orch"]
    assert component.type_ == "loopform:orchestrator:Orchestrator" and not component.custom
    assert all(r.parent == component.urn for name, r in resources.items() if name != "orch")

    assert outputs == {
        "namespace": spec.cluster.namespaces.pipelines,
        "workflow_templates": {m: f"{m}-pipeline" for m in spec.models},
        "cron_workflows": {m: f"{m}-retrain" for m in scheduled},
        "runner_service_account": RUNNER_SERVICE_ACCOUNT,
        "submitter_service_account": SUBMITTER_SERVICE_ACCOUNT,
        "submitter_namespace": spec.cluster.namespaces.monitoring,
    }

    chart = resources["orch-argo-workflows"].manifest()
    assert chart["chart"] == "argo-workflows"
    assert chart["version"] == spec.orchestrator.chart_version
    assert chart["repositoryOpts"]["repo"] == "https://argoproj.github.io/argo-helm"
    assert chart["namespace"] == spec.cluster.namespaces.pipelines
    values = chart["values"]
    assert values["singleNamespace"] is True
    # Ignored by the chart (dropped in 0.26.0 / no effect with singleNamespace): not set at all.
    assert "useDefaultArtifactRepo" not in values and "workflowNamespaces" not in values["controller"]
    # Controller, server and executor run the spec's patched v3.7, not the chart's own v3.7.11, each set as an
    # image block (registry/repository:tag, as the chart's templates join them) so the policy pack sees it.
    version = spec.orchestrator.argo_workflows_version
    assert values["images"] == {"tag": version}
    assert {
        f"{values[role]['image']['registry']}/{values[role]['image']['repository']}:{values[role]['image']['tag']}"
        for role in ("controller", "server", "executor")
    } == {f"quay.io/argoproj/{name}:{version}" for name in ("workflow-controller", "argocli", "argoexec")}
    assert values["controller"]["serviceMonitor"] == {"enabled": False}
    assert values["controller"]["workflowRestrictions"] == {"templateReferencing": "Strict"}

    for model in spec.models:
        template = resources[f"orch-{model}-template"]
        assert template.type_ == "kubernetes:argoproj.io/v1alpha1:WorkflowTemplate"
        argo.WorkflowTemplate.model_validate(template.manifest(), extra="forbid")
        assert template.manifest()["spec"]["serviceAccountName"] == RUNNER_SERVICE_ACCOUNT
        # Templates wait for the chart (CRDs), the artifact repository and the runner account.
        for dependency in ("orch-argo-workflows", "orch-artifact-repository", "orch-runner-sa"):
            assert resources[dependency].urn in template.dependencies
    for model in scheduled:
        cron = resources[f"orch-{model}-cron"]
        argo.CronWorkflow.model_validate(cron.manifest(), extra="forbid")
        assert resources[f"orch-{model}-template"].urn in cron.dependencies


@pytest.mark.parametrize("stack", STACKS)
def test_core_objects_are_valid_kubernetes(stack: str) -> None:
    resources, _ = _render(_args(_spec(stack)))
    core = [
        r
        for r in resources.values()
        if r.is_kubernetes_object and r.kind in {"ConfigMap", "ServiceAccount", "Role", "RoleBinding"}
    ]
    assert sorted(r.kind for r in core) == [
        "ConfigMap",
        "Role",
        "Role",
        "RoleBinding",
        "RoleBinding",
        "ServiceAccount",
        "ServiceAccount",
    ]
    for resource in core:
        kubernetes_validate.validate(resource.manifest(), "1.30", strict=True)


@pytest.mark.parametrize("stack", STACKS)
def test_artifact_repository_configmap(stack: str) -> None:
    spec = _spec(stack)
    resources, _ = _render(_args(spec))
    config_map = resources["orch-artifact-repository"].manifest()
    assert config_map["metadata"]["name"] == "artifact-repositories"
    assert config_map["metadata"]["namespace"] == spec.cluster.namespaces.pipelines
    assert config_map["metadata"]["annotations"] == {"workflows.argoproj.io/default-artifact-repository": "default-v1"}
    repository = yaml.safe_load(config_map["data"]["default-v1"])
    argo.ArtifactRepository.model_validate(repository, extra="forbid")
    store = spec.orchestrator.artifact_repository
    assert repository["s3"]["bucket"] == store.bucket
    assert repository["s3"]["endpoint"] == store.endpoint
    assert repository["s3"]["keyFormat"] == store.key_format
    # Every stack uses a workload identity: the executor takes the runner account's role.
    assert repository["s3"]["useSDKCreds"] is True and "accessKeySecret" not in repository["s3"]
    assert repository["archiveLogs"] is True


def test_artifact_repository_with_static_keys_reads_the_secret_and_steps_load_it() -> None:
    data = read_stack_file(stack_file("dev"))["config"]["loopform:platform"]
    data["orchestrator"]["artifact_repository"] = {"bucket": "b", "region": "eu-west-1"}
    spec = parse_spec(data, "test")
    resources, _ = _render(_args(spec, static_keys_secret="keys"))
    repository = yaml.safe_load(resources["orch-artifact-repository"].manifest()["data"]["default-v1"])
    argo.ArtifactRepository.model_validate(repository, extra="forbid")
    assert repository["s3"]["region"] == "eu-west-1"
    assert repository["s3"]["accessKeySecret"] == {"name": "keys", "key": "AWS_ACCESS_KEY_ID"}
    assert repository["s3"]["secretKeySecret"] == {"name": "keys", "key": "AWS_SECRET_ACCESS_KEY"}
    assert "useSDKCreds" not in repository["s3"]
    for step in STEP_NAMES:
        container = _templates(resources["orch-fraud-template"].manifest())[step]["container"]
        assert container["envFrom"] == [{"secretRef": {"name": "keys"}}]


def test_runner_account_carries_its_role() -> None:
    role = "arn:aws:iam::123456789012:role/runner"
    resources, _ = _render(_args(_spec("dev"), runner_annotations={"eks.amazonaws.com/role-arn": role}))
    account = resources["orch-runner-sa"].manifest()
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": role}


def test_accounts_have_least_privilege() -> None:
    spec = _spec("staging")
    resources, _ = _render(_args(spec))
    pipelines, monitoring = spec.cluster.namespaces.pipelines, spec.cluster.namespaces.monitoring

    runner_role = resources["orch-runner-role"].manifest()
    assert runner_role["metadata"]["namespace"] == pipelines
    assert runner_role["rules"] == [
        {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}
    ]

    submitter = resources["orch-submitter-sa"].manifest()
    assert submitter["metadata"] == {
        **submitter["metadata"],
        "name": SUBMITTER_SERVICE_ACCOUNT,
        "namespace": monitoring,
    }
    role = resources["orch-submitter-role"].manifest()
    assert role["metadata"]["namespace"] == pipelines
    rules = {rule["resources"][0]: rule for rule in role["rules"]}
    assert set(rules) == {"workflows", "workflowtemplates"}
    assert rules["workflows"]["verbs"] == ["create", "get", "list", "watch"]
    assert rules["workflowtemplates"] == {
        "apiGroups": ["argoproj.io"],
        "resources": ["workflowtemplates"],
        "verbs": ["get"],
        "resourceNames": [f"{m}-pipeline" for m in sorted(spec.models)],
    }
    binding = resources["orch-submitter-binding"].manifest()
    assert binding["metadata"]["namespace"] == pipelines
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": SUBMITTER_SERVICE_ACCOUNT,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": SUBMITTER_SERVICE_ACCOUNT, "namespace": monitoring}
    ]


def test_no_models_grants_no_template_access() -> None:
    data = read_stack_file(stack_file("dev"))["config"]["loopform:platform"]
    data["models"] = {}
    spec = parse_spec(data, "test")
    resources, outputs = _render(_args(spec))
    rules = resources["orch-submitter-role"].manifest()["rules"]
    # An empty resourceNames list would mean "every template": the rule must be absent instead.
    assert [rule["resources"] for rule in rules] == [["workflows"]]
    assert outputs["workflow_templates"] == {} and outputs["cron_workflows"] == {}
    assert not any(r.kind in {"WorkflowTemplate", "CronWorkflow"} for r in resources.values())


def test_step_environment_outputs_reach_every_step() -> None:
    spec = _spec("dev")
    args = _args(
        spec,
        step_env={
            "MLFLOW_TRACKING_URI": pulumi.Output.from_input("http://mlflow.ml.svc:5000"),
            "FEAST_PROJECT": "loopform",
        },
        static_keys_secret="loopform-object-store",
    )
    resources, _ = _render(args)
    doc = resources["orch-fraud-template"].manifest()
    argo.WorkflowTemplate.model_validate(doc, extra="forbid")
    for step in STEP_NAMES:
        container = _templates(doc)[step]["container"]
        assert container["env"] == [
            {"name": "FEAST_PROJECT", "value": "loopform"},
            {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.ml.svc:5000"},
            # MLflow reads the pipeline identity's credentials file from $HOME/.mlflow/credentials.
            {"name": "HOME", "value": "/home/loopform"},
        ]
        assert container["envFrom"] == [{"secretRef": {"name": "loopform-object-store"}}]


def _keyring_path(chart: RenderedResource) -> str | None:
    """The keyring file a rendered Chart hands Helm (a FileAsset input), or None."""
    keyring = chart.inputs.get("keyring")
    return None if keyring is None else keyring.path


def test_the_chart_is_verified_only_with_a_keyring() -> None:
    """Helm checks argo-helm's signature (the chart's .prov) when the spec names a keyring; without one (the
    default, for users who have not fetched the key) the chart installs unverified rather than failing."""
    spec = _spec("prod")
    resources, _ = _render(_args(spec))
    chart = resources["orch-argo-workflows"]
    assert "verify" not in chart.inputs and _keyring_path(chart) is None

    signed = spec.model_copy(
        update={"orchestrator": spec.orchestrator.model_copy(update={"chart_keyring": "deploy/keys/argo-helm.gpg"})}
    )
    resources, _ = _render(_args(signed))
    chart = resources["orch-argo-workflows"]
    assert chart.inputs["verify"] is True
    assert _keyring_path(chart) == "deploy/keys/argo-helm.gpg"
