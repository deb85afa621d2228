"""The policy pack's guardrails: each rule on passing and violating objects, and the shipped stacks against all."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from components.model_service import manifests
from components.platform import model_services
from loopform.spec import Release, load_stack, stack_file
from policies import availability, gpu, hygiene, workloads
from policies.core import Resource, ResourceRule, Rule, StackRule, with_defaults
from policies.workloads import PIN_REQUIREMENT
from tests import records

RULES: list[Rule] = [*workloads.RULES, *availability.RULES, *gpu.RULES, *hygiene.RULES]
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
CRON_JOB = "kubernetes:batch/v1:CronJob"
WORKFLOW_TEMPLATE = "kubernetes:argoproj.io/v1alpha1:WorkflowTemplate"
CRON_WORKFLOW = "kubernetes:argoproj.io/v1alpha1:CronWorkflow"
CONFIG_MAP = "kubernetes:core/v1:ConfigMap"
CHART = "kubernetes:helm.sh/v4:Chart"
NODE_POOL = "kubernetes:karpenter.sh/v1:NodePool"
HPA = "kubernetes:autoscaling/v2:HorizontalPodAutoscaler"
PDB = "kubernetes:policy/v1:PodDisruptionBudget"
DIGEST = "sha256:" + "a" * 64
#: Policy config per shipped stack (what policies/config/<stack>.json should hold for these rules).
STACK_CONFIG: dict[str, dict[str, Any]] = {
    "dev": {},
    "staging": {"min_replicas": 2, "require_pdb": True},
    "prod": {"min_replicas": 2, "require_pdb": True},
}


def rule(name: str) -> Rule:
    (found,) = [r for r in RULES if r.name == name]
    return found


def run(name: str, type_: str, props: Mapping[str, Any], **config: Any) -> list[str]:
    """A resource rule's messages, with its schema defaults under `config`."""
    found = rule(name)
    assert isinstance(found, ResourceRule)
    assert found.types is None or type_ in found.types, f"{name} does not judge {type_}"
    return found.check(type_, props, with_defaults(found, config))


def run_stack(name: str, resources: list[Resource], **config: Any) -> list[tuple[Resource | None, str]]:
    found = rule(name)
    assert isinstance(found, StackRule)
    return found.check(resources, with_defaults(found, config))


def judge(rules: list[Rule], resources: list[Resource], config: Mapping[str, Any]) -> list[str]:
    """Every rule over every resource, as the pack would: `rule resource: message` per violation."""
    found = []
    for candidate in rules:
        settings = with_defaults(candidate, {k: v for k, v in config.items() if k in candidate.config})
        if isinstance(candidate, StackRule):
            found += [f"{candidate.name} {r.name if r else '-'}: {m}" for r, m in candidate.check(resources, settings)]
            continue
        for resource in resources:
            if candidate.types is None or resource.type in candidate.types:
                found += [
                    f"{candidate.name} {resource.name}: {m}"
                    for m in candidate.check(resource.type, resource.props, settings)
                ]
    return found


# --- objects -----------------------------------------------------------------------------------------------


def container(name: str = "app", **extra: Any) -> dict[str, Any]:
    """A container that meets every workload rule (with a hardened pod around it)."""
    return {
        "name": name,
        "image": "ghcr.io/loopform/app:1.2.3",
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        **extra,
    }


def pod_spec(**extra: Any) -> dict[str, Any]:
    return {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container()],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
        **extra,
    }


