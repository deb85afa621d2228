"""The out-of-core gates (DuckDB over Parquet) give the in-memory gates' statistics and decisions.

Small data with ties, missing and infinite values, categoricals and few-valued columns, written to
Parquet: every statistic equals the in-memory one to 1e-12 (relative), every decision is the same, also
when DuckDB's memory limit is far below the data it sorts (it spills to its temp directory).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from loopform.gates import drift_gate, ood_gate, validate_data
from loopform.gates import out_of_core as ooc
from loopform.gates.drift import compute_drift
from loopform.gates.result import GateResult
from loopform.spec import GatesSpec
from models.fraud.contract import CONTRACT
from models.fraud.data import generate

GATES = GatesSpec()
ROOT = Path(__file__).resolve().parent.parent
KINDS = {"normal": "numeric", "rounded": "numeric", "few": "numeric", "ints": "numeric", "colour": "categorical"}


def frame(rows: int, shift: float, seed: int) -> pd.DataFrame:
    """Continuous values with NaN and +-inf, heavy ties (one decimal, -0.0 among them), four values, integers,
    and strings with missing ones."""
    rng = np.random.default_rng(seed)
    normal = rng.normal(shift, 1.0, rows)
    normal[rng.random(rows) < 0.05] = np.nan
    normal[:2] = [np.inf, -np.inf]
    colour = pd.Series(rng.choice(["red", "green", "blue", "grey"], rows, p=[0.4, 0.3, 0.2, 0.1]), dtype=object)
    return pd.DataFrame(
        {
            "normal": normal,
            "rounded": np.round(rng.normal(shift, 1.0, rows), 1),
            "few": rng.integers(0, 4, rows).astype(np.float64),
            "ints": rng.integers(0, 2_000, rows),
            "colour": colour.where(rng.random(rows) > 0.1, None),
        }
    )


def close(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two JSON-like values differ (floats to 1e-12 relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [p for k in a for p in close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b, strict=True)) for p in close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def parquet(df: pd.DataFrame, path: Path) -> Path:
    df.to_parquet(path, index=False, row_group_size=100_000)
    return path


@pytest.mark.parametrize(
    ("reference_rows", "current_rows"),
    [
        (6_000, 1_500),  # Evidently's distances: normed Wasserstein, Jensen-Shannon
        (800, 400),  # small reference: K-S (exact p-value), chi-square
        (900, 12_000),  # small reference, large window: K-S's asymptotic p-value from the statistic
    ],
)
def test_drift_statistics_equal_the_in_memory_ones(tmp_path: Path, reference_rows: int, current_rows: int) -> None:
    reference, current = frame(reference_rows, 0.0, 1), frame(current_rows, 0.15, 2)
    expected = compute_drift(reference, current, list(KINDS), GATES, kinds=KINDS, calibrate=True)
    got = ooc.compute_drift(
        parquet(reference, tmp_path / "r.parquet"),
        parquet(current, tmp_path / "c.parquet"),
        list(KINDS),
        GATES,
        kinds=KINDS,
        calibrate=True,
    )
    assert got.calibrated is not None and expected.calibrated is not None
    assert {f.method for f in got.features.values()} == {f.method for f in expected.features.values()}
    assert close(got.to_dict(), expected.to_dict()) == []
    assert got.drifted == expected.drifted and got.calibrated.drifted == expected.calibrated.drifted


def test_a_memory_limit_far_below_the_data_gives_the_same_numbers(tmp_path: Path) -> None:
    """DuckDB sorts 4.8M values (77 MB with their side) within 32 MB, spilling to its temp directory."""
    reference, current = frame(3_200_000, 0.0, 3), frame(1_600_000, 0.05, 4)
    columns = ["normal", "rounded"]
    r, c = parquet(reference, tmp_path / "r.parquet"), parquet(current, tmp_path / "c.parquet")
    assert (len(reference) + len(current)) * 16 > 2 * 32 * 2**20
    with ooc.connect("32MB", tmp_path, threads=1) as con:
        assert con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0] == "30.5 MiB"
        got = ooc.compute_drift(r, c, columns, GATES, kinds=KINDS, calibrate=True, con=con)
    expected = compute_drift(reference, current, columns, GATES, kinds=KINDS, calibrate=True)
    assert close(got.to_dict(), expected.to_dict()) == []
    assert not list(tmp_path.glob("loopform-ooc-*"))  # the scratch folder is removed


def fraud(rows: int, seed: int, days: int) -> pd.DataFrame:
    """The fraud model's data with broken rows: missing, out-of-range and unknown values, a repeated id."""
    df = generate(rows, seed, days=days)
    rng = np.random.default_rng(seed)
    df.loc[rng.random(rows) < 0.03, "amount"] = np.nan
    df.loc[rng.random(rows) < 0.02, "distance_from_home_km"] = -5.0
    df.loc[rng.random(rows) < 0.04, "channel"] = "fax"
    df.loc[rng.random(rows) < 0.02, "merchant_category"] = None
    df.loc[5, "transaction_id"] = df.loc[4, "transaction_id"]
    return df


