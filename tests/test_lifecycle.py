"""Day two: data is protected, passwords rotate, the right cluster is targeted, environments share a cluster."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from components.registry import APPLY_PASSWORD_COMMAND
from loopform import render
from loopform.cli import main
from loopform.references import chart_provides
from loopform.spec import CONFIG_KEY, load_stack, stack_file

from .conftest import ROOT, STACKS
from .pg import needs_postgres, postgres

STATEFUL_KINDS = {"StatefulSet", "PersistentVolumeClaim"}


def _write_stack(tmp_path: Path, stack: str, edit) -> Path:
    document = yaml.safe_load(stack_file(stack).read_text())
    edit(document["config"][CONFIG_KEY])
    path = tmp_path / stack / f"Pulumi.{stack}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document))
    return path


def _by_name(resources: list[render.RenderedResource]) -> dict[str, render.RenderedResource]:
    return {r.name: r for r in resources}


# --- data safety ------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_every_stateful_resource_is_protected_and_retained(stack: str, rendered) -> None:
    resources = _by_name(rendered(stack))
    stateful = {name for name, r in resources.items() if r.kind in STATEFUL_KINDS}
    stateful |= {f"{stack}-registry-db", f"{stack}-ns-platform"}
    if stack == "prod":  # managed PostgreSQL and Redis: only the URL Secret and the namespace hold anything
        assert stateful == {"prod-registry-db", "prod-ns-platform"}
    else:
        assert {f"{stack}-registry-postgres", f"{stack}-registry-postgres-data", f"{stack}-features-redis"} <= stateful
    for name in stateful:
        assert resources[name].protect and resources[name].retain_on_delete, f"{name} is not protected"
    # Nothing else is: a protected Deployment would block every ordinary rollout that replaces it.
    assert {name for name, r in resources.items() if r.protect} == stateful


def test_stateful_volumes_are_claims_of_their_own(rendered) -> None:
    resources = _by_name(rendered("dev"))
    statefulset = resources["dev-registry-postgres"].manifest()
    assert "volumeClaimTemplates" not in statefulset["spec"]
    claim = resources["dev-registry-postgres-data"].manifest()
    volumes = statefulset["spec"]["template"]["spec"]["volumes"]
    persistent = [v for v in volumes if "emptyDir" not in v]  # the others are scratch (a read-only root)
    assert persistent == [{"name": "data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert resources["dev-registry-postgres-data"].urn in resources["dev-registry-postgres"].dependencies


def test_a_throwaway_environment_can_turn_protection_off(tmp_path: Path) -> None:
    path = _write_stack(tmp_path, "dev", lambda spec: spec["cluster"].update(protect_data=False))
    resources = render.render_stack("dev", ROOT, path)
    assert not any(r.protect or r.retain_on_delete for r in resources)


# --- rotation -------------------------------------------------------------------------------------


def _rendered_with_password(password: str) -> dict[str, render.RenderedResource]:
    config = {**render.stack_config("dev"), "loopform:registryDbPassword": password}
    program = str(ROOT / "__main__.py")
    import runpy

    return _by_name(
        render.render_components(lambda: runpy.run_path(program, run_name="__main__") and None, config, stack="dev")
    )


def _template_annotations(resource: render.RenderedResource) -> dict[str, str]:
    return resource.inputs["spec"]["template"]["metadata"].get("annotations", {})


def test_a_password_rotation_rolls_the_database_and_mlflow() -> None:
    before, after = _rendered_with_password("first-password"), _rendered_with_password("second-password")
    for name in ("dev-registry-postgres", "dev-registry-server", "dev-features-server"):
        assert _template_annotations(before[name]) != _template_annotations(after[name]), f"{name} does not roll"
    assert before["dev-orchestrator-fraud-template"].inputs == after["dev-orchestrator-fraud-template"].inputs
    # The digest in the annotation is not the password, and the password is in no manifest.
    for resource in after.values():
        if resource.is_kubernetes_object:
            assert "second-password" not in yaml.safe_dump(resource.manifest())


@pytest.mark.slow
@needs_postgres
def test_the_post_start_hook_applies_a_rotated_password_to_a_real_postgresql() -> None:
    """The container's exact postStart command, against PostgreSQL: the role gets the Secret's new password."""
    with postgres(user="mlflow", password="old-password") as server:
        # What the pod has: the Secret's (new) password in POSTGRES_PASSWORD, the server socket in /var/run/postgresql.
        script = APPLY_PASSWORD_COMMAND[2].replace("/var/run/postgresql", f"{server.socket_dir} -p {server.port}")
        env = server.env(POSTGRES_USER="mlflow", POSTGRES_PASSWORD="new p@ss:w/rd's")
        done = subprocess.run(["sh", "-c", script], env=env, **server.run)
        assert done.returncode == 0, done.stderr
        assert server.psql("select 1", password="new p@ss:w/rd's").returncode == 0
        assert server.psql("select 1", password="old-password").returncode != 0


# --- the right cluster --------------------------------------------------------------------------


def test_validate_refuses_a_cluster_stack_without_a_kube_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_stack(tmp_path, "staging", lambda spec: spec["cluster"].pop("kube_context"))
    assert main(["validate", "--stack", "staging", "--file", str(path)]) == 2
    assert "loopform:platform.cluster.kube_context: required on every stack with a cluster" in capsys.readouterr().err


@pytest.mark.parametrize("stack", STACKS)
def test_the_program_always_uses_an_explicit_provider_for_the_stack_context(stack: str, rendered) -> None:
    providers = [r for r in rendered(stack) if r.type_ == "pulumi:providers:kubernetes"]
    assert [p.inputs["context"] for p in providers] == [load_stack(stack_file(stack)).cluster.kube_context]


def test_the_local_stack_refuses_pulumi(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Exception, match="loopform up --stack local"):
        render.render_stack("local", ROOT)  # the program itself, as `pulumi up -s local` runs it
    assert main(["render", "--stack", "local"]) == 2
    assert "loopform up --stack local" in capsys.readouterr().err


def test_up_workflow_puts_staging_and_prod_behind_environment_approvals() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "up.yml").read_text())
    jobs = workflow["jobs"]
    environments = {job.get("environment", {}).get("name") for job in jobs.values() if "environment" in job}
    assert {"staging", "prod"} <= environments
    prod = next(job for job in jobs.values() if job.get("environment", {}).get("name") == "prod")
    staging = next(name for name, job in jobs.items() if job.get("environment", {}).get("name") == "staging")
    assert staging in prod["needs"]


# --- ordering and outputs -----------------------------------------------------------------------


def test_pipelines_and_gitops_wait_for_the_registry_and_the_feature_store(rendered) -> None:
    """A dependency on a component is a dependency on its children: here, the servers behind both URLs."""
    resources = _by_name(rendered("dev"))
    for dependent in ("dev-orchestrator", "dev-gitops"):
        for dependency in ("dev-registry-server", "dev-registry-service", "dev-features-server", "dev-features-apply"):
            assert resources[dependency].urn in resources[dependent].dependencies, f"{dependent} -> {dependency}"


def test_up_after_destroy_keeps_no_crd_behind(rendered) -> None:
    """`keep` makes Chart v4 retain CRDs on destroy, and the next `up` then fails with AlreadyExists."""
    charts = [r.manifest() for r in rendered("dev") if r.is_chart and r.manifest()["chart"].startswith("argo")]
    assert len(charts) == 2
    for chart in charts:
        assert chart["values"]["crds"] == {"install": True, "keep": False}


# --- several environments on one cluster ----------------------------------------------------------


def _cluster_objects(resources: list[render.RenderedResource]) -> list[tuple[str, str | None, str]]:
    """Every object a stack puts in the cluster: its own, the CRDs its charts install, its cluster-wide charts."""
    objects = [
        (r.kind, r.manifest()["metadata"].get("namespace"), r.manifest()["metadata"]["name"])
        for r in resources
        if r.is_kubernetes_object
    ]
    for resource in resources:
        if resource.is_chart:
            chart = resource.manifest()
            objects += [(ref.kind, None, ref.name) for ref in chart_provides(chart)]
            if chart["chart"] in {"nvidia-device-plugin", "dcgm-exporter"}:  # one DaemonSet per GPU node, cluster-wide
                objects.append(("DaemonSet", chart["namespace"], chart["chart"]))
    return objects


def _collisions(stacks: dict[str, list[render.RenderedResource]]) -> set[tuple[str, str | None, str]]:
    seen: dict[tuple[str, str | None, str], str] = {}
    collisions = set()
    for stack, resources in stacks.items():
        for key in _cluster_objects(resources):
            if key in seen and seen[key] != stack:
                collisions.add(key)
            seen.setdefault(key, stack)
    return collisions


def test_dev_staging_and_prod_share_a_cluster_without_collisions(tmp_path: Path) -> None:
    def shared(spec: dict) -> None:
        spec["cluster"]["kube_context"] = "shared"
        spec["cluster"]["shared_addons"] = spec["environment"] == "dev"

    stacks = {}
    for stack in STACKS:
        path = _write_stack(tmp_path, stack, shared)
        stacks[stack] = render.render_stack(stack, ROOT, path)
        spec = load_stack(path, ROOT)
        assert render.check_references(stacks[stack], spec) == []  # staging and prod list dev's CRDs as prerequisites
    assert _collisions(stacks) == set()


def test_only_the_shared_addons_collide_when_every_stack_installs_them(rendered) -> None:
    collisions = _collisions({stack: rendered(stack) for stack in STACKS})
    assert collisions
    assert {kind for kind, _, _ in collisions} <= {"CustomResourceDefinition", "DaemonSet"}
