"""The runtime commands as a user or an Argo pod calls them: step, promote, monitor."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from loopform.cli import main
from loopform.spec import load_stack, stack_file
from loopform.steps import StepContext, ingest
from models.fraud import data

ROOT = Path(__file__).resolve().parent.parent


def _step(tmp_path: Path, name: str) -> int:
    return main(
        [
            "step", name, "--stack", "local", "--model", "fraud",
            "--run-dir", str(tmp_path / "run"), "--feature-repo", str(tmp_path / "feast"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )  # fmt: skip


def _context(tmp_path: Path) -> StepContext:
    return StepContext(
        model="fraud",
        spec=load_stack(stack_file("local")),
        run_dir=tmp_path / "run",
        tracking_uri="unused",
        feature_repo=tmp_path / "feast",
        root=ROOT,
        stack_files=ROOT / "stacks",
    )


def _ingest(tmp_path: Path, frame) -> None:
    ingest(_context(tmp_path), frame)


def test_validate_step_passes_clean_data(tmp_path: Path) -> None:
    _ingest(tmp_path, data.generate(4000, 3))
    assert _step(tmp_path, "validate-data") == 0
    gates = sorted(p.name for p in (tmp_path / "run" / "gates").glob("*.json"))
    assert gates == ["drift.json", "ood.json", "validation.json"]
    reports = sorted(p.name for p in (tmp_path / "run" / "reports").glob("*.html"))
    assert reports == ["drift.html", "ood.html", "validation.html"]


def test_a_bad_new_batch_cannot_hide_in_clean_history(tmp_path: Path) -> None:
    """The batch is judged alone at ingest: refused there, the pipeline never sees it."""
    from loopform.steps import StepFailed

    now = datetime.now(UTC)
    _ingest(tmp_path, data.generate(20000, 3, start=now - timedelta(days=31), days=30))
    with pytest.raises(StepFailed, match="out-of-range share of amount"):
        _ingest(tmp_path, data.generate(1000, 4, start=now - timedelta(days=1), days=1, out_of_range=0.15))
    assert _step(tmp_path, "validate-data") == 0


def test_a_batch_of_wrong_types_is_refused(tmp_path: Path) -> None:
    from loopform.steps import StepFailed

    _ingest(tmp_path, data.generate(2000, 3))
    with pytest.raises(StepFailed, match="check the column types"):
        _ingest(tmp_path, data.generate(500, 4, wrong_types="amount"))


def test_validate_step_stops_the_pipeline_on_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Data that reached the store some other way (not through ingest) is still stopped by the pipeline's gates."""
    from loopform.steps import LABELS_FILE

    frame = data.generate(4000, 3, out_of_range=0.05)
    _context(tmp_path).repo().write(frame)
    frame[[data.ID, data.ENTITY, data.TIMESTAMP, data.LABEL]].to_parquet(tmp_path / "feast" / "data" / LABELS_FILE)
    assert _step(tmp_path, "validate-data") == 1
    err = capsys.readouterr().err
    assert "step validate-data failed: data gates failed" in err and "max_out_of_range_share" in err
    assert (tmp_path / "run" / "gates" / "validation.json").exists()
    assert not (tmp_path / "run" / "training.parquet").exists()


def test_step_needs_its_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _step(tmp_path, "evaluate") == 1
    assert "training.parquet is missing: run the step that writes it first" in capsys.readouterr().err
    assert main(["step", "tune", "--stack", "local", "--model", "fraud", "--run-dir", str(tmp_path)]) == 2
    assert "no pipeline step 'tune'" in capsys.readouterr().err


