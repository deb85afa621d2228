"""End to end: `loopform up` on small data closes the loop, twice, without touching the repo's stacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loopform.spec import CONFIG_KEY

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory):
    from loopform.local import up
    from loopform.serving import free_port

    folder = tmp_path_factory.mktemp("loop")
    document = yaml.safe_load((ROOT / "stacks" / "Pulumi.local.yaml").read_text())
    platform = document["config"][CONFIG_KEY]
    # The holdout (newest 20% of each window) must hold gates.min_positives frauds: 20,000 rows of history and
    # 25,000 drifted transactions, as the local stack has; the live traffic is smaller.
    platform["local"].update(workdir=str(folder / "work"), traffic=240, serve_port=free_port())
    stack = folder / "Pulumi.local.yaml"
    stack.write_text(yaml.safe_dump(document))
    repo_stacks = {p.name: p.read_bytes() for p in (ROOT / "stacks").glob("*.yaml")}
    lines: list[str] = []
    summary = up(stack, ROOT, echo=lines.append)
    return summary, lines, repo_stacks, stack


def test_registry_holds_two_gated_versions(loop) -> None:
    from loopform import registry

    summary, *_ = loop
    assert summary.versions == [1, 2]
    assert registry.alias_version(summary.tracking_uri, "fraud", "production") == 2
    assert registry.alias_version(summary.tracking_uri, "fraud", "staging") == 2
    for version in summary.versions:
        evidence = registry.read_evidence(summary.tracking_uri, "fraud", version)
        assert evidence is not None and evidence["version"] == version
        assert all(gate["passed"] for gate in evidence["gates"].values())
    tags = registry.client(summary.tracking_uri).get_model_version("fraud", "1").tags
    assert tags.get(registry.ARCHIVED_TAG) == "true", "the replaced production version is archived"


def test_payload_log_holds_every_answered_request(loop) -> None:
    summary, *_ = loop
    assert summary.requests == {"clean": 240, "drifted": 25000}
    assert summary.payload_rows == 25240


def test_monitor_detects_the_injected_drift_only(loop) -> None:
    summary, *_ = loop
    assert summary.monitor["clean"]["status"] == "ok" and not summary.monitor["clean"]["triggered"]
    drifted = summary.monitor["drifted"]
    assert drifted["status"] == "drift" and drifted["triggered"]
    assert {"amount", "distance_from_home_km"} <= set(drifted["drifted"])
    report = Path(drifted["report"])
    assert report.exists() and "amount" in report.read_text(errors="replace")


def test_releases_recorded_in_workdir_not_in_repo(loop) -> None:
    summary, _, repo_stacks, _ = loop
    assert {p.name: p.read_bytes() for p in (ROOT / "stacks").glob("*.yaml")} == repo_stacks
    prod = yaml.safe_load((summary.workdir / "stacks" / "Pulumi.prod.yaml").read_text())["config"][CONFIG_KEY]
    assert prod["models"]["fraud"]["release"]["version"] == 2
    assert prod["gates"]["require_staging"] is True, "production is gated on a prior staging release"


def test_the_policy_pack_admits_the_loops_own_release_and_refuses_an_edit(loop, capsys) -> None:
    """The loop signs with its own key; the config beside its stacks trusts it. Any hand edit breaks the signature."""
    from loopform import record
    from loopform.cli import main

    summary, lines, *_ = loop
    assert any("policy pack: 0 mandatory" in line for line in lines), "up checks its prod stack after each promotion"
    prod = summary.workdir / "stacks" / "Pulumi.prod.yaml"
    assert main(["check", "--stack", "prod", "--file", str(prod)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("0 mandatory")

    text = prod.read_text()
    released = yaml.safe_load(text)["config"][CONFIG_KEY]["models"]["fraud"]["release"]
    assert released["staging"]["released_at"] <= released["released_at"]
    assert len(yaml.safe_dump(released).splitlines()) <= 32, "a release record is about 30 lines"
    _, keys = record.read_policy_config(summary.workdir / "policy" / "prod.json")
    assert record.verify(released, "prod", keys) == []
    try:
        prod.write_text(text.replace(f"version: {released['version']}\n", "version: 1\n", 1))
        assert main(["check", "--stack", "prod", "--file", str(prod)]) == 1
        mandatory = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mandatory")]
        assert any("release-signed" in line and "signature does not verify" in line for line in mandatory)
    finally:
        prod.write_text(text)


def test_progress_is_shown(loop) -> None:
    _, lines, *_ = loop
    assert lines[1].startswith("[ 1/22] generate")
    assert any("RETRAINING TRIGGERED" in line for line in lines)
    assert any("MLflow UI" in line for line in lines)


def test_monitor_command_judges_only_the_production_versions_traffic(loop, tmp_path: Path, capsys) -> None:
    """Version 2 is in production and has served nothing yet: version 1's drifted traffic is not its alarm."""
    from loopform.cli import main

    summary, _, _, stack = loop
    args = ["monitor", "fraud", "--stack", "local", "--file", str(stack), "--tracking-uri", summary.tracking_uri]
    code = main([*args, "--payload-uri", str(summary.workdir / "payloads"), "--report-dir", str(tmp_path)])
    assert code == 0
    assert "no decision: 0 payload rows" in capsys.readouterr().out
    assert not list((tmp_path / "triggers").glob("*.json"))


