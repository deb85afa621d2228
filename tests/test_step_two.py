"""Step two: ordinary changes to a running stack update what they should and never replace or delete data.

Each case renders the stack before and after one change and classifies every resource with
pulumi-kubernetes' own rules (`loopform.preview`): what updates, what is replaced, what the
engine would refuse because it is protected.
"""

from __future__ import annotations

import json
import runpy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from loopform import render
from loopform.preview import Step, preview
from loopform.spec import CONFIG_KEY, stack_file

from .conftest import ROOT

STACK = "staging"  # in-cluster PostgreSQL and Redis, Karpenter GPUs, a scheduled model: the most to lose
PROGRAM = str(ROOT / "__main__.py")


def _render(spec: dict[str, Any], secrets: dict[str, str] | None = None) -> list[render.RenderedResource]:
    config = {**render.stack_config(STACK), CONFIG_KEY: json.dumps(spec), **(secrets or {})}
    return render.render_components(lambda: runpy.run_path(PROGRAM, run_name="__main__") and None, config, stack=STACK)


def _spec() -> dict[str, Any]:
    return yaml.safe_load(stack_file(STACK).read_text())["config"][CONFIG_KEY]


def _steps(edit: Callable[[dict[str, Any]], None], secrets: dict[str, str] | None = None) -> list[Step]:
    before = _spec()
    after = _spec()
    edit(after)
    return preview(_render(before), _render(after, secrets))


def _by_action(steps: list[Step]) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for step in steps:
        result.setdefault(step.change.action, set()).add(step.change.name)
    return result


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(spec: dict[str, Any]) -> None:
        node = spec
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return edit


def _without_delivery(spec: dict[str, Any]) -> dict[str, Any]:
    """The staging spec before its second model, `delivery`, was added."""
    del spec["models"]["delivery"]
    return spec


def _new_pool(spec: dict[str, Any]) -> None:
    spec["gpu"]["pools"]["big"] = {
        **spec["gpu"]["pools"]["gpu"],
        "instance_families": ["p4d"],
        "gpus_per_node": 8,
    }


# (change, edit, names that must update, names that must be created, names that must be deleted)
ORDINARY = [
    ("pipeline image tag", _set("orchestrator.pipeline_image", "ghcr.io/loopform/pipeline:0.2.0"),
     {"staging-orchestrator-fraud-template", "staging-features-server", "staging-features-materialize"}, set(), set()),
    ("registry replicas", _set("registry.replicas", 4), {"staging-registry-server"}, set(), set()),
    ("materialisation schedule", _set("feature_store.materialization_schedule", "*/5 * * * *"),
     {"staging-features-materialize"}, set(), set()),
    ("retraining schedule", _set("models.fraud.training.schedule", "0 4 * * *"),
     {"staging-orchestrator-fraud-cron"}, set(), set()),
    ("argo-cd chart version", _set("gitops.chart_version", "7.8.3"), {"staging-gitops-argo-cd"}, set(), set()),
    ("database volume growth", _set("registry.backend.storage", "80Gi"),
     {"staging-registry-postgres-data"}, set(), set()),
    ("redis volume growth", _set("feature_store.online_store.storage", "10Gi"),
     {"staging-features-redis-data"}, set(), set()),
    ("a removed model's schedule", _set("models.fraud.training.schedule", None), set(), set(),
     {"staging-orchestrator-fraud-cron"}),
    ("a new GPU pool", _new_pool, set(), {"staging-gpu-big-node-class", "staging-gpu-big-node-pool"}, set()),
    ("common labels", _set("cluster.labels", {"loopform.dev/environment": "staging", "team": "ml"}),
     {"staging-registry-server", "staging-ns-platform"}, set(), set()),
    ("redis image", _set("feature_store.online_store.image", "redis:7.4.2"), {"staging-features-redis"}, set(), set()),
    ("postgres minor version", _set("registry.backend.image", "postgres:16.6"), {"staging-registry-postgres"}, set(),
     set()),
]  # fmt: skip


@pytest.mark.parametrize(("case", "edit", "updates", "creates", "deletes"), ORDINARY, ids=[c[0] for c in ORDINARY])
def test_ordinary_change_touches_no_data(case, edit, updates, creates, deletes) -> None:
    steps = _steps(edit)
    actions = _by_action(steps)
    assert not [s.line() for s in steps if s.refused], f"{case}: the engine would refuse"
    assert not [s.line() for s in steps if s.protected and s.change.action != "same" and s.change.action != "update"]
    assert updates <= actions.get("update", set()), f"{case}: {actions}"
    assert actions.get("create", set()) == creates, f"{case}: {actions}"
    assert actions.get("delete", set()) == deletes, f"{case}: {actions}"
    # Only Jobs are replaced (a changed template reruns them; each is idempotent): no server, no data.
    replaced = {s.change.type_ for s in steps if s.change.action == "replace"}
    assert replaced <= {"kubernetes:batch/v1:Job"}, [s.line() for s in steps if s.change.action == "replace"]


DELIVERY_PIPELINE = {
    "staging-orchestrator-delivery-template",
    "staging-orchestrator-delivery-cron",
    "staging-delivery-monitor-cronjob",
    "staging-delivery-tokens",  # its callers' tokens (the Secret its service mounts)
}