def test_validation_equals_the_in_memory_gate(tmp_path: Path) -> None:
    df = fraud(4_000, 5, 10)
    gates = GatesSpec(max_missing_share=0.025, max_out_of_range_share=0.03)
    expected = validate_data(df, gates, CONTRACT, require_label=True)
    got = ooc.validate_data(parquet(df, tmp_path / "w.parquet"), gates, CONTRACT, require_label=True)
    assert not expected.passed and len(expected.failures) >= 3  # missing, out of range, duplicate id
    assert close(got.to_dict(), expected.to_dict()) == []


def test_validation_types_decide_as_in_memory(tmp_path: Path) -> None:
    df = fraud(2_000, 6, 5)
    df["amount"] = df["amount"].astype(str)  # numbers shipped as strings
    df["card_age_days"] = df["card_age_days"] + 0.5  # an int64 feature with fractions
    df["channel"] = 3  # a categorical feature holding integers
    df["is_fraud"] = df["is_fraud"] * 2  # labels other than 0/1
    df["event_timestamp"] = df["event_timestamp"].dt.tz_localize(None)  # naive times
    expected = validate_data(df, GATES, CONTRACT, require_label=True)
    got = ooc.validate_data(parquet(df, tmp_path / "w.parquet"), GATES, CONTRACT, require_label=True)
    assert got.passed is expected.passed is False
    assert got.metrics["type_errors"].keys() == expected.metrics["type_errors"].keys()
    assert got.metrics["type_errors"]["card_age_days"] == expected.metrics["type_errors"]["card_age_days"]
    assert close(got.metrics["missing_share"], expected.metrics["missing_share"]) == []


