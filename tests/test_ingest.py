"""`loopform ingest`: a new platform's offline store gets its first data, and the first pipeline step reads it.

Each batch's own checks are tested in test_batch_validation.py.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from loopform.cli import main
from loopform.features import EVENTS_FILE, OFFLINE_URI_ENV
from loopform.spec import CONFIG_KEY
from loopform.steps import LABELS_FILE
from models.fraud import data

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def stack(tmp_path: Path) -> tuple[Path, Path]:
    """The dev stack with its offline store in a folder here (what s3:// is on the cluster), and the fraud model's
    folder of it."""
    document = yaml.safe_load((ROOT / "stacks" / "Pulumi.dev.yaml").read_text())
    feature_store = document["config"][CONFIG_KEY]["feature_store"]
    offline = tmp_path / "offline"
    feature_store["offline_store"]["data_uri"] = f"file://{offline}"
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(document))
    return path, offline / "fraud"


def _ingest(stack: Path, *args: str) -> int:
    return main(["ingest", *args, "--stack", "dev", "--file", str(stack), "--model", "fraud"])


def test_ingest_seeds_the_store_the_first_step_reads(
    stack: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, offline = stack
    batch = data.generate(3000, 5)
    batch.to_parquet(tmp_path / "events.parquet", index=False)
    # Before: the first workflow run has nothing to read.
    monkeypatch.setenv(OFFLINE_URI_ENV, f"file://{offline.parent}")
    step = ["step", "validate-data", "--stack", "dev", "--file", str(path), "--model", "fraud"]
    assert main([*step, "--run-dir", str(tmp_path / "before")]) == 1
    assert "no data" in capsys.readouterr().err

    assert _ingest(path, str(tmp_path / "events.parquet")) == 0
    assert "3000 labelled events of model fraud: 3000 in the offline store" in capsys.readouterr().out
    assert sorted(p.name for p in offline.iterdir()) == sorted([LABELS_FILE, EVENTS_FILE])
    assert data.LABEL not in pd.read_parquet(offline / EVENTS_FILE).columns
    assert main([*step, "--run-dir", str(tmp_path / "after")]) == 0

    # The same events sent again (as CSV) are a conflict, refused: never appended twice, never a replacement.
    batch.head(100).to_csv(tmp_path / "again.csv", index=False)
    stored = {name: (offline / name).read_bytes() for name in (LABELS_FILE, EVENTS_FILE)}
    assert _ingest(path, str(tmp_path / "again.csv")) == 1
    err = capsys.readouterr().err
    assert "FAILED conflicting ids: ids already in the offline store 100 > 0 (0 with a different label" in err
    assert {name: (offline / name).read_bytes() for name in stored} == stored
    assert len(pd.read_parquet(offline / LABELS_FILE)) == 3000


def test_synthetic_seed_for_a_demo(stack: tuple[Path, Path]) -> None:
    path, offline = stack
    assert _ingest(path, "--synthetic", "2000") == 0
    labels = pd.read_parquet(offline / LABELS_FILE)
    assert len(labels) == 2000 and labels[data.TIMESTAMP].max() > pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=1)


def test_a_file_without_the_model_columns_is_refused_and_only_quarantined(
    stack: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, offline = stack
    data.generate(500, 5).drop(columns=[data.LABEL, "amount"]).to_parquet(tmp_path / "bad.parquet", index=False)
    assert _ingest(path, str(tmp_path / "bad.parquet")) == 1
    assert "FAILED schema: missing column(s) amount, is_fraud" in capsys.readouterr().err
    assert [p.name for p in offline.iterdir()] == ["quarantine"], "only the quarantine is written"
    assert _ingest(path, str(tmp_path / "missing.parquet")) == 1
    assert _ingest(path) == 2  # neither a file nor --synthetic