def test_a_new_model_creates_only_its_pipeline_and_monitor() -> None:
    """Its Feast definitions join the repo ConfigMap: the apply Job reruns (replaced), nothing else is replaced."""
    steps = preview(_render(_without_delivery(_spec())), _render(_spec()))
    actions = _by_action(steps)
    assert not [s.line() for s in steps if s.refused]
    assert actions["create"] == DELIVERY_PIPELINE
    assert "delete" not in actions
    assert actions.get("replace", set()) <= {"staging-features-apply"}


def test_a_removed_model_deletes_only_its_pipeline_and_monitor() -> None:
    actions = _by_action(preview(_render(_spec()), _render(_without_delivery(_spec()))))
    assert actions["delete"] == DELIVERY_PIPELINE
    assert actions.get("replace", set()) <= {"staging-features-apply"}


def test_a_password_rotation_updates_the_secret_in_place_and_rolls_its_consumers() -> None:
    steps = _steps(lambda spec: None, secrets={"loopform:registryDbPassword": "rotated"})
    actions = _by_action(steps)
    registry_secrets = {f"staging-features-registry-loopform-staging-{ns}" for ns in ("system", "pipelines", "serving")}
    assert actions.get("update") == {
        "staging-registry-db",  # in place: a protected Secret is never replaced
        "staging-registry-postgres",  # rolls; its postStart sets the new password
        "staging-registry-server",  # rolls onto the new URL
        *registry_secrets,  # Feast's registry password is derived from it and rotates with it
        "staging-features-server",
        "staging-features-materialize",
        # The in-cluster Redis's password is derived from it too: its config Secret, the clients' connection
        # string in each namespace, and the Redis pod, which rolls onto the new `requirepass`.
        "staging-features-redis-auth",
        "staging-features-redis",
        "staging-features-online-store-loopform-staging-system",
        "staging-features-online-store-loopform-staging-serving",
        # MLflow's users' passwords: the server's auth Secret and each identity's credentials file, read per
        # request (services) or per run (pipelines, monitors), so nothing else restarts.
        "staging-registry-auth",
        *{
            f"staging-registry-{user}-credentials-loopform-staging-{ns}"
            for user, ns in (("pipeline", "pipelines"), ("promotion", "system"), ("serving", "serving"))
        },
        "staging-registry-monitor-credentials-loopform-staging-monitoring",
        # The callers' tokens: the services re-read the mounted file when it changes.
        "staging-delivery-tokens",
        "staging-fraud-tokens",
        # Argo CD's Redis password, and the chart whose pods' annotations carry its digest (they roll together).
        "staging-gitops-redis-password",
        "staging-gitops-argo-cd",
    }
    # The Job that sets the registry role's password runs again, once; `feast apply` reruns on the new URL.
    assert actions.get("replace") == {"staging-features-registry-db", "staging-features-apply"}
    assert "delete" not in actions and not [s for s in steps if s.refused]


def test_a_feature_edit_updates_the_repo_in_place_rolls_the_server_and_reapplies_once(monkeypatch) -> None:
    import components.platform as platform

    original = platform.feature_files

    def edited(root: Path, paths: dict[str, str]) -> dict[str, str]:
        return {name: text + "\n# a new feature\n" for name, text in original(root, paths).items()}

    before = _render(_spec())
    monkeypatch.setattr(platform, "feature_files", edited)
    steps = preview(before, _render(_spec()))
    actions = _by_action(steps)
    # In place: the ConfigMap running pods mount is never deleted (a replacement would delete it first).
    assert {"staging-features-repo", "staging-features-server", "staging-features-materialize"} <= actions["update"]
    # The apply Job's name carries the repo's hash: one new Job runs `feast apply` once.
    assert actions["replace"] == {"staging-features-apply"}


@pytest.mark.parametrize(
    ("case", "edit", "refused"),
    [
        ("storage class change", _set("cluster.storage_class", "io2"), {"staging-registry-postgres-data"}),
        ("postgres major version", _set("registry.backend.image", "postgres:17.2"), {"staging-registry-postgres-data"}),
        ("platform namespace rename", _set("cluster.namespaces.platform", "ml-system"), {"staging-ns-platform"}),
    ],
)
def test_a_change_that_would_lose_data_is_refused_before_anything_changes(case, edit, refused) -> None:
    steps = _steps(edit)
    assert refused <= {s.change.name for s in steps if s.refused}, [
        s.line() for s in steps if s.change.action != "same"
    ]


def test_without_protection_the_same_change_would_replace_the_database() -> None:
    """What protection stops: with protect_data off a storage class change replaces the database's volume."""

    def edit(spec: dict[str, Any]) -> None:
        spec["cluster"]["storage_class"] = "io2"

    before, after = _spec(), _spec()
    before["cluster"]["protect_data"] = after["cluster"]["protect_data"] = False
    edit(after)
    steps = {s.change.name: s for s in preview(_render(before), _render(after))}
    assert steps["staging-registry-postgres-data"].change.action == "replace"
    assert not steps["staging-registry-postgres-data"].refused
