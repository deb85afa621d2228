"""Each batch is checked on its own before anything reads it (`loopform ingest`, the loop's and the cluster's ingest).

The store holds 29 clean days; the batch is the 30th day of the same traffic (about 650 rows),
clean or broken in one of the ways a review found passing when a day was judged inside the
newest 20% of the window. Each broken batch is refused naming the failed check with its number
and threshold, quarantined with its report, and every file of the offline store outside
quarantine/ is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from loopform.cli import main
from loopform.features import EVENTS_FILE
from loopform.gates.validation import label_dispersion, validate_batch
from loopform.ingest import QUARANTINE, BatchRefused, ingest_batch
from loopform.spec import CONFIG_KEY, GatesSpec, load_stack, stack_file
from loopform.steps import LABELS_FILE, StepContext, ingest
from models.fraud import data
from models.fraud.contract import CONTRACT

ROOT = Path(__file__).resolve().parent.parent
START = datetime(2024, 1, 1, tzinfo=UTC)
SEED = 3
ROWS = 19_500  # 30 days of about 650 transactions
MODEL = "fraud"  # the store's folder of the model: <offline store>/fraud/


@pytest.fixture(scope="module")
def history() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(29 clean days, the 30th day): one generated stretch of traffic split by time."""
    full = data.generate(ROWS, SEED, start=START, days=30)
    cut = pd.Timestamp(START + timedelta(days=29))
    older = full[full[data.TIMESTAMP] < cut].reset_index(drop=True)
    return older, full[full[data.TIMESTAMP] >= cut].reset_index(drop=True)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, history: tuple[pd.DataFrame, pd.DataFrame]) -> Path:
    """An offline store in the cluster's layout (a folder for s3://...) holding the 29 clean days."""
    folder = tmp_path_factory.mktemp("template") / "offline"
    ingest_batch(load_stack(stack_file("local")), "fraud", history[0], ROOT, f"file://{folder}")
    return folder


@pytest.fixture
def store(template: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "offline"
    shutil.copytree(template, copy)
    return copy


def _digest(folder: Path, quarantine: Path | None = None) -> dict[str, str]:
    """sha256 of every file under `folder` outside the model's quarantine/ (default: `folder`/fraud/quarantine)."""
    quarantine = quarantine or folder / MODEL / QUARANTINE
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_relative_to(quarantine)
    }


def _ingest(store: Path, frame: pd.DataFrame, tmp_path: Path, *extra: str) -> int:
    path = tmp_path / "batch.parquet"
    frame.to_parquet(path, index=False)
    args = ["ingest", str(path), "--stack", "local", "--model", "fraud", "--offline-uri", f"file://{store}"]
    return main([*args, *extra])


def _missing(day: pd.DataFrame, share: float = 0.2) -> pd.DataFrame:
    """`share` of every feature's values (rounded up to whole rows) blanked, rows drawn per feature."""
    rng = np.random.default_rng(1)
    frame = day.copy()
    for feature in data.FEATURES:
        rows = rng.choice(len(frame), math.ceil(share * len(frame)), replace=False)
        column = frame[feature.name].astype(object if feature.kind == "categorical" else np.float64)
        column.iloc[rows] = None if feature.kind == "categorical" else np.nan
        frame[feature.name] = column
    return frame


def _out_of_range(day: pd.DataFrame, share: float = 0.01) -> pd.DataFrame:
    """`share` of every feature's values (rounded up to whole rows) just outside its schema range or categories."""
    rng = np.random.default_rng(2)
    frame = day.copy()
    for feature in data.FEATURES:
        rows = frame.index[rng.choice(len(frame), math.ceil(share * len(frame)), replace=False)]
        if feature.kind == "categorical":
            frame.loc[rows, feature.name] = "unlisted"
        else:
            assert feature.max is not None
            frame.loc[rows, feature.name] = int(feature.max) + 1 if feature.dtype == "int64" else feature.max + 1
    return frame


def _resent(stored: pd.DataFrame) -> pd.DataFrame:
    """The store's last day sent again, a tenth of its labels changed."""
    frame = stored[stored[data.TIMESTAMP] >= pd.Timestamp(START + timedelta(days=28))].reset_index(drop=True)
    flip = np.arange(len(frame)) % 10 == 0
    frame[data.LABEL] = np.where(flip, 1 - frame[data.LABEL], frame[data.LABEL])
    return frame