def test_promote_refuses_unknown_version_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = stack_file("staging").read_bytes()
    store = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.delenv("LOOPFORM_SIGNING_KEY", raising=False)
    monkeypatch.delenv("LOOPFORM_SIGNING_KEY_FILE", raising=False)
    assert main(["promote", "fraud", "9", "--to", "staging", "--tracking-uri", store]) == 2
    assert "no signing key: pass --signing-key PATH" in capsys.readouterr().err

    # A new key prints the entry to trust it; the shipped staging config does not trust it yet.
    key = tmp_path / "keys" / "release.pem"
    assert main(["keygen", "--out", str(key), "--env", "staging", "--owner", "release-bot"]) == 0
    out = capsys.readouterr().out
    entry = json.loads(out[out.index("{") :])
    assert entry["environments"] == ["staging"] and entry["owner"] == "release-bot"
    assert main(["keygen", "--out", str(key)]) == 2  # never overwritten
    code = main(["promote", "fraud", "9", "--to", "staging", "--tracking-uri", store, "--signing-key", str(key)])
    assert code == 1
    err = capsys.readouterr().err
    assert "refusing to promote fraud version 9 to staging" in err
    assert f"signing key {entry['key_id']} is not among the trusted keys of" in err
    assert "has no version 9 of model 'fraud'" in err
    assert stack_file("staging").read_bytes() == before


def test_monitor_command_triggers_on_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loopform.payloads import PayloadLog

    reference = tmp_path / "reference.parquet"
    data.generate(5000, 1).to_parquet(reference)
    now = datetime.now(UTC)
    drifted = data.generate(600, 2, start=now - timedelta(hours=2), days=1, covariate_drift=0.8)
    with PayloadLog(str(tmp_path / "payloads"), "fraud") as log:
        log.log(
            [
                # Rows of an authenticated caller: the monitor counts only those unless told otherwise.
                {**{f: row[f] for f in data.FEATURE_NAMES}, "time": now - timedelta(minutes=5), "caller": "checkout"}
                for row in drifted.to_dict("records")
            ]
        )
    metrics = tmp_path / "metrics.prom"
    code = main(
        [
            "monitor", "fraud", "--stack", "local", "--reference", str(reference),
            "--payload-uri", str(tmp_path / "payloads"), "--report-dir", str(tmp_path / "monitor"),
            "--metrics-file", str(metrics),
        ]
    )  # fmt: skip
    assert code == 3, capsys.readouterr()
    assert 'loopform_drift_detected{model="fraud"} 1.0' in metrics.read_text()
    assert list((tmp_path / "monitor" / "triggers").glob("*.json"))


def test_the_cli_reads_the_project_it_runs_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by walking up to Pulumi.yaml, as pulumi does: a copy of the repository reads the copy's stacks."""
    import shutil

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("Pulumi.yaml", "stacks", "models"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, copy / name)
    stack = copy / "stacks" / "Pulumi.dev.yaml"
    stack.write_text(stack.read_text().replace("      min_auc: 0.7\n", "      min_auc: 0.71\n", 1))
    monkeypatch.delenv("LOOPFORM_ROOT", raising=False)
    monkeypatch.chdir(copy / "models")  # below the project root
    assert main(["validate", "--stack", "dev"]) == 0
    assert f"{copy / 'stacks' / 'Pulumi.dev.yaml'}: valid spec" in capsys.readouterr().out
    assert load_stack(stack_file("dev")).gates.min_auc == 0.71  # the library finds it the same way

    monkeypatch.setenv("LOOPFORM_ROOT", str(ROOT))  # an image names its project
    assert main(["validate", "--stack", "dev"]) == 0
    assert f"{ROOT / 'stacks' / 'Pulumi.dev.yaml'}: valid spec" in capsys.readouterr().out
    assert main(["--root", str(copy), "validate", "--stack", "dev"]) == 0  # --root wins
    assert str(copy) in capsys.readouterr().out

    monkeypatch.delenv("LOOPFORM_ROOT")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    monkeypatch.chdir(outside)
    assert main(["validate", "--stack", "dev"]) == 2
    err = capsys.readouterr().err
    assert f"{outside} is not inside a loopform project (no Pulumi.yaml here or in any folder above)" in err
    assert "--root or $LOOPFORM_ROOT" in err