def test_without_drift_nothing_is_retrained(tmp_path: Path) -> None:
    from loopform.local import up
    from loopform.serving import free_port

    document = yaml.safe_load((ROOT / "stacks" / "Pulumi.local.yaml").read_text())
    platform = document["config"][CONFIG_KEY]
    platform["local"].update(
        workdir=str(tmp_path / "work"), traffic=200, drift_rows=1000, serve_port=free_port(), drift="none"
    )
    stack = tmp_path / "Pulumi.local.yaml"
    stack.write_text(yaml.safe_dump(document))
    lines: list[str] = []
    summary = up(stack, ROOT, echo=lines.append)
    assert summary.versions == [1] and summary.production_version == 1
    assert not summary.monitor["drifted"]["triggered"]
    assert any("no retraining" in line for line in lines)


def test_retraining_learns_from_served_traffic_judged_out_of_time(loop) -> None:
    """Only served transactions whose labels have arrived are ingested; the challenger is judged on later data
    than it trained on, against the champion on the same rows, by prod's own gates."""
    import json

    import pandas as pd

    from loopform.spec import load_stack

    summary, lines, *_ = loop
    assert any("served transactions labelled (labels arrive 6h" in line for line in lines)
    run2 = summary.workdir / "runs" / "run-2"
    window = json.loads((run2 / "window.json").read_text())
    evaluation = json.loads((run2 / "evaluation.json").read_text())
    assert evaluation["positives"] >= 100 and evaluation["auc_delta_low"] > 0
    assert evaluation["champion_auc"] < evaluation["auc"]
    # The accepted shift starts a new regime: run-2 trains and is judged on the drifted world only.
    (regime,) = json.loads((summary.workdir / "feast" / "data" / "regimes.json").read_text())
    assert regime["reason"].startswith("retraining trigger fraud-") and "drift" in regime["waived"]
    assert pd.Timestamp(window["start"]) >= pd.Timestamp(regime["since"])
    prod = load_stack(summary.workdir / "stacks" / "Pulumi.prod.yaml").gates
    assert prod == load_stack(ROOT / "stacks" / "Pulumi.prod.yaml").gates, "the local loop uses prod's gates"


def test_running_twice_works(loop) -> None:
    """A second run, as a user would start it (a new process), closes the loop again. Runs last: it replaces the workdir."""
    import json
    import subprocess
    import sys

    summary, _, _, stack = loop
    result = subprocess.run(
        [sys.executable, "-m", "loopform.cli", "up", "--stack", "local", "--file", str(stack)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    again = json.loads((summary.workdir / "summary.json").read_text())
    assert again["versions"] == [1, 2] and again["production_version"] == 2
    assert again["payload_rows"] == summary.payload_rows