def _bad(name: str, history: tuple[pd.DataFrame, pd.DataFrame]) -> pd.DataFrame:
    stored, day = history
    if name == "missing":
        return _missing(day)
    if name == "labels":
        return day.assign(**{data.LABEL: 0})
    if name == "drift":
        return data.generate(len(day), SEED + 1, start=START + timedelta(days=29), days=1, covariate_drift=2.0)
    if name == "out-of-range":
        return _out_of_range(day)
    return _resent(stored)


def _needles(name: str, frame: pd.DataFrame) -> list[str]:
    """What the refusal must say: the failed check, its number and its threshold."""
    if name == "missing":
        return [
            f"FAILED missing values: missing share of {f} {math.ceil(0.2 * len(frame)) / len(frame):.3f} > 0.05 "
            "(gates.max_missing_share)"
            for f in data.FEATURE_NAMES
        ]
    if name == "labels":
        return [
            "FAILED labels: positive labels 0 of",
            "FAILED label shift: positive rate 0.000 vs reference 0.0",
            "<= 1/2 (gates.drift.label_shift_ratio), Fisher exact p",
            "< 0.01 (gates.drift.label_shift_p_value",
        ]
    if name == "drift":
        return [
            "FAILED drift: drift share",
            "gates.drift.max_drift_share=0.3",
            "FAILED ood:",
            "gates.max_ood_rate=0.05",
        ]
    if name == "out-of-range":
        share = math.ceil(0.01 * len(frame)) / len(frame)
        return [
            f"FAILED out-of-range values: out-of-range share of {f} {share:.3f} > 0.01 (gates.max_out_of_range_share)"
            for f in data.FEATURE_NAMES
        ]
    changed = int((np.arange(len(frame)) % 10 == 0).sum())
    return [
        f"FAILED conflicting ids: ids already in the offline store {len(frame)} > 0 ({changed} with a different label"
    ]


BAD = ("missing", "labels", "drift", "out-of-range", "resent")


