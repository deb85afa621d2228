"""End to end: `loopform up` on small data closes the loop, twice, without touching the repo's stacks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from loopform.spec import CONFIG_KEY
from tests.helpers_project import cli, copy_project

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and ".loopform" not in p.parts
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes], str]:
    """A copy of the repository with a model scaffolded by `loopform new model demo --task regression`."""
    copy = copy_project(tmp_path_factory.mktemp("project"))
    before = _files(copy)
    result = cli(copy, "new", "model", "demo", "--task", "regression")
    assert result.returncode == 0, result.stderr
    return copy, before, result.stdout


@pytest.fixture(scope="module")
def loop(project) -> tuple[dict[str, Any], list[str], dict[str, bytes], Path]:
    """`loopform up --stack local` in the copy (every model, the scaffolded one too), on a smaller live traffic."""
    from tests.helpers_serving import free_port

    root, *_ = project
    folder = root.parent / f"{root.name}-loop"
    folder.mkdir()
    document = yaml.safe_load((root / "stacks" / "Pulumi.local.yaml").read_text())
    platform = document["config"][CONFIG_KEY]
    # The holdout (newest 20% of each window) must hold gates.min_positives frauds: 20,000 rows of history and
    # 25,000 drifted transactions, as the local stack has; the live traffic is smaller.
    platform["local"].update(workdir=str(folder / "work"), traffic=240, serve_port=free_port())
    stack = folder / "Pulumi.local.yaml"
    stack.write_text(yaml.safe_dump(document))
    repo_stacks = {p.name: p.read_bytes() for p in (root / "stacks").glob("*.yaml")}
    result = cli(root, "up", "--stack", "local", "--file", str(stack))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((folder / "work" / "summary.json").read_text())
    return summary, result.stdout.splitlines(), repo_stacks, stack


def test_the_scaffold_adds_a_model_only_in_its_folders_and_the_stack_files(project) -> None:
    root, before, out = project
    after = _files(root)
    changed = {name for name in after.keys() | before.keys() if after.get(name) != before.get(name)}
    assert {name.split("/")[0] + "/" + name.split("/")[1] for name in changed} == {
        "models/demo",
        "bentos/demo",
        "stacks/Pulumi.local.yaml",
        "stacks/Pulumi.dev.yaml",
    }
    assert "+      demo:\n" in out and "+        path: models/demo\n" in out, "the stack entries are shown as a diff"


def test_the_scaffolded_model_renders_with_its_pipeline(project, tmp_path: Path) -> None:
    root, *_ = project
    result = cli(root, "render", "--stack", "dev", "--out", str(tmp_path / "dev"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    templates = sorted(p.name for p in (tmp_path / "dev").glob("*.workflowtemplate.yaml"))
    assert templates == [f"dev-orchestrator-{m}-template.workflowtemplate.yaml" for m in ("delivery", "demo", "fraud")]
    repo = yaml.safe_load((tmp_path / "dev" / "dev-features-repo.configmap.yaml").read_text())
    assert {"delivery_features.py", "demo_features.py", "fraud_features.py"} <= set(repo["data"])


def test_every_model_reaches_production_and_answers_on_its_service(loop) -> None:
    from loopform import registry

    summary, *_ = loop
    assert set(summary["models"]) == {"delivery", "demo", "fraud"}
    for name, run in summary["models"].items():
        assert run["production_version"] is not None, name
        assert registry.alias_version(summary["tracking_uri"], name, "production") == run["production_version"]
        assert run["requests"]["clean"] == 240 and run["requests"]["drifted"] == 25000, name
        assert run["payload_rows"] == 25240, name


def test_the_scaffolded_model_is_retrained_on_drift_and_judged_by_its_own_gates(loop) -> None:
    summary, *_ = loop
    demo = summary["models"]["demo"]
    assert demo["monitor"]["drifted"]["triggered"] and not demo["monitor"]["clean"]["triggered"]
    assert demo["versions"] == [1, 2] and demo["production_version"] == 2
    evaluation = json.loads((Path(summary["workdir"]) / "runs" / "demo" / "run-2" / "evaluation.json").read_text())
    assert evaluation["task"] == "regression" and evaluation["rmse"] <= 5.0 and evaluation["rmse_ratio_high"] < 0


def test_the_regressor_closes_the_loop(loop) -> None:
    summary, *_ = loop
    delivery = summary["models"]["delivery"]
    assert delivery["versions"] == [1, 2] and delivery["production_version"] == 2
    evaluation = json.loads((Path(summary["workdir"]) / "runs" / "delivery" / "run-2" / "evaluation.json").read_text())
    assert evaluation["task"] == "regression"
    assert evaluation["champion_rmse"] > evaluation["rmse"] and evaluation["rmse_ratio_high"] < 0


def test_registry_holds_two_gated_versions(loop) -> None:
    from loopform import registry

    summary, *_ = loop
    assert summary["models"]["fraud"]["versions"] == [1, 2]
    assert registry.alias_version(summary["tracking_uri"], "fraud", "production") == 2
    assert registry.alias_version(summary["tracking_uri"], "fraud", "staging") == 2
    for version in summary["models"]["fraud"]["versions"]:
        evidence = registry.read_evidence(summary["tracking_uri"], "fraud", version)
        assert evidence is not None and evidence["version"] == version
        assert all(gate["passed"] for gate in evidence["gates"].values())
    tags = registry.client(summary["tracking_uri"]).get_model_version("fraud", "1").tags
    assert tags.get(registry.ARCHIVED_TAG) == "true", "the replaced production version is archived"


def test_monitor_detects_the_injected_drift_only(loop) -> None:
    summary, *_ = loop
    fraud = summary["models"]["fraud"]
    assert fraud["monitor"]["clean"]["status"] == "ok" and not fraud["monitor"]["clean"]["triggered"]
    drifted = fraud["monitor"]["drifted"]
    assert drifted["status"] == "drift" and drifted["triggered"]
    assert {"amount", "distance_from_home_km"} <= set(drifted["drifted"])
    report = Path(drifted["report"])
    assert report.exists() and "amount" in report.read_text(errors="replace")


def test_releases_recorded_in_workdir_not_in_repo(project, loop) -> None:
    summary, _, repo_stacks, _ = loop
    root = project[0]
    assert {p.name: p.read_bytes() for p in (root / "stacks").glob("*.yaml")} == repo_stacks
    prod = yaml.safe_load((Path(summary["workdir"]) / "stacks" / "Pulumi.prod.yaml").read_text())["config"][CONFIG_KEY]
    assert prod["models"]["fraud"]["release"]["version"] == 2
    assert prod["gates"]["require_staging"] is True, "production is gated on a prior staging release"


def test_the_policy_pack_admits_the_loops_own_release_and_refuses_an_edit(project, loop) -> None:
    """The loop signs with its own key; the config beside its stacks trusts it. Any hand edit breaks the signature."""
    from loopform import record

    summary, lines, *_ = loop
    root = project[0]
    assert any("policy pack: 0 mandatory" in line for line in lines), "up checks its prod stack after each promotion"
    prod = Path(summary["workdir"]) / "stacks" / "Pulumi.prod.yaml"
    checked = cli(root, "check", "--stack", "prod", "--file", str(prod))
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    assert checked.stdout.splitlines()[-1].startswith("0 mandatory")

    text = prod.read_text()
    for model in summary["models"]:
        released = yaml.safe_load(text)["config"][CONFIG_KEY]["models"][model]["release"]
        assert released["staging"]["released_at"] <= released["released_at"]
        assert len(yaml.safe_dump(released).splitlines()) <= 34, "a release record is about 30 lines"
        _, keys = record.read_policy_config(Path(summary["workdir"]) / "policy" / "prod.json")
        assert record.verify(released, "prod", keys) == []
    released = yaml.safe_load(text)["config"][CONFIG_KEY]["models"]["fraud"]["release"]
    try:
        prod.write_text(text.replace(f"version: {released['version']}\n", "version: 1\n", 1))
        edited = cli(root, "check", "--stack", "prod", "--file", str(prod))
        assert edited.returncode == 1
        mandatory = [line for line in edited.stdout.splitlines() if line.startswith("mandatory")]
        assert any("release-signed" in line and "signature does not verify" in line for line in mandatory)
    finally:
        prod.write_text(text)


def test_progress_is_shown(loop) -> None:
    _, lines, *_ = loop
    assert lines[1].startswith("[ 1/66] delivery: generate")
    assert any("RETRAINING TRIGGERED" in line for line in lines)
    assert any("MLflow UI" in line for line in lines)


def test_monitor_command_judges_only_the_production_versions_traffic(project, loop, tmp_path: Path) -> None:
    """Version 2 is in production and has served nothing yet: version 1's drifted traffic is not its alarm."""
    summary, _, _, stack = loop
    payloads = str(Path(summary["workdir"]) / "payloads")
    args = ["monitor", "fraud", "--stack", "local", "--file", str(stack), "--tracking-uri", summary["tracking_uri"]]
    result = cli(project[0], *args, "--payload-uri", payloads, "--report-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no decision: 0 payload rows" in result.stdout
    assert not list((tmp_path / "triggers").glob("*.json"))


def test_without_drift_nothing_is_retrained(tmp_path: Path) -> None:
    from loopform.local import up
    from tests.helpers_serving import free_port

    document = yaml.safe_load((ROOT / "stacks" / "Pulumi.local.yaml").read_text())
    platform = document["config"][CONFIG_KEY]
    platform["models"] = {"fraud": platform["models"]["fraud"]}  # one model is enough to show it
    platform["local"].update(
        workdir=str(tmp_path / "work"), traffic=200, drift_rows=1000, serve_port=free_port(), drift="none"
    )
    stack = tmp_path / "Pulumi.local.yaml"
    stack.write_text(yaml.safe_dump(document))
    lines: list[str] = []
    summary = up(stack, ROOT, echo=lines.append)
    fraud = summary.models["fraud"]
    assert fraud.versions == [1] and fraud.production_version == 1
    assert not fraud.monitor["drifted"]["triggered"]
    assert any("no retraining" in line for line in lines)


def test_retraining_learns_from_served_traffic_judged_out_of_time(loop) -> None:
    """Only served transactions whose labels have arrived are ingested; the challenger is judged on later data
    than it trained on, against the champion on the same rows, by prod's own gates."""
    import pandas as pd

    from loopform.spec import load_stack

    summary, lines, *_ = loop
    assert any("served events labelled (labels arrive 6h" in line for line in lines)
    run2 = Path(summary["workdir"]) / "runs" / "fraud" / "run-2"
    window = json.loads((run2 / "window.json").read_text())
    evaluation = json.loads((run2 / "evaluation.json").read_text())
    assert evaluation["positives"] >= 100 and evaluation["auc_delta_low"] > 0
    assert evaluation["champion_auc"] < evaluation["auc"]
    # The accepted shift starts a new regime: run-2 trains and is judged on the drifted world only.
    (regime,) = json.loads((Path(summary["workdir"]) / "feast" / "fraud" / "data" / "regimes.json").read_text())
    assert regime["reason"].startswith("retraining trigger fraud-") and "drift" in regime["waived"]
    assert pd.Timestamp(window["start"]) >= pd.Timestamp(regime["since"])
    prod = load_stack(Path(summary["workdir"]) / "stacks" / "Pulumi.prod.yaml").gates
    assert prod == load_stack(ROOT / "stacks" / "Pulumi.prod.yaml").gates, "the local loop uses prod's gates"
    assert load_stack(Path(summary["workdir"]) / "stacks" / "Pulumi.prod.yaml").gates_for("delivery").max_rmse == 9


def test_running_twice_works(project, loop) -> None:
    """A second run, as a user would start it (a new process), closes the loop again. Runs last: it replaces the workdir.

    One model (the regressor) is enough to show it."""
    summary, _, _, stack = loop
    document = yaml.safe_load(stack.read_text())
    platform = document["config"][CONFIG_KEY]
    platform["models"] = {"delivery": platform["models"]["delivery"]}
    again_stack = stack.parent / "again" / "Pulumi.local.yaml"
    again_stack.parent.mkdir()
    again_stack.write_text(yaml.safe_dump(document))
    result = cli(project[0], "up", "--stack", "local", "--file", str(again_stack))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    again = json.loads((Path(summary["workdir"]) / "summary.json").read_text())["models"]
    assert list(again) == ["delivery"]
    assert again["delivery"]["versions"] == [1, 2] and again["delivery"]["production_version"] == 2
    assert again["delivery"]["payload_rows"] == summary["models"]["delivery"]["payload_rows"]