def deployment(spec: dict[str, Any] | None = None, *, labels: dict[str, str] | None = None, **fields: Any) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "app", "namespace": "serve", "labels": labels or {}},
        "spec": {
            "replicas": 2.0,
            "selector": {"matchLabels": {"app": "app"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": {"app": "app", **(labels or {})}}, "spec": spec or pod_spec()},
            **fields,
        },
    }


def workflow_template(templates: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "WorkflowTemplate",
        "metadata": {"name": "fraud-pipeline"},
        "spec": {
            "entrypoint": "pipeline",
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "templates": [{"name": "pipeline", "dag": {"tasks": []}}, *templates],
            **spec,
        },
    }


def with_change(props: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `props` with the dotted `path` (list indexes as numbers) set to `value`."""
    changed = copy.deepcopy(props)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target: Any = changed
    for key in parents:
        target = target[key]
    target[last] = value
    return changed


def test_every_rule_is_kebab_case_and_every_config_property_has_a_default() -> None:
    for candidate in RULES:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", candidate.name)
        assert all("default" in schema for schema in candidate.config.values()), candidate.name


# --- pod-security-restricted -------------------------------------------------------------------------------


def test_hardened_workload_meets_restricted() -> None:
    assert run("pod-security-restricted", DEPLOYMENT, deployment()) == []


def test_pod_level_settings_count_for_every_container_and_container_level_ones_suffice() -> None:
    # Pod-level runAsNonRoot and seccomp cover an init container that sets neither.
    spec = pod_spec(initContainers=[container("init")])
    assert run("pod-security-restricted", DEPLOYMENT, deployment(spec)) == []
    # Without pod-level settings, each container may carry its own.
    own = {"runAsNonRoot": True, "seccompProfile": {"type": "Localhost", "localhostProfile": "p.json"}}
    hardened = container(securityContext={**container()["securityContext"], **own})
    assert run("pod-security-restricted", DEPLOYMENT, deployment({"containers": [hardened]})) == []


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("spec.template.spec.hostNetwork", True, "pod: hostNetwork true (restricted: false or unset)"),
        ("spec.template.spec.hostPID", True, "pod: hostPID true"),
        (
            "spec.template.spec.volumes",
            [{"name": "docker", "hostPath": {"path": "/var/run/docker.sock"}}],
            "pod: volume docker is hostPath (restricted allows only configMap, csi, downwardAPI, emptyDir, ",
        ),
        ("spec.template.spec.volumes", [{"name": "share", "nfs": {"server": "x", "path": "/"}}], "volume share is nfs"),
        (
            "spec.template.spec.containers.0.securityContext.privileged",
            True,
            "container app: privileged true (restricted: false or unset)",
        ),
        (
            "spec.template.spec.containers.0.securityContext",
            {"capabilities": {"drop": ["ALL"]}},
            "container app: allowPrivilegeEscalation unset (restricted: false)",
        ),
        (
            "spec.template.spec.containers.0.securityContext.capabilities",
            {"drop": ["NET_RAW"]},
            "container app: capabilities.drop lacks ALL (restricted: drop ALL)",
        ),
        (
            "spec.template.spec.containers.0.securityContext.capabilities",
            {"drop": ["ALL"], "add": ["NET_BIND_SERVICE", "SYS_ADMIN"]},
            "container app: capabilities.add SYS_ADMIN (restricted: only NET_BIND_SERVICE)",
        ),
        (
            "spec.template.spec.containers.0.ports",
            [{"containerPort": 80, "hostPort": 8080.0}],
            "container app: hostPort 8080 (restricted: none)",
        ),
        ("spec.template.spec.securityContext.runAsNonRoot", False, "pod: runAsNonRoot false (restricted: true)"),
        (
            "spec.template.spec.securityContext",
            {"seccompProfile": {"type": "RuntimeDefault"}},
            "container app: runAsNonRoot unset in the pod and the container (restricted: true)",
        ),
        (
            "spec.template.spec.containers.0.securityContext.runAsUser",
            0,
            "container app: runAsUser 0 (restricted: non-zero)",
        ),
        (
            "spec.template.spec.securityContext.seccompProfile",
            {"type": "Unconfined"},
            "pod: seccompProfile.type Unconfined (restricted: RuntimeDefault or Localhost)",
        ),
        (
            "spec.template.spec.securityContext",
            {"runAsNonRoot": True},
            "container app: seccompProfile unset in the pod and the container",
        ),
        (
            "spec.template.spec.securityContext.sysctls",
            [{"name": "kernel.msgmax", "value": "65536"}],
            "pod: sysctl kernel.msgmax is not a safe sysctl",
        ),
        (
            "spec.template.spec.securityContext.seLinuxOptions",
            {"user": "system_u"},
            "pod: seLinuxOptions.user system_u (restricted: unset)",
        ),
        (
            "spec.template.spec.containers.0.securityContext.appArmorProfile",
            {"type": "Unconfined"},
            "container app: appArmorProfile.type Unconfined",
        ),
        (
            "spec.template.metadata.annotations",
            {"container.apparmor.security.beta.kubernetes.io/app": "unconfined"},
            "pod: annotation container.apparmor.security.beta.kubernetes.io/app unconfined",
        ),
        (
            "spec.template.spec.containers.0.securityContext.procMount",
            "Unmasked",
            "container app: procMount Unmasked (restricted: Default)",
        ),
        (
            "spec.template.spec.containers.0.readinessProbe",
            {"httpGet": {"host": "10.0.0.1", "path": "/", "port": 80}},
            "container app: readinessProbe.httpGet.host 10.0.0.1 (restricted: unset)",
        ),
        (
            "spec.template.spec.containers.0.securityContext.windowsOptions",
            {"hostProcess": True},
            "container app: securityContext.windowsOptions.hostProcess true",
        ),
    ],
)
def test_each_restricted_control_is_reported(path: str, value: Any, message: str) -> None:
    found = run("pod-security-restricted", DEPLOYMENT, with_change(deployment(), path, value))
    assert any(message in m for m in found), found


def test_windows_and_user_namespace_pods_are_exempt_where_admission_exempts_them() -> None:
    bare = container(securityContext={"allowPrivilegeEscalation": True})
    windows = pod_spec(os={"name": "windows"}, containers=[bare])
    # Windows pods skip privilege escalation, capabilities and seccomp; nothing else is relaxed.
    assert run("pod-security-restricted", DEPLOYMENT, deployment(windows)) == []
    user_ns = pod_spec(hostUsers=False, securityContext={"seccompProfile": {"type": "RuntimeDefault"}, "runAsUser": 0})
    assert run("pod-security-restricted", DEPLOYMENT, deployment(user_ns)) == []


def test_cron_job_pods_are_judged_through_the_job_template() -> None:
    spec = pod_spec(initContainers=[container("init", securityContext={"privileged": True})])
    cron = {"spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": {"spec": spec}}}}}
    found = run("pod-security-restricted", CRON_JOB, cron)
    assert "init container init: privileged true (restricted: false or unset)" in found
    assert "init container init: allowPrivilegeEscalation unset (restricted: false)" in found


def test_argo_templates_take_the_workflow_security_context_unless_they_set_their_own() -> None:
    step = {"name": "train", "container": container("train"), "sidecars": [container("log")]}
    assert run("pod-security-restricted", WORKFLOW_TEMPLATE, workflow_template([step])) == []
    # A template's own securityContext replaces the workflow's (the controller does not merge them).
    own = {**step, "securityContext": {"runAsUser": 1000}}
    found = run("pod-security-restricted", WORKFLOW_TEMPLATE, workflow_template([own]))
    assert "template train container main: runAsNonRoot unset in the pod and the container (restricted: true)" in found
    assert "template train sidecar log: seccompProfile unset in the pod and the container" in " ".join(found)
    # Init containers, script templates and templateDefaults are judged too.
    script = {"name": "report", "script": {**container("s"), "source": "print(1)"}, "initContainers": [container("i")]}
    defaults = {"container": {"securityContext": {"privileged": True}}}
    found = run("pod-security-restricted", WORKFLOW_TEMPLATE, workflow_template([script], hostNetwork=True))
    assert "template report: hostNetwork true (restricted: false or unset)" in found
    found = run("pod-security-restricted", WORKFLOW_TEMPLATE, workflow_template([step], templateDefaults=defaults))
    assert "template train container main: privileged true (restricted: false or unset)" in found


def test_secret_wrapped_properties_are_judged_unwrapped() -> None:
    secret = {"4dabf18193072939515e22adb298388d": "1b47061264138c4ac30d75fd1eb44270", "value": deployment()["spec"]}
    props = {**deployment(), "spec": secret}
    assert run("pod-security-restricted", DEPLOYMENT, props) == []
    hostile = {**secret, "value": with_change(deployment(), "spec.template.spec.hostIPC", True)["spec"]}
    assert run("pod-security-restricted", DEPLOYMENT, {**props, "spec": hostile}) == [
        "pod: hostIPC true (restricted: false or unset)"
    ]


# --- resources-requests-limits -----------------------------------------------------------------------------


def test_requests_and_a_memory_limit_pass_and_a_limit_counts_as_its_request() -> None:
    assert run("resources-requests-limits", DEPLOYMENT, deployment()) == []
    limits_only = container(resources={"limits": {"cpu": "1", "memory": "1Gi"}})
    assert run("resources-requests-limits", DEPLOYMENT, deployment(pod_spec(containers=[limits_only]))) == []


def test_missing_requests_and_limits_name_the_container_and_the_requirement() -> None:
    spec = pod_spec(initContainers=[container("migrate", resources={"requests": {"memory": "64Mi"}})])
    found = run("resources-requests-limits", DEPLOYMENT, deployment(spec))
    assert found == [
        "init container migrate: no cpu request (required_requests: cpu, memory)",
        "init container migrate: no memory limit (required_limits: memory)",
    ]
    found = run("resources-requests-limits", DEPLOYMENT, deployment(), required_limits=["memory", "cpu"])
    assert found == ["container app: no cpu limit (required_limits: memory, cpu)"]


def test_argo_step_resources_are_judged() -> None:
    step = {"name": "train", "container": container("train", resources={})}
    found = run("resources-requests-limits", WORKFLOW_TEMPLATE, workflow_template([step]))
    assert "template train container main: no memory limit (required_limits: memory)" in found


# --- no-latest-tag and images-pinned-by-digest -------------------------------------------------------------


@pytest.mark.parametrize(
    "image", ["redis:7.4", "ghcr.io:443/loopform/app:v1", f"redis@{DIGEST}", f"redis:latest@{DIGEST}"]
)
def test_tagged_or_digested_images_pass(image: str) -> None:
    props = deployment(pod_spec(containers=[container(image=image)]))
    assert run("no-latest-tag", DEPLOYMENT, props) == []


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("redis:latest", "container app: image redis:latest uses the latest tag (an explicit tag or a digest)"),
        (
            "ghcr.io:443/loopform/app",
            "container app: image ghcr.io:443/loopform/app has no tag (an explicit tag or a digest)",
        ),
    ],
)
def test_latest_or_missing_tags_are_reported(image: str, message: str) -> None:
    assert run("no-latest-tag", DEPLOYMENT, deployment(pod_spec(containers=[container(image=image)]))) == [message]


def test_chart_values_may_leave_the_tag_to_the_chart_but_not_set_latest() -> None:
    chart = {
        "chart": "argo-cd",
        "version": "7.8.2",
        "values": {"global": {"image": {"repository": "quay.io/argoproj/argocd"}}},
    }
    assert run("no-latest-tag", CHART, chart) == []
    latest = with_change(chart, "values.global.image.tag", "latest")
    assert run("no-latest-tag", CHART, latest) == [
        "chart argo-cd values.global.image: image quay.io/argoproj/argocd:latest uses the latest tag "
        "(an explicit tag or a digest)"
    ]


def test_digests_are_only_required_where_configured() -> None:
    props = deployment(
        pod_spec(containers=[container(image="redis:7.4"), container("pinned", image=f"redis@{DIGEST}")])
    )
    assert run("images-pinned-by-digest", DEPLOYMENT, props) == []
    assert run("images-pinned-by-digest", DEPLOYMENT, props, required=True) == [
        f"container app: image redis:7.4 is not pinned by digest ({PIN_REQUIREMENT})"
    ]
    assert run("images-pinned-by-digest", DEPLOYMENT, props, required=True, allowed_unpinned=["redis:"]) == []
    short = deployment(pod_spec(containers=[container(image="redis@sha256:abc")]))
    assert run("images-pinned-by-digest", DEPLOYMENT, short, required=True) == [
        f"container app: image redis@sha256:abc is not pinned by digest ({PIN_REQUIREMENT})"
    ]


def test_chart_value_images_are_judged_for_digests() -> None:
    block = {"registry": "quay.io", "repository": "argoproj/argocd", "tag": "v2.14.2"}
    chart = {"chart": "argo-cd", "version": "7.8.2", "values": {"global": {"image": block}}}
    assert run("images-pinned-by-digest", CHART, chart, required=True) == [
        "chart argo-cd values.global.image: image quay.io/argoproj/argocd:v2.14.2 is not pinned by digest "
        f"({PIN_REQUIREMENT})"
    ]
    pinned = with_change(chart, "values.global.image.digest", DIGEST)
    assert run("images-pinned-by-digest", CHART, pinned, required=True) == []


# --- serving-availability and serving-disruption-budget ----------------------------------------------------

MODEL = {"loopform.dev/model": "fraud"}


def test_model_service_with_enough_replicas_and_a_zero_unavailable_rollout_passes() -> None:
    assert run("serving-availability", DEPLOYMENT, deployment(labels=MODEL), min_replicas=2) == []
    # Deployments that are not model services are not judged.
    assert (
        run("serving-availability", DEPLOYMENT, with_change(deployment(), "spec.replicas", 1.0), min_replicas=2) == []
    )


def test_model_service_availability_violations_name_numbers_and_thresholds() -> None:
    few = with_change(deployment(labels=MODEL), "spec.replicas", 1.0)
    assert run("serving-availability", DEPLOYMENT, few, min_replicas=2) == [
        "Deployment app: replicas 1 < 2 (min_replicas)"
    ]
    default_rollout = with_change(deployment(labels=MODEL), "spec.strategy", {"type": "RollingUpdate"})
    assert run("serving-availability", DEPLOYMENT, default_rollout) == [
        "Deployment app: rollingUpdate.maxUnavailable unset (25% by default) > 0 "
        "(a rollout must keep every serving pod until its replacement is ready)"
    ]
    recreate = with_change(deployment(labels=MODEL), "spec.strategy", {"type": "Recreate"})
    assert (
        "strategy Recreate stops every pod before starting new ones"
        in run("serving-availability", DEPLOYMENT, recreate)[0]
    )
    quarter = with_change(deployment(labels=MODEL), "spec.strategy.rollingUpdate.maxUnavailable", "25%")
    assert "rollingUpdate.maxUnavailable 25% > 0" in run("serving-availability", DEPLOYMENT, quarter)[0]


def test_model_service_autoscaler_keeps_min_replicas() -> None:
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "fraud-service", "labels": MODEL},
        "spec": {"minReplicas": 3.0, "maxReplicas": 10.0},
    }
    assert run("serving-availability", HPA, hpa, min_replicas=3) == []
    assert run("serving-availability", HPA, hpa, min_replicas=4) == [
        "HorizontalPodAutoscaler fraud-service: minReplicas 3 < 4 (min_replicas)"
    ]


def _budget(namespace: str = "serve", selector: dict | None = None) -> Resource:
    props = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "app", "namespace": namespace},
        "spec": {"maxUnavailable": 1, "selector": selector or {"matchLabels": {"app": "app"}}},
    }
    return Resource(PDB, "app-pdb", props)


def test_disruption_budget_is_required_only_where_configured() -> None:
    service = Resource(DEPLOYMENT, "app", deployment(labels=MODEL))
    assert run_stack("serving-disruption-budget", [service]) == []
    assert run_stack("serving-disruption-budget", [service, _budget()], require_pdb=True) == []
    expressions = {"matchExpressions": [{"key": "app", "operator": "In", "values": ["app", "other"]}]}
    assert run_stack("serving-disruption-budget", [service, _budget(selector=expressions)], require_pdb=True) == []
    message = "Deployment app: no PodDisruptionBudget in namespace serve selects its pods (require_pdb)"
    for others in ([], [_budget(namespace="elsewhere")], [_budget(selector={"matchLabels": {"app": "other"}})]):
        assert run_stack("serving-disruption-budget", [service, *others], require_pdb=True) == [(service, message)]


# --- gpu-workloads-on-declared-pools -----------------------------------------------------------------------

TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}
GPU = {
    "requests": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
    "limits": {"memory": "4Gi", "nvidia.com/gpu": "1"},
}


def node_pool(name: str = "loopform-dev-gpu", labels: dict | None = None) -> Resource:
    spec = {
        "template": {
            "metadata": {"labels": labels or {"loopform.dev/gpu-pool": "gpu"}},
            "spec": {
                "requirements": [
                    {"key": "karpenter.k8s.aws/instance-family", "operator": "In", "values": ["g5", "g6"]}
                ],
                "taints": [TAINT],
            },
        },
        "limits": {"nvidia.com/gpu": "4"},
    }
    return Resource(NODE_POOL, "dev-gpu-gpu-node-pool", {"metadata": {"name": name}, "spec": spec})


def existing_pool() -> Resource:
    props = {
        "pool": "a10g",
        "kind": "existing",
        "nodeLabels": {"eks.amazonaws.com/nodegroup": "gpu-a10g"},
        "taints": [TAINT],
    }
    return Resource(gpu.GPU_POOL_COMPONENT, "prod-gpu-a10g", props)


def train_step(**scheduling: Any) -> Resource:
    step = {"name": "train", "container": container("train", resources=GPU), **scheduling}
    validate = {"name": "validate", "container": container("validate")}
    return Resource(WORKFLOW_TEMPLATE, "fraud-template", workflow_template([validate, step]))


def test_gpu_step_on_a_karpenter_pool_or_an_existing_pool_passes() -> None:
    on_karpenter = train_step(nodeSelector={"loopform.dev/gpu-pool": "gpu"}, tolerations=[TOLERATION])
    assert run_stack("gpu-workloads-on-declared-pools", [node_pool(), on_karpenter]) == []
    on_existing = train_step(nodeSelector={"eks.amazonaws.com/nodegroup": "gpu-a10g"}, tolerations=[TOLERATION])
    assert run_stack("gpu-workloads-on-declared-pools", [existing_pool(), on_existing]) == []
    # Required node affinity selects too, and a toleration of every NoSchedule taint tolerates this one.
    term = {"matchExpressions": [{"key": "karpenter.sh/nodepool", "operator": "In", "values": ["loopform-dev-gpu"]}]}
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}
    by_affinity = train_step(affinity=affinity, tolerations=[{"operator": "Exists", "effect": "NoSchedule"}])
    assert run_stack("gpu-workloads-on-declared-pools", [node_pool(), by_affinity]) == []
    # Workflow-level scheduling applies to templates that set none.
    workflow_level = train_step()
    workflow_level.props["spec"].update(nodeSelector={"loopform.dev/gpu-pool": "gpu"}, tolerations=[TOLERATION])
    assert run_stack("gpu-workloads-on-declared-pools", [node_pool(), workflow_level]) == []


def test_gpu_step_without_toleration_or_declared_pool_is_reported() -> None:
    where = "WorkflowTemplate fraud-pipeline template train container main (nvidia.com/gpu 1)"
    untolerated = train_step(nodeSelector={"loopform.dev/gpu-pool": "gpu"})
    assert run_stack("gpu-workloads-on-declared-pools", [node_pool(), untolerated]) == [
        (
            untolerated,
            f"{where}: no toleration for taint nvidia.com/gpu=present:NoSchedule of NodePool loopform-dev-gpu",
        )
    ]
    declared = (
        "declared pools: NodePool loopform-dev-gpu (karpenter.sh/nodepool=loopform-dev-gpu, loopform.dev/gpu-pool=gpu)"
    )
    unselected = train_step(tolerations=[TOLERATION])
    assert run_stack("gpu-workloads-on-declared-pools", [node_pool(), unselected]) == [
        (unselected, f"{where}: selects no GPU pool (no nodeSelector or required node affinity) ({declared})")
    ]
    elsewhere = train_step(nodeSelector={"loopform.dev/gpu-pool": "big"}, tolerations=[TOLERATION])
    assert run_stack("gpu-workloads-on-declared-pools", [node_pool(), elsewhere]) == [
        (elsewhere, f"{where}: nodeSelector loopform.dev/gpu-pool=big matches no declared GPU pool ({declared})")
    ]
    # An existing pool is only declared through its GpuNodePool component.
    on_existing = train_step(nodeSelector={"eks.amazonaws.com/nodegroup": "gpu-a10g"}, tolerations=[TOLERATION])
    (found,) = run_stack("gpu-workloads-on-declared-pools", [on_existing])
    assert "matches no declared GPU pool (declared pools: none)" in found[1]


def test_gpu_deployment_is_judged_and_cpu_workloads_are_not() -> None:
    gpu_app = container(resources={"limits": {"memory": "1Gi", "nvidia.com/gpu": 1.0}})
    service = Resource(DEPLOYMENT, "app", deployment(pod_spec(containers=[gpu_app])))
    (found,) = run_stack("gpu-workloads-on-declared-pools", [node_pool(), service])
    assert found[1].startswith("Deployment app container app (nvidia.com/gpu 1): selects no GPU pool")
    cpu_only = Resource(DEPLOYMENT, "cpu", deployment())
    assert run_stack("gpu-workloads-on-declared-pools", [cpu_only]) == []


# --- no-secrets-in-config ----------------------------------------------------------------------------------


def config_map(data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": data}


def test_plain_configuration_and_references_to_secrets_pass() -> None:
    data = {
        "feature_store.yaml": "registry:\n  path: ${FEAST_REGISTRY_URL}\n",
        "secretName": "db-credentials",
        "passwordKey": "POSTGRES_PASSWORD",
        "example": "postgresql+psycopg2://user:pass@host:5432/db",
        "templated": "redis://default:${REDIS_PASSWORD}@redis:6379",
        "connection": "host=db user=feast password=${FEAST_REGISTRY_PASSWORD}",
        # A digest that rolls pods when the password rotates: it reveals nothing usable.
        "loopform.dev/redis-password-checksum": "3f2a9c1e",
    }
    assert run("no-secrets-in-config", CONFIG_MAP, config_map(data)) == []
    env = [
        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
        {"name": "TRACKING_URI", "value": "http://mlflow:5000"},
        {"name": "PASSWORD_FILE", "value": "/secrets/password"},
    ]
    assert run("no-secrets-in-config", DEPLOYMENT, deployment(pod_spec(containers=[container(env=env)]))) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"db_password": "hunter2"}, "data key db_password holds a value and names a credential (put it in a Secret)"),
        ({"api-key": "abc"}, "data key api-key holds a value and names a credential"),
        (
            {"url": "postgresql://mlflow:s3cr3t@db:5432/mlflow"},
            "data key url holds a URL with a password (put it in a Secret)",
        ),
        ({"redis": "redis:6379,ssl=true,password=hunter2"}, "data key redis holds a connection string password"),
        ({"aws": "key = AKIAABCDEFGHIJKLMNOP"}, "data key aws holds an AWS access key id"),
        ({"tls": "-----BEGIN RSA PRIVATE KEY-----\nMIIB..."}, "data key tls holds a PEM private key"),
    ],
)
def test_credentials_in_config_maps_are_reported(data: dict[str, str], message: str) -> None:
    (found,) = run("no-secrets-in-config", CONFIG_MAP, config_map(data))
    assert found.startswith(message)


def test_credentials_in_env_values_and_chart_values_are_reported() -> None:
    env = [{"name": "REDIS_PASSWORD", "value": "hunter2"}, {"name": "DATABASE_URL", "value": "postgres://u:p4ss@db/x"}]
    props = deployment(pod_spec(containers=[container(env=env)]))
    assert run("no-secrets-in-config", DEPLOYMENT, props) == [
        "container app: env REDIS_PASSWORD has a literal value and names a credential (use valueFrom.secretKeyRef)",
        "container app: env DATABASE_URL holds a URL with a password (use valueFrom.secretKeyRef)",
    ]
    values = {"configs": {"secret": {"argocdServerAdminPassword": "$2a$10$abc"}}, "redis": {"existingSecret": "redis"}}
    chart = {"chart": "argo-cd", "version": "7.8.2", "values": values}
    assert run("no-secrets-in-config", CHART, chart) == [
        "chart argo-cd values.configs.secret.argocdServerAdminPassword is a literal credential (use an existing Secret)"
    ]
    assert run("no-secrets-in-config", CHART, chart, allowed_names=["argocdServerAdminPassword"]) == []


# --- helm-charts-pinned ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["7.8.2", "v0.17.1", "1.0.0-rc.1", "1.2.3+build.5"])
def test_exact_chart_versions_pass(version: str) -> None:
    assert run("helm-charts-pinned", CHART, {"chart": "argo-cd", "version": version}) == []


@pytest.mark.parametrize("version", ["^7.8.2", "~7.8", ">=7.0.0", "*", "7.x", "7.8", "7.8.2 || 7.9.0"])
def test_chart_version_ranges_are_reported(version: str) -> None:
    assert run("helm-charts-pinned", "kubernetes:helm.sh/v3:Release", {"chart": "argo-cd", "version": version}) == [
        f"chart argo-cd: version {version} is not an exact version (no ranges or wildcards; e.g. 1.2.3)"
    ]


def test_chart_without_version_is_reported_unless_it_is_local() -> None:
    assert run("helm-charts-pinned", CHART, {"chart": "dcgm-exporter"}) == [
        "chart dcgm-exporter: no version (Helm would take the newest; an exact version like 1.2.3 required)"
    ]
    assert run("helm-charts-pinned", "kubernetes:helm.sh/v3:Chart", {"chart": "./charts/ours"}) == []


# --- the shipped stacks ------------------------------------------------------------------------------------


def resources_of(rendered_resources: list[Any]) -> list[Resource]:
    return [Resource(r.type_, r.name, r.inputs, r.urn) for r in rendered_resources]


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_shipped_stacks_pass_every_guardrail(rendered, stack: str) -> None:
    assert judge(RULES, resources_of(rendered(stack)), STACK_CONFIG[stack]) == []


def _type(manifest: Mapping[str, Any]) -> str:
    api_version = str(manifest["apiVersion"])
    return f"kubernetes:{api_version if '/' in api_version else 'core/' + api_version}:{manifest['kind']}"


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_released_model_services_pass_every_guardrail(stack: str) -> None:
    """The GitOps road: the manifests Argo CD applies, as `loopform check` sends them to the pack."""
    spec = load_stack(stack_file(stack))
    release = Release.model_validate(records.release(stack))
    models = {name: model.model_copy(update={"release": release}) for name, model in spec.models.items()}
    objects = [m for service in model_services(spec.model_copy(update={"models": models})) for m in manifests(service)]
    assert {m["kind"] for m in objects} >= {"Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    resources = [Resource(_type(m), m["metadata"]["name"], m) for m in objects]
    assert judge(RULES, resources, STACK_CONFIG[stack]) == []
    # The services' own replica counts are what the rules judge (prod runs 3, staging 2, dev 1).
    replicas = spec.models["fraud"].serving.min_replicas
    assert (
        f"serving-availability fraud-service: Deployment fraud-service: replicas {replicas} < 4 (min_replicas)"
        in judge(RULES, resources, {"min_replicas": 4})
    )


def _image_fields(value: Any) -> Iterator[str]:
    """Every `image` string anywhere in a resource's inputs (found without the rules' own helpers)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key == "image" and isinstance(item, str):
                yield item
            elif key == "image" and isinstance(item, Mapping) and "repository" in item:
                registry = f"{item['registry']}/" if "registry" in item else ""
                yield f"{registry}{item['repository']}:{item['tag']}"
            else:
                yield from _image_fields(item)
    elif isinstance(value, list):
        for item in value:
            yield from _image_fields(item)


def test_prod_images_are_not_pinned_by_digest_yet_and_each_is_reported(rendered) -> None:
    resources = resources_of(rendered("prod"))
    found = judge([rule("images-pinned-by-digest")], resources, {"required": True})
    expected = sorted((r.name, image) for r in resources for image in _image_fields(r.props))
    assert expected, "prod runs images"
    reported = sorted(
        (m.split(":", 1)[0].removeprefix("images-pinned-by-digest "), re.search(r"image (\S+) is not pinned", m)[1])
        for m in found
    )
    assert reported == expected
    assert all(m.endswith(f"is not pinned by digest ({PIN_REQUIREMENT})") for m in found)


def test_prod_existing_gpu_pool_is_declared_by_its_component(rendered) -> None:
    resources = resources_of(rendered("prod"))
    (pool,) = gpu.declared_pools(resources, with_defaults(rule("gpu-workloads-on-declared-pools"), {}))
    assert pool.labels == {"eks.amazonaws.com/nodegroup": "gpu-a10g"}
    assert pool.taints == (TAINT,)
    # Without the GpuNodePool component nothing in the stack declares the pool: the train step would fail.
    without = [r for r in resources if r.type != gpu.GPU_POOL_COMPONENT]
    found = run_stack("gpu-workloads-on-declared-pools", without)
    assert found and all("template train" in m and "matches no declared GPU pool" in m for _, m in found)


def test_rules_judge_the_analyzers_read_only_proxies_as_the_pack_hands_them_over(rendered) -> None:
    """Under Pulumi the analyzer wraps properties in read-only proxies; the pack turns them into plain data."""
    from pulumi_policy.proxy import unknown_checking_proxy

    from policies.pack import plain

    resources = resources_of(rendered("prod"))
    proxied = [Resource(r.type, r.name, plain(unknown_checking_proxy(dict(r.props))), r.urn) for r in resources]
    config = {"required": True, "min_replicas": 2, "require_pdb": True}
    assert judge(RULES, proxied, config) == judge(RULES, resources, config) != []