@pytest.mark.parametrize("name", BAD)
def test_each_bad_batch_is_refused_and_the_store_is_byte_identical(
    name: str,
    history: tuple[pd.DataFrame, pd.DataFrame],
    store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    batch = _bad(name, history)
    before = _digest(store)
    assert _ingest(store, batch, tmp_path) == 1
    err = capsys.readouterr().err
    for needle in _needles(name, batch):
        assert needle in err, err
    assert "checked against the reference: 18" in err and "nothing was written to the offline store" in err
    assert _digest(store) == before

    # Quarantined with its report: the rows as sent and every check with its numbers.
    (folder,) = (store / MODEL / QUARANTINE).iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["report.json", "rows.parquet"]
    assert pd.read_parquet(folder / "rows.parquet")[data.ID].tolist() == batch[data.ID].tolist()
    report = json.loads((folder / "report.json").read_text())
    assert report["batch_id"] == folder.name and report["passed"] is False and report["rows"] == len(batch)
    assert {c["name"] for c in report["checks"]} >= {"schema", "missing values", "label shift", "drift", "ood"}
    assert all(line.split(": ", 1)[0] in report["failed"] for line in report["failures"])


def test_a_clean_day_passes_and_is_appended(
    history: tuple[pd.DataFrame, pd.DataFrame], store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stored, day = history
    assert _ingest(store, day, tmp_path) == 0
    out = capsys.readouterr().out
    assert f"ingested {len(day)} labelled events of model fraud: {len(stored) + len(day)} in the offline store" in out
    assert "checked against the reference: 18" in out
    assert (
        "passed: schema, types, missing values, out-of-range values, duplicate ids, conflicting ids, labels, "
        "label shift, drift, ood" in out
    )
    labels = pd.read_parquet(store / MODEL / LABELS_FILE)
    source = pd.read_parquet(store / MODEL / EVENTS_FILE)
    assert len(labels) == len(source) == len(stored) + len(day)
    assert set(day[data.ID]) <= set(source[data.ID]) and not (store / MODEL / QUARANTINE).exists()
    # The stored types stay the schema's, whatever the batch came as.
    assert str(source["hour_of_day"].dtype) == "int64" and source["channel"].dtype == object


def test_the_first_batch_into_an_empty_store_gets_structural_checks_only(
    history: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, day = history
    store = tmp_path / "empty"
    assert _ingest(store, day, tmp_path) == 0
    out = capsys.readouterr().out
    assert "no reference (the offline store is empty): structural checks only" in out
    assert "passed: schema, types, missing values, out-of-range values, duplicate ids, conflicting ids\n" in out
    assert len(pd.read_parquet(store / MODEL / LABELS_FILE)) == len(day)
    # Structure needs no reference: a broken first batch is refused all the same.
    assert _ingest(tmp_path / "empty-2", _missing(day), tmp_path) == 1
    err = capsys.readouterr().err
    assert "structural checks only" in err and "FAILED missing values: missing share of amount 0.20" in err
    assert [p.name for p in (tmp_path / "empty-2").iterdir()] == [MODEL]
    assert [p.name for p in (tmp_path / "empty-2" / MODEL).iterdir()] == [QUARANTINE]


def test_duplicate_ids_and_missing_keys_in_a_batch_are_refused(
    history: tuple[pd.DataFrame, pd.DataFrame], store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, day = history
    batch = pd.concat([day, day.iloc[:3]], ignore_index=True)
    batch.loc[batch.index[10], data.LABEL] = np.nan
    before = _digest(store)
    assert _ingest(store, batch, tmp_path) == 1
    err = capsys.readouterr().err
    assert f"FAILED duplicate ids: duplicate ids in the batch 3 > 0 (e.g. {day[data.ID].iloc[0]}" in err
    share = f"{1 / len(batch):.3f}"
    assert f"FAILED missing values: missing share of {data.LABEL} {share} > 0 (every row needs its" in err
    assert _digest(store) == before


def test_accepting_a_shift_waives_only_the_checks_against_the_reference(
    history: tuple[pd.DataFrame, pd.DataFrame], store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stored, _ = history
    reason = ["--accept-shift", "new merchant mix after the acquisition (ticket 42)"]
    # Structure and labels of one class are never waived.
    for name in ("missing", "labels", "resent"):
        before = _digest(store)
        assert _ingest(store, _bad(name, history), tmp_path, *reason) == 1
        assert _digest(store) == before
    err = capsys.readouterr().err
    assert "FAILED missing values" in err and "FAILED labels: positive labels 0" in err
    assert "accepted (new merchant mix after the acquisition (ticket 42)) label shift: positive rate 0.000" in err
    assert "FAILED conflicting ids" in err
    # A drifted batch whose drift is accepted is stored, the waived failures printed.
    drifted = _bad("drift", history)
    assert _ingest(store, drifted, tmp_path, *reason) == 0
    out = capsys.readouterr().out
    assert "accepted (new merchant mix after the acquisition (ticket 42)) drift: drift share" in out
    assert len(pd.read_parquet(store / MODEL / LABELS_FILE)) == len(stored) + len(drifted)


def test_the_loop_ingest_is_the_same_code_path(
    history: tuple[pd.DataFrame, pd.DataFrame], store: Path, tmp_path: Path
) -> None:
    """`steps.ingest` (the local loop, the cluster's steps) runs the same checks; a shift passes only when accepted
    (the loop's retraining trigger accepts the shift its monitor saw), and structure, conflicts and one-class
    labels are refused even then."""
    spec = load_stack(stack_file("local"))
    context = StepContext(
        model="fraud",
        spec=spec,
        run_dir=tmp_path / "run",
        tracking_uri=None,
        feature_repo=tmp_path / "feast",
        root=ROOT,
        stack_files=ROOT / "stacks",
        offline_uri=f"file://{store}",
    )
    before = _digest(store)
    for name in ("missing", "out-of-range", "labels", "resent"):
        with pytest.raises(BatchRefused) as refused:
            ingest(context, _bad(name, history), accept_shift="retraining trigger fraud-test.json")
        assert refused.value.report.failed and "the offline store is unchanged" in str(refused.value)
    assert _digest(store) == before
    with pytest.raises(BatchRefused, match="drift: drift share"):
        ingest(context, _bad("drift", history), accept_shift=None)
    report = ingest(context, _bad("drift", history), accept_shift="retraining trigger fraud-test.json")
    assert report.passed and [c.name for c in report.accepted] == ["drift", "ood"]


def test_validate_batch_numbers(history: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    """The report's numbers: label test with the reference's dispersion, conflicts with examples."""
    stored, day = history
    report = validate_batch(day.assign(**{data.LABEL: 0}), GatesSpec(), CONTRACT, reference=stored, stored=stored)
    shift = next(c for c in report.checks if c.name == "label shift")
    assert shift.metrics["rate"] == 0 and shift.metrics["p_value"] < 0.01 and shift.metrics["dispersion"] >= 1
    assert shift.metrics["reference_rows"] == len(stored)
    resent = _resent(stored)
    conflicts = next(
        c for c in validate_batch(resent, GatesSpec(), CONTRACT, stored=stored).checks if c.name == "conflicting ids"
    )
    assert conflicts.metrics["conflicts"] == len(resent) and len(conflicts.metrics["examples"]) == 5
    assert validate_batch(day.iloc[:0], GatesSpec(), CONTRACT).failure_lines() == ["schema: the batch has no rows"]


def test_a_local_stack_ingests_into_the_loops_store(
    history: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`loopform ingest --stack local` writes the store `loopform up` made (the Feast repo under local.workdir)."""
    stored, _ = history
    document = yaml.safe_load(stack_file("local").read_text())
    document["config"][CONFIG_KEY]["local"]["workdir"] = str(tmp_path / "work")
    stack = tmp_path / "Pulumi.local.yaml"
    stack.write_text(yaml.safe_dump(document))
    args = ["--stack", "local", "--file", str(stack), "--model", "fraud"]
    batch = tmp_path / "drifted.parquet"
    _bad("drift", history).to_parquet(batch, index=False)
    assert main(["ingest", str(batch), *args]) == 2
    assert "run `loopform up --stack local` first" in capsys.readouterr().err

    repo = tmp_path / "work" / "feast" / MODEL  # the model's own Feast repo
    context = StepContext("fraud", load_stack(stack), tmp_path / "run", None, repo, ROOT, ROOT / "stacks")
    ingest(context, stored)  # what `loopform up` does
    before = _digest(repo, repo / "data" / QUARANTINE)
    assert main(["ingest", str(batch), *args]) == 1
    assert "FAILED drift: drift share" in capsys.readouterr().err
    assert _digest(repo, repo / "data" / QUARANTINE) == before
    assert len(list((repo / "data" / QUARANTINE).iterdir())) == 1


def test_materialisation_reads_only_admitted_batches(
    history: tuple[pd.DataFrame, pd.DataFrame], store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the cluster Feast's source is `<offline store>/fraud/events.parquet`: a refused batch never gets there,
    so neither training nor materialisation sees it (the online store keeps each card's admitted row)."""
    from loopform.features import OFFLINE_URI_ENV, FeatureRepo

    stored, _ = history
    drifted = _bad("drift", history)
    assert _ingest(store, drifted, tmp_path) == 1
    monkeypatch.setenv(OFFLINE_URI_ENV, f"file://{store}")
    repo = FeatureRepo(tmp_path / "feast", CONTRACT)
    repo.configure()
    assert Path(repo.definitions().fraud_source.path) == store / MODEL / EVENTS_FILE
    repo.apply()
    repo.materialize(end=START + timedelta(days=31))
    cards = drifted[data.ENTITY].drop_duplicates().head(50).tolist()
    online = repo.online(cards)
    latest = stored.sort_values(data.TIMESTAMP).groupby(data.ENTITY).last()
    admitted = [c for c in cards if c in latest.index]
    assert admitted, "some cards of the refused batch have admitted history"
    served = online.set_index(data.ENTITY).loc[admitted, "avg_amount_30d"]
    assert served.tolist() == pytest.approx(latest.loc[admitted, "avg_amount_30d"].tolist())
    assert not set(drifted[data.ID]) & set(pd.read_parquet(store / MODEL / EVENTS_FILE)[data.ID])


def test_label_dispersion_counts_bursts_of_fraud() -> None:
    """Independent labels vary as binomial counts (dispersion about 1); fraud in bursts varies more."""
    rng = np.random.default_rng(4)
    times = pd.Series(pd.Timestamp(START) + pd.to_timedelta(rng.integers(0, 30 * 86_400, 30_000), unit="s"))
    independent = pd.DataFrame({data.TIMESTAMP: times, data.LABEL: (rng.random(30_000) < 0.03).astype(int)})
    assert 0.5 < label_dispersion(independent, CONTRACT) < 1.6
    day = times.dt.day.to_numpy()
    bursty = independent.assign(**{data.LABEL: (rng.random(30_000) < np.where(day % 3 == 0, 0.06, 0.015)).astype(int)})
    assert label_dispersion(bursty, CONTRACT) > 3
    assert label_dispersion(independent.head(100).assign(**{data.LABEL: 0}), CONTRACT) == 1.0


def test_an_html_report_on_request(history: tuple[pd.DataFrame, pd.DataFrame], store: Path, tmp_path: Path) -> None:
    """The data summary report of the refused batch beside the reference (on request only)."""
    assert _ingest(store, _bad("missing", history), tmp_path, "--html-report") == 1
    (folder,) = (store / MODEL / QUARANTINE).iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["report.html", "report.json", "rows.parquet"]
    assert "<html" in (folder / "report.html").read_text(errors="replace").lower()