def test_drift_gate_equals_the_in_memory_gate_with_its_label_check(tmp_path: Path) -> None:
    older = fraud(8_000, 7, 20)
    newest = generate(2_000, 8, days=5)
    newest["amount"] *= 1.6  # drift
    newest.loc[: len(newest) // 5, "is_fraud"] = 1  # label shift
    expected = drift_gate(older, newest, GATES, CONTRACT)
    report = tmp_path / "drift.html"
    got = ooc.drift_gate(
        parquet(older, tmp_path / "r.parquet"), parquet(newest, tmp_path / "c.parquet"), GATES, CONTRACT, report
    )
    assert got.metrics["label"] is not None and any("label" in f for f in got.failures)
    assert close(got.to_dict() | {"report": None}, expected.to_dict()) == []
    page = report.read_text()
    assert "Drift report" in page and "has no distribution pictures" in page  # it says what it leaves out


def test_drift_input_errors_are_the_gates(tmp_path: Path) -> None:
    older = generate(2_000, 9, days=5)
    newest = older.drop(columns=["amount"])
    got = ooc.drift_gate(
        parquet(older, tmp_path / "r.parquet"), parquet(newest, tmp_path / "c.parquet"), GATES, CONTRACT
    )
    expected = drift_gate(older, newest, GATES, CONTRACT)
    assert got.to_dict() == expected.to_dict() and not got.passed


def test_parquet_sources(tmp_path: Path) -> None:
    (tmp_path / "part").mkdir()
    for i in range(3):
        parquet(generate(100, i, days=1), tmp_path / "part" / f"{i}.parquet")
    files = ooc.parquet_files(tmp_path / "part")
    assert files == ooc.parquet_files(str(tmp_path / "part" / "*.parquet")) and len(files) == 3
    assert ooc.parquet_bytes(tmp_path / "part") == sum(os.path.getsize(f) for f in files)
    with pytest.raises(FileNotFoundError):
        ooc.parquet_files(tmp_path / "none-*.parquet")


def test_ood_gate_equals_the_in_memory_gate(tmp_path: Path) -> None:
    older = generate(30_000, 10, days=20)  # above ood's 20,000 rows: its tail quantiles' partial sort
    newest = generate(3_000, 11, days=5)
    newest.loc[:300, "amount"] = 1e7
    newest.loc[300:400, "channel"] = "fax"
    newest.loc[400:450, "distance_from_home_km"] = np.nan
    expected = ood_gate(older, newest, GATES, CONTRACT)
    got = ooc.ood_gate(parquet(older, tmp_path / "r.parquet"), parquet(newest, tmp_path / "c.parquet"), GATES, CONTRACT)
    assert not expected.passed
    assert close(got.to_dict(), expected.to_dict()) == []


def test_validate_data_step_out_of_core_decides_as_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`loopform step validate-data` on Parquet out of core: the same window, split, numbers and decisions."""
    from loopform import steps
    from loopform.spec import load_stack, stack_file

    events = generate(6_000, 12, days=40)
    events = events.sort_values(CONTRACT.timestamp, ignore_index=True)
    newest = events.index[-1_500:]  # the newest rows drift
    for column in ("amount", "distance_from_home_km", "avg_amount_30d", "txn_count_24h"):
        events.loc[newest, column] *= 3
    contract = CONTRACT
    keys = [contract.id, contract.entity, contract.timestamp]
    labels = parquet(events[[*keys, contract.label]], tmp_path / "labels.parquet")
    features = parquet(
        events.drop(columns=[contract.label]).sample(frac=1, random_state=1), tmp_path / "events.parquet"
    )
    monkeypatch.setattr(steps, "labels_uri", lambda ctx: str(labels))
    monkeypatch.setattr(steps, "source_uri", lambda ctx: str(features))
    results = {}
    for mode in (False, True):
        ctx = steps.StepContext(
            "fraud", load_stack(stack_file("local")), tmp_path / f"run-{mode}", None, tmp_path, ROOT, ROOT / "stacks"
        )
        try:
            found = steps.validate_data(ctx, out_of_core=mode)
        except steps.StepFailed:
            found = {p.stem: GateResult.read_json(p) for p in (ctx.run_dir / "gates").glob("*.json")}
        results[mode] = ({k: v.to_dict() | {"report": None} for k, v in found.items()}, ctx.read_json("window.json"))
    (memory, memory_window), (outside, outside_window) = results[False], results[True]
    assert set(memory) == {"validation", "drift", "ood"}
    assert close(outside, memory) == []
    assert outside_window == memory_window | {"out_of_core": True}
    assert not memory["drift"]["passed"]


def test_the_step_runs_out_of_core_above_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loopform import steps

    data = parquet(generate(500, 13, days=2), tmp_path / "events.parquet")
    monkeypatch.setattr(steps, "labels_uri", lambda ctx: str(data))
    monkeypatch.setattr(steps, "source_uri", lambda ctx: str(data))
    size = 2 * os.path.getsize(data)
    monkeypatch.setenv(steps.IN_MEMORY_BUDGET_ENV, str(size))
    assert not steps.runs_out_of_core(None)  # type: ignore[arg-type]
    monkeypatch.setenv(steps.IN_MEMORY_BUDGET_ENV, str(size - 1))
    assert steps.runs_out_of_core(None)  # type: ignore[arg-type]
    monkeypatch.setenv(steps.OUT_OF_CORE_ENV, "0")
    assert not steps.runs_out_of_core(None)  # type: ignore[arg-type]
    monkeypatch.setenv(steps.OUT_OF_CORE_ENV, "yes")
    with pytest.raises(steps.StepFailed, match="LOOPFORM_OUT_OF_CORE"):
        steps.runs_out_of_core(None)  # type: ignore[arg-type]
