"""Benchmark: the gates as production runs them (with their reports) against their peers, in one process.

    python bench/gates.py                            # 200k and 1M rows; Evidently's report at 200k
    python bench/gates.py --sizes 200000 --repeats 3 --monitor-reference 0

Three parts, each timed `--repeats` times (median printed; contenders take turns, so they share the
machine's load) after one untimed warm-up, so the drift gate's bootstrap null is cached, as in a
long-lived monitor (a cold run adds the same null to both):

1. The drift gate with its HTML report (`drift_gate(..., report_path)`, as validate-data and the
   monitor run it) against the statistics alone (`compute_drift(..., calibrate=True)`), the sort bound
   (one np.sort of every numeric feature column and a value count of every categorical one, both
   sides, one thread) and Evidently 0.7.23's DataDriftPreset report (run + save_html), the report the
   gate wrote before. Two data sets: the fraud model's 9 features (`models.fraud.data.generate`, a
   reference and a covariate-drifted current window of the same size) and 20 numeric columns
   (`bench/drift.py`'s make_data). Evidently runs up to `--evidently-max-rows` (it takes minutes at 1M),
   `--evidently-repeats` times (once by default: one run takes 10-150x the others).
2. The validation and OOD gates at the largest size against one pass over the columns they read
   (each column's missing count, min and max of the numeric ones, and for validation the event ids'
   repeats, a hash pass: the least its duplicate check can do), and their summary reports.
3. The monitor at `--monitor-reference` reference rows x `--monitor-current` payload rows, with its
   report: the reference read from Parquet and sorted on each run (before) against the release's
   stored profile loaded with its digest checked (after).

Exits non-zero only when a decision of the gate (Evidently's method and drifted flag per feature,
as the gate reports them) differs from Evidently's own report.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.drift import make_data
from bench.table import ratio_row, write_json
from loopform.contract import Contract, Feature
from loopform.gates import drift_gate, ood_gate, validate_data
from loopform.gates.drift import compute_drift, evidently_decisions, profile
from loopform.gates.report import write_summary_report
from loopform.spec import GatesSpec
from models.fraud.contract import CONTRACT
from models.fraud.data import generate

GATES = GatesSpec()
NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of each function over `repeats` rounds that run them in turn (so they share the machine's
    load and allocator state), after one untimed round; and each one's last result."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results = {name: fn() for name, fn in fns.items()}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}, results


def timed(fn: Callable[[], Any], repeats: int, warm: bool = True) -> tuple[float, Any]:
    """(median seconds of `repeats` runs, last result), after one untimed run when `warm`."""
    if warm:
        fn()
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def numeric_contract(columns: list[str]) -> Contract:
    """A contract of plain numeric features, for the 20-column data."""
    features = tuple(
        Feature(name, "numeric", "float64", -1e12, 1e12, None, "", "entity" if i == 0 else "event")
        for i, name in enumerate(columns)
    )
    return Contract(
        "numbers", "classification", "event_id", "entity", "", "event_timestamp", "label", "", features, "", ""
    )


def sort_bound(reference: pd.DataFrame, current: pd.DataFrame, contract: Contract) -> None:
    for frame in (reference, current):
        for name in contract.feature_names:
            if contract.kinds[name] == "numeric":
                np.sort(frame[name].to_numpy(dtype=np.float64, na_value=np.nan))
            else:
                frame[name].value_counts()


def evidently_report(reference: pd.DataFrame, current: pd.DataFrame, contract: Contract, path: Path) -> dict:
    """Evidently's DataDriftPreset report with the gate's thresholds, as the gate wrote it before: its decisions."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    columns = list(contract.feature_names)
    definition = DataDefinition(
        numerical_columns=list(contract.numeric), categorical_columns=list(contract.categorical)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = Report([DataDriftPreset(columns=columns, drift_share=GATES.drift.max_drift_share)]).run(
            Dataset.from_pandas(current[columns], data_definition=definition),
            Dataset.from_pandas(reference[columns], data_definition=definition),
        )
        snapshot.save_html(str(path))
    return evidently_decisions(snapshot.dict())


def disagreements(gate: Any, theirs: dict[str, dict[str, Any]]) -> list[str]:
    return [
        f"{name}: loopform {f['method']} drifted={f['drifted']}, Evidently {theirs[name]['method']} "
        f"drifted={theirs[name]['drifted']}"
        for name, f in gate.metrics["features"].items()
        if (f["method"], f["drifted"]) != (theirs[name]["method"], theirs[name]["drifted"])
    ]


def drift_part(name: str, reference: pd.DataFrame, current: pd.DataFrame, contract: Contract, args: Any) -> list[str]:
    """Time the drift gate with its report against its peers; returns disagreements with Evidently."""
    columns, kinds, out = list(contract.feature_names), contract.kinds, Path(args.out)
    path = out / f"drift-{name}-{len(reference)}.html"
    seconds, results = interleaved(
        {
            "bound": lambda: sort_bound(reference, current, contract),
            "stats": lambda: compute_drift(reference, current, columns, GATES, kinds=kinds, calibrate=True),
            "bare": lambda: drift_gate(reference, current, GATES, contract),
            "full": lambda: drift_gate(reference, current, GATES, contract, path),
        },
        args.repeats,
    )
    bound, stats, bare, full, gate = (*seconds.values(), results["full"])
    rows = f"{len(reference):,} x {len(current):,} x {len(columns)}"
    print(f"drift gate, {name}, {rows}:")
    print(f"  sort bound {bound:7.3f} s | statistics alone {stats:7.3f} s | gate {bare:7.3f} s")
    print(
        f"  gate with its report {full:7.3f} s = {full / stats:.2f}x the statistics alone "
        f"({full / bound:.2f}x the sort bound); report {path.stat().st_size / 1024:.0f} KiB"
    )
    check = f"drift gate with report, {name}, {len(reference):,} rows"
    args.rows.append(ratio_row(check, full, stats, "statistics alone", "s", 2.0))
    if len(reference) > args.evidently_max_rows:
        print("  Evidently's report: not run at this size (--evidently-max-rows)")
        return []
    peer, theirs = timed(
        lambda: evidently_report(reference, current, contract, out / f"evidently-{name}.html"),
        args.evidently_repeats,
        warm=False,
    )
    differ = disagreements(gate, theirs)
    args.rows.append(ratio_row(f"{check}, Evidently", full, peer, "Evidently report", "s", 1.0))
    print(
        f"  Evidently's DataDriftPreset report {peer:7.3f} s = {peer / stats:.1f}x the statistics alone, "
        f"{peer / full:.1f}x the gate with its report; decisions: "
        + ("all equal" if not differ else "DIFFER: " + "; ".join(differ))
    )
    return differ


def one_pass(frame: pd.DataFrame, columns: list[str], ids: str | None = None) -> None:
    """Each column read once: its missing count, the min and max of a numeric column, and for the `ids` column
    its repeats (one hash pass: the least a duplicate check can do)."""
    for name in columns:
        series = frame[name]
        if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
            values = series.to_numpy(dtype=np.float64, na_value=np.nan)
            np.count_nonzero(np.isnan(values)), np.nanmin(values), np.nanmax(values)
        else:
            int(series.isna().sum())
    if ids is not None:
        int(frame[ids].duplicated().sum())


def validation_part(frame: pd.DataFrame, args: Any) -> None:
    out = Path(args.out)
    older, newest = frame.iloc[: len(frame) * 4 // 5], frame.iloc[len(frame) * 4 // 5 :]
    read = [c for c in CONTRACT.columns if c in frame.columns]
    features = list(CONTRACT.feature_names)
    seconds, results = interleaved(
        {
            "passed": lambda: one_pass(frame, read, CONTRACT.id),
            "validation": lambda: validate_data(frame, GATES, CONTRACT, require_label=True),
            "both": lambda: (one_pass(older, features), one_pass(newest, features)),
            "ood": lambda: ood_gate(older, newest, GATES, CONTRACT),
        },
        args.repeats,
    )
    passed, validation, both, ood = seconds.values()
    result = results["validation"]
    summary, _ = timed(lambda: write_summary_report(frame, None, CONTRACT, out / "validation.html"), args.repeats)
    ood_summary, _ = timed(lambda: write_summary_report(newest, older, CONTRACT, out / "ood.html"), args.repeats)
    print(f"validation and OOD gates, fraud data, {len(frame):,} rows ({len(read)} columns read):")
    print(
        f"  one pass over the columns {passed:7.3f} s | validation gate {validation:7.3f} s = "
        f"{validation / passed:.2f}x (passed: {result.passed}) | its summary report {summary:7.3f} s"
    )
    print(
        f"  one pass over both sides' features {both:7.3f} s | OOD gate (envelope fit + rows) {ood:7.3f} s = "
        f"{ood / both:.2f}x | its summary report {ood_summary:7.3f} s"
    )
    args.rows.append(ratio_row(f"validation gate, {len(frame):,} rows", validation, passed, "one pass", "s", 2.0))
    args.rows.append(ratio_row(f"OOD gate, {len(frame):,} rows", ood, both, "one pass", "s", 2.0))


def monitor_part(args: Any) -> bool:
    """Time the monitor before and after stored profiles; whether both decide the same with the same numbers."""
    from loopform.gates.stored_profile import save_profile
    from loopform.monitor import run_monitor
    from loopform.payloads import PayloadLog

    rows, served = args.monitor_reference, args.monitor_current
    reference = generate(rows, 31)
    current = generate(served, 32, days=1, covariate_drift=0.3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parquet = folder / "reference.parquet"
        reference.to_parquet(parquet, index=False)
        columns = [*CONTRACT.feature_names, CONTRACT.label]
        started = time.perf_counter()
        sha256 = save_profile(
            profile(reference, columns, kinds={**CONTRACT.kinds, CONTRACT.label: "numeric"}), folder / "profile.npz"
        )
        stored = time.perf_counter() - started
        uri = str(folder / "payloads")
        step = timedelta(hours=20) / served
        fields = list(CONTRACT.feature_names)
        records = current[fields].to_dict("records")
        with PayloadLog(uri, "fraud", flush_rows=served + 1, flush_seconds=3600) as log:
            log.log(
                {"time": NOW - timedelta(hours=22) + i * step, **row, "prediction": 0, "score": 0.1, "model_version": 1}
                for i, row in enumerate(records)
            )

        def monitor(reference: Path, digest: str | None) -> Any:
            return run_monitor(
                "fraud",
                contract=CONTRACT,
                reference=reference,
                reference_sha256=digest,
                payload_uri=uri,
                gates=GATES,
                until=NOW,
                report_dir=folder / "reports",
                min_rows=500,
            )

        monitor(parquet, None)  # warm both: the null cache is shared (same reference content)
        times: dict[str, list[float]] = {"before": [], "after": []}
        results = {}
        for _ in range(args.repeats):  # alternate, so both see the same load
            for key, (path, digest) in {"before": (parquet, None), "after": (folder / "profile.npz", sha256)}.items():
                started = time.perf_counter()
                results[key] = monitor(path, digest)
                times[key].append(time.perf_counter() - started)
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        same = (results["before"].drift_share, results["before"].features) == (
            results["after"].drift_share,
            results["after"].features,
        )
        print(f"monitor with its report, {rows:,} reference x {served:,} payload rows:")
        print(
            f"  before (training data read and sorted each run) {before:7.3f} s | after (stored profile, "
            f"{(folder / 'profile.npz').stat().st_size / 2**20:.1f} MiB, digest checked) {after:7.3f} s = "
            f"{before / after:.1f}x faster | profile stored once at registration in {stored:.2f} s | "
            f"same decision and numbers: {same}"
        )
        check = f"monitor, {rows:,} reference x {served:,} payload rows"
        args.rows.append(ratio_row(check, after, before, "training data sorted per run", "s", 1.0))
        return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000], help="rows of each side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--evidently-max-rows", type=int, default=200_000)
    parser.add_argument("--evidently-repeats", type=int, default=1, help="its report takes 10-150x longer")
    parser.add_argument("--monitor-reference", type=int, default=1_000_000, help="0 skips the monitor part")
    parser.add_argument("--monitor-current", type=int, default=100_000)
    parser.add_argument("--out", default=None, help="folder for the reports (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the rows of `make bench`'s table there")
    args = parser.parse_args(argv)
    args.rows = []
    load = os.getloadavg()
    print(f"CPUs {os.cpu_count()}, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, median of {args.repeats}")
    differ: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        args.out = args.out or tmp
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            reference, current = generate(size, 1), generate(size, 2, covariate_drift=0.3)
            differ += drift_part("fraud", reference, current, CONTRACT, args)
            numbers_ref, numbers_cur = make_data(size, size, 20, 0)
            differ += drift_part("numeric20", numbers_ref, numbers_cur, numeric_contract(list(numbers_ref)), args)
        validation_part(generate(max(args.sizes), 3), args)
        if args.monitor_reference and not monitor_part(args):
            differ.append("the monitor decides differently from a stored profile than from the training data")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if differ:
        print(f"DECISIONS DIFFER from Evidently's: {len(differ)}")
    write_json(args.json, args.rows, not differ)
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
