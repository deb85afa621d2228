"""`loopform check`: the policy pack over the analyzer gRPC protocol, offline.

Most tests start the test double in tests/fixtures/policy_pack (the real `policies.pack` wrapping over two fake
rules: `test-replicas`, a resource rule, and `test-labels`, a stack rule, each with config defaults) exactly as
Pulumi starts a pack, so they do not depend on the real rule modules.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from loopform import check
from loopform.check import (
    GITOPS_POLICY,
    CheckError,
    PolicyConfig,
    PolicyConfigError,
    PolicyInfo,
    Violation,
    analyze,
    gitops_drift,
    manifest_resources,
    manifest_type,
    policy_config_path,
    reconcile_config,
    root_urn,
    run_pack,
)
from loopform.cli import main
from loopform.render import RenderedResource, write_services
from loopform.spec import CONFIG_KEY
from tests import records

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / "tests" / "fixtures" / "policy_pack"
SECRET = {"4dabf18193072939515e22adb298388d": "1b47061264138c4ac30d75fd1eb44270"}
RELEASE = records.release("dev")


def _config(tmp_path: Path, data: dict[str, Any], name: str = "policy.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _component() -> RenderedResource:
    return RenderedResource(
        type_="test:index:App",
        name="app",
        urn="urn:pulumi:dev::loopform::test:index:App::app",
        parent=root_urn("dev"),
        custom=False,
        inputs={},
    )


def _deployment(name: str = "web", replicas: float = 1.0, labels: dict | None = None, secret: bool = False):
    spec = {"replicas": replicas}
    return RenderedResource(
        type_="kubernetes:apps/v1:Deployment",
        name=name,
        urn=f"urn:pulumi:dev::loopform::test:index:App$kubernetes:apps/v1:Deployment::{name}",
        parent="urn:pulumi:dev::loopform::test:index:App::app",
        custom=True,
        inputs={
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": {"team": "ml"} if labels is None else labels},
            # As the mocks record a secret input: the whole top-level property wrapped.
            "spec": {**SECRET, "value": spec} if secret else spec,
        },
    )


def _by_policy(violations: list[Violation]) -> dict[str, list[Violation]]:
    found: dict[str, list[Violation]] = {}
    for violation in violations:
        found.setdefault(violation.policy, []).append(violation)
    return found


# --- the protocol, end to end with the test pack ------------------------------------------------------------


def test_mandatory_violation_names_policy_resource_and_message(tmp_path: Path) -> None:
    web = _deployment(replicas=1.0)
    violations = analyze([_component(), web], _config(tmp_path, {}), PACK, "dev")
    assert violations == [
        Violation(
            policy="test-replicas",
            level="mandatory",  # the pack's default level
            urn=web.urn,  # the pack answers Analyze with an empty URN: the request's is kept
            type_="kubernetes:apps/v1:Deployment",
            name="web",
            message="replicas 1 < 2 (minReplicas)",  # the schema default, filled in before Configure
            description="Deployments run enough replicas.",
        )
    ]


def test_levels_come_from_the_policy_entry_then_all_then_the_pack(tmp_path: Path) -> None:
    resources = [_component(), _deployment(replicas=1.0, labels={})]
    everything_advisory = analyze(resources, _config(tmp_path, {"all": "advisory"}), PACK, "dev")
    assert {(v.policy, v.level) for v in everything_advisory} == {
        ("test-replicas", "advisory"),
        ("test-labels", "advisory"),
    }
    mixed = _config(tmp_path, {"all": "advisory", "test-labels": {"enforcementLevel": "mandatory"}}, "mixed.json")
    assert {(v.policy, v.level) for v in analyze(resources, mixed, PACK, "dev")} == {
        ("test-replicas", "advisory"),
        ("test-labels", "mandatory"),
    }
    disabled = _config(tmp_path, {"test-replicas": "disabled"}, "disabled.json")
    assert {(v.policy, v.level) for v in analyze(resources, disabled, PACK, "dev")} == {("test-labels", "mandatory")}


def test_schema_defaults_apply_and_the_file_overrides_them(tmp_path: Path) -> None:
    resources = [_component(), _deployment(replicas=2.0)]
    run = run_pack(resources, _config(tmp_path, {}), PACK, "dev")
    assert run.violations == []
    assert run.policies["test-replicas"] == PolicyConfig("mandatory", {"minReplicas": 2})
    assert run.policies["test-labels"] == PolicyConfig("mandatory", {"label": "team", "maxResources": 1000})

    stricter = _config(tmp_path, {"test-replicas": {"minReplicas": 3}, "test-labels": {"label": "owner"}}, "s.json")
    found = _by_policy(analyze(resources, stricter, PACK, "dev"))
    assert [v.message for v in found["test-replicas"]] == ["replicas 2 < 3 (minReplicas)"]
    assert [v.message for v in found["test-labels"]] == ["label 'owner' missing"]


def test_secret_inputs_reach_the_rules_unwrapped(tmp_path: Path) -> None:
    web = _deployment(replicas=1.0, secret=True)
    assert [v.message for v in analyze([_component(), web], _config(tmp_path, {}), PACK, "dev")] == [
        "replicas 1 < 2 (minReplicas)"
    ]


def test_stack_rules_see_components_and_stack_wide_violations_land_on_the_stack(tmp_path: Path) -> None:
    # Three resources reach AnalyzeStack: the stack itself (added as the engine registers it), the component
    # and the Deployment.
    config = _config(tmp_path, {"test-labels": {"maxResources": 2}})
    run = run_pack([_component(), _deployment(replicas=2.0)], config, PACK, "dev")
    assert run.resources == 3
    (violation,) = run.violations
    assert violation.message == "3 resources > 2 (maxResources)"
    assert (violation.type_, violation.name, violation.urn) == ("pulumi:pulumi:Stack", "loopform-dev", root_urn("dev"))


def test_every_registration_goes_to_analyze_and_analyze_stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """As the engine's step generator: Analyze for every registered resource (components and the stack included,
    no custom-only filter), AnalyzeStack with all of them and their parents."""
    sent: dict[str, list[Any]] = {}
    real_call = check._Pack.call

    def spy(self: Any, method: str, request: Any) -> Any:
        sent.setdefault(method, []).append(request)
        return real_call(self, method, request)

    monkeypatch.setattr(check._Pack, "call", spy)
    web = _deployment(replicas=2.0)
    analyze([_component(), web], _config(tmp_path, {}), PACK, "dev")
    assert [m for m in sent if m != "Analyze"] == ["GetAnalyzerInfo", "Configure", "ConfigureStack", "AnalyzeStack"]
    assert [r.type for r in sent["Analyze"]] == ["pulumi:pulumi:Stack", "test:index:App", web.type_]
    (stack_request,) = sent["AnalyzeStack"]
    assert {r.urn: r.parent for r in stack_request.resources} == {
        root_urn("dev"): "",
        _component().urn: root_urn("dev"),
        web.urn: _component().urn,
    }
    (configure,) = sent["Configure"]
    assert set(configure.policyConfig) == {"test-replicas", "test-labels"}


def test_the_pack_is_stopped_after_a_run_and_after_a_refusal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def recording(*args: Any, **kwargs: Any) -> subprocess.Popen:
        process = real_popen(*args, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(subprocess, "Popen", recording)
    analyze([_component()], _config(tmp_path, {}), PACK, "dev")
    with pytest.raises(PolicyConfigError):
        analyze([_component()], _config(tmp_path, {"nope": "advisory"}, "bad.json"), PACK, "dev")
    assert len(started) == 2
    assert all(process.poll() is not None for process in started)
    # Started as Pulumi starts a Python pack, in the pack's folder.
    argv = started[0].args
    assert argv[1:] == ["-u", "-m", "pulumi.policy", "127.0.0.1:0", str(PACK)]


def test_a_pack_that_dies_is_reported_with_its_stderr(tmp_path: Path) -> None:
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "__main__.py").write_text("import policies_rules_that_do_not_exist\n")
    with pytest.raises(CheckError) as error:
        analyze([_component()], _config(tmp_path, {}), pack, "dev")
    message = str(error.value)
    assert "exited with status 1 before it printed its port" in message
    assert "No module named 'policies_rules_that_do_not_exist'" in message


def test_a_folder_without_a_pack_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckError, match="not a policy pack"):
        analyze([], _config(tmp_path, {}), tmp_path, "dev")


# --- policy config: what the CLI does before Configure -----------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"test-replicas": {"minReplicas": "two"}}, "test-replicas: minReplicas: 'two' is not of type 'integer'"),
        ({"test-replicas": {"minReplicas": 0}}, "test-replicas: minReplicas: 0 is less than the minimum of 1"),
        ({"test-replicaz": "advisory"}, "test-replicaz: no such policy in the pack"),
        ({"test-labels": {"lable": "team"}}, "test-labels: unknown property 'lable'"),
        ({"test-labels": "blocking"}, "test-labels: 'blocking' is not an enforcement level"),
        ({"all": {"enforcementLevel": "advisory", "label": "x"}}, "all: only an enforcement level applies"),
    ],
)
def test_invalid_config_is_refused_naming_the_policy(tmp_path: Path, config: dict, expected: str) -> None:
    with pytest.raises(PolicyConfigError) as error:
        analyze([_component()], _config(tmp_path, config), PACK, "dev")
    assert expected in str(error.value)


def test_every_config_problem_is_listed_at_once() -> None:
    policies = [
        PolicyInfo("a", "mandatory", {"properties": {"n": {"type": "integer", "default": 1}}, "required": ["n"]}),
        PolicyInfo("b", "advisory", None),
    ]
    with pytest.raises(PolicyConfigError) as error:
        reconcile_config(policies, {"a": {"n": 1.5}, "b": {"x": 1}, "c": "advisory"})
    assert error.value.problems == [
        "c: no such policy in the pack (policies: a, b)",
        "a: n: 1.5 is not of type 'integer'",
        "b: takes no configuration (got x)",
    ]


def test_reconcile_layers_defaults_initial_config_and_file() -> None:
    policies = [
        PolicyInfo("a", "mandatory", {"properties": {"n": {"type": "integer", "default": 1}}}),
        PolicyInfo("b", "advisory", None),
    ]
    initial = {"a": PolicyConfig("advisory", {"n": 2})}
    assert reconcile_config(policies, {}, initial) == {
        "a": PolicyConfig("advisory", {"n": 2}),
        "b": PolicyConfig("advisory", {}),
    }
    assert reconcile_config(policies, {"all": "mandatory", "a": {"n": 3}}, initial) == {
        "a": PolicyConfig("mandatory", {"n": 3}),
        "b": PolicyConfig("mandatory", {}),
    }
    assert reconcile_config(policies, {"all": "disabled", "b": "advisory"})["b"] == PolicyConfig("advisory", {})


def test_policy_config_path_prefers_the_flag_then_beside_the_file_then_the_repo(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "policies" / "config").mkdir(parents=True)
    repo_config = root / "policies" / "config" / "prod.json"
    local = tmp_path / ".loopform" / "local"
    (local / "stacks").mkdir(parents=True)
    (local / "policy").mkdir()
    stack = local / "stacks" / "Pulumi.prod.yaml"
    with pytest.raises(CheckError, match="no policy config for stack prod"):
        policy_config_path("prod", root, stack)
    repo_config.write_text("{}")
    assert policy_config_path("prod", root) == repo_config
    assert policy_config_path("prod", root, stack) == repo_config
    (local / "policy" / "prod.json").write_text("{}")
    assert policy_config_path("prod", root, stack) == local / "policy" / "prod.json"
    given = _config(tmp_path, {})
    assert policy_config_path("prod", root, stack, given) == given
    with pytest.raises(CheckError, match="does not exist"):
        policy_config_path("prod", root, stack, tmp_path / "missing.json")


# --- the GitOps folder -------------------------------------------------------------------------------------


def test_manifests_become_resources_with_kubernetes_type_tokens(tmp_path: Path) -> None:
    (tmp_path / "a.service.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}})
    )
    (tmp_path / "b.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: b}\n---\n"
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-net}\n"
    )
    (tmp_path / "README.md").write_text("not applied")
    resources = manifest_resources("dev", tmp_path, parent="urn:parent")
    assert [(r.type_, r.name, r.urn) for r in resources] == [
        ("kubernetes:core/v1:Service", "a", "urn:pulumi:dev::loopform::argocd$kubernetes:core/v1:Service::a"),
        ("kubernetes:apps/v1:Deployment", "b", "urn:pulumi:dev::loopform::argocd$kubernetes:apps/v1:Deployment::b"),
        (
            "kubernetes:networking.k8s.io/v1:NetworkPolicy",
            "b-net",
            "urn:pulumi:dev::loopform::argocd$kubernetes:networking.k8s.io/v1:NetworkPolicy::b-net",
        ),
    ]
    assert all(r.custom and r.parent == "urn:parent" for r in resources)
    assert manifest_type({"apiVersion": "argoproj.io/v1alpha1", "kind": "Application"}) == (
        "kubernetes:argoproj.io/v1alpha1:Application"
    )


def _released_root(tmp_path: Path) -> Path:
    """A root whose dev stack has a released model and whose deploy/dev is what render writes."""
    root = tmp_path / "root"
    document = yaml.safe_load((ROOT / "stacks" / "Pulumi.dev.yaml").read_text())
    document["config"][CONFIG_KEY]["models"]["fraud"]["release"] = RELEASE
    (root / "stacks").mkdir(parents=True)
    (root / "stacks" / "Pulumi.dev.yaml").write_text(yaml.safe_dump(document))
    (root / "models").symlink_to(ROOT / "models")  # the spec checks each model's folder
    write_services("dev", root)
    return root


def test_gitops_drift_names_each_differing_missing_and_extra_file(tmp_path: Path) -> None:
    root = _released_root(tmp_path)
    folder = root / "deploy" / "dev"
    assert (folder / "fraud-service.deployment.yaml").exists()
    assert gitops_drift("dev", root) == []

    (folder / "fraud-service.deployment.yaml").write_text(
        (folder / "fraud-service.deployment.yaml").read_text() + "# hand edit\n"
    )
    (folder / "fraud-service.service.yaml").unlink()
    (folder / "extra.configmap.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: extra}\n")
    (folder / ".gitkeep").write_text("")
    drift = gitops_drift("dev", root)
    assert {(v.policy, v.level) for v in drift} == {(GITOPS_POLICY, "mandatory")}
    assert [v.message for v in drift] == [
        "deploy/dev/extra.configmap.yaml is extra: `loopform render --stack dev` does not write it",
        "deploy/dev/fraud-service.deployment.yaml differs from what `loopform render --stack dev` writes",
        "deploy/dev/fraud-service.service.yaml is missing: `loopform render --stack dev` writes it",
    ]


# --- the command -------------------------------------------------------------------------------------------


def test_check_command_exits_1_on_a_mandatory_violation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, {"test-labels": {"label": "loopform.dev/environment"}})
    code = main(["check", "--stack", "dev", "--policy-pack", str(PACK), "--policy-config", str(config)])
    out = capsys.readouterr().out
    assert code == 1
    lines = out.splitlines()
    registry = next(line for line in lines if "dev-registry-server" in line)
    assert registry.split() == [
        "mandatory",
        "test-replicas",
        "kubernetes:apps/v1:Deployment",
        "dev-registry-server",
        *["replicas", "1", "<", "2", "(minReplicas)"],
    ]
    assert "test-labels" not in out  # every object the program declares carries the environment label
    # The single-replica Deployments of dev: the registry, the feature server and the Pushgateway (one replica by
    # design: pushes to two would split each monitor's figures between them).
    assert lines[-1].startswith("3 mandatory, 0 advisory violations from 3 policies over ")


def test_check_command_exits_0_on_advisory_violations_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = _config(tmp_path, {"all": "advisory", "test-labels": {"label": "loopform.dev/environment"}})
    code = main(["check", "--stack", "dev", "--policy-pack", str(PACK), "--policy-config", str(config)])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert any(line.startswith("advisory  test-replicas") for line in lines)
    assert not any(line.startswith("mandatory") for line in lines)
    assert lines[-1].startswith("0 mandatory, 3 advisory violations from 3 policies over ")


def test_check_command_refuses_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, {"test-replicas": {"minReplicas": "two"}, "no-such-policy": "mandatory"})
    code = main(["check", "--stack", "dev", "--policy-pack", str(PACK), "--policy-config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert "test-replicas: minReplicas: 'two' is not of type 'integer'" in err
    assert "no-such-policy: no such policy in the pack" in err


def test_check_command_fails_when_deploy_differs_from_the_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A release in the stack file that deploy/dev does not hold yet: Argo CD would not deploy it."""
    document = yaml.safe_load((ROOT / "stacks" / "Pulumi.dev.yaml").read_text())
    document["config"][CONFIG_KEY]["models"]["fraud"]["release"] = RELEASE
    stack = tmp_path / "Pulumi.dev.yaml"
    stack.write_text(yaml.safe_dump(document))
    config = _config(tmp_path, {"all": "advisory"})
    argv = ["check", "--stack", "dev", "--file", str(stack), "--policy-pack", str(PACK), "--policy-config", str(config)]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 1
    missing = [line for line in out.splitlines() if line.startswith("mandatory")]
    assert len(missing) == 4 and all(GITOPS_POLICY in line for line in missing)
    assert any("deploy/dev/fraud-service.deployment.yaml is missing" in line for line in missing)
    assert all("kubernetes:argoproj.io/v1alpha1:Application dev-gitops-application" in line for line in missing)
    assert "from 3 policies" in out  # the two of the pack and the GitOps folder's


def test_check_command_sends_the_gitops_folder_through_the_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = _released_root(tmp_path)
    sent: list[RenderedResource] = []
    monkeypatch.setattr(check, "run_pack", lambda resources, *a, **k: sent.extend(resources) or _empty_run())
    monkeypatch.setattr("loopform.render.render_stack", lambda *a, **k: [])
    result = check.check("dev", root, policy_config=_config(tmp_path, {}), pack_dir=PACK)
    kinds = sorted((r.type_, r.name) for r in sent)
    assert kinds == [
        ("kubernetes:apps/v1:Deployment", "fraud-service"),
        ("kubernetes:autoscaling/v2:HorizontalPodAutoscaler", "fraud-service"),
        ("kubernetes:core/v1:Service", "fraud-service"),
        ("kubernetes:policy/v1:PodDisruptionBudget", "fraud-service"),
    ]
    assert all(r.urn.startswith("urn:pulumi:dev::loopform::argocd$") for r in sent)
    assert result.violations == []


def _empty_run() -> check.PackRun:
    return check.PackRun(violations=[], policies={}, resources=0)


def test_check_command_refuses_local_stacks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--stack", "local"]) == 2
    assert "cluster.kind none" in capsys.readouterr().err
