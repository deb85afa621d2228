"""Benchmark: loopform's compute_drift against Evidently's DataDriftPreset on the same data, same run.

    python bench/drift.py --rows 200000 --cols 20

Prints wall time and peak memory of each, the time of just sorting the columns (the bound the
design aims at), whether every per-feature method and decision agrees, the largest score
difference, and the speed-up ratio. Each contender runs in its own forked process so their
memory peaks are separate (peak RSS growth over the process's size at the start of its run);
the data are generated once in the parent and shared copy-on-write.

It also times the calibrated decision (`compute_drift(..., calibrate=True)`, what the gate and the
monitor decide on): cold (the bootstrap null of each column simulated at the window's size, at
most CALIBRATION_MAX_ROWS rows) and warm (the null cached for this reference and window size, as
in every later monitor run of a long-lived process).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.table import ratio_row, write_json
from loopform.gates.drift import CALIBRATION_MAX_ROWS, compute_drift, decision_rule, evidently_decisions, null_draws
from loopform.spec import GatesSpec

GATES = GatesSpec()


def make_data(rows: int, current_rows: int, cols: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Numeric columns of mixed shapes; every third column of the current data is shifted."""
    rng = np.random.default_rng(seed)
    reference, current = {}, {}
    for i in range(cols):
        shape = i % 4
        shift = 0.3 if i % 3 == 0 else 0.0

        def draw(n: int, s: float, shape: int = shape) -> np.ndarray:
            if shape == 0:
                return rng.normal(s, 1.0, n)
            if shape == 1:
                return rng.lognormal(3.0 + s, 0.8, n)
            if shape == 2:
                return rng.gamma(2.0 + 2 * s, 10.0, n)
            return np.round(rng.normal(50 + 10 * s, 15, n), 1)

        reference[f"x{i:02d}"] = draw(rows, 0.0)
        current[f"x{i:02d}"] = draw(current_rows, shift)
    return pd.DataFrame(reference), pd.DataFrame(current)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _in_child(fn: Callable[[], Any], prepare: Callable[[], Any] | None, conn: Any) -> None:
    if prepare is not None:
        prepare()  # imports, outside the timed region
    start_rss = _rss_bytes()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    conn.send((seconds, max(0, peak - start_rss), result))
    conn.close()


def run_isolated(fn: Callable[[], Any], prepare: Callable[[], Any] | None = None) -> tuple[float, int, Any]:
    """Run fn in a forked child: (seconds, peak RSS growth in bytes, result)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_in_child, args=(fn, prepare, child))
    process.start()
    child.close()
    out = parent.recv()
    process.join()
    return out


def _import_evidently() -> None:
    import evidently.presets  # noqa: F401


def evidently_run(reference: pd.DataFrame, current: pd.DataFrame) -> dict[str, dict[str, Any]]:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    columns = list(reference.columns)
    definition = DataDefinition(numerical_columns=columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = Report([DataDriftPreset(columns=columns, drift_share=GATES.drift.max_drift_share)]).run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition),
        )
    return evidently_decisions(snapshot.dict())


def loopform_run(reference: pd.DataFrame, current: pd.DataFrame, workers: int | None) -> dict[str, dict[str, Any]]:
    stats = compute_drift(reference, current, list(reference.columns), GATES, workers=workers)
    return {
        c: {"method": f.method, "score": f.score, "threshold": f.threshold, "drifted": f.drifted}
        for c, f in stats.features.items()
    }


def calibrated_run(reference: pd.DataFrame, current: pd.DataFrame, workers: int | None) -> tuple[float, float, int]:
    """(cold seconds, warm seconds, features drifted by the calibrated decision)."""
    columns = list(reference.columns)
    started = time.perf_counter()
    stats = compute_drift(reference, current, columns, GATES, workers=workers, calibrate=True)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    compute_drift(reference, current, columns, GATES, workers=workers, calibrate=True)
    warm = time.perf_counter() - started
    assert stats.calibrated is not None
    return cold, warm, len(stats.calibrated.drifted)


def sort_bound(reference: pd.DataFrame, current: pd.DataFrame) -> float:
    """Seconds to sort every reference and current column once, single-threaded."""
    started = time.perf_counter()
    for frame in (reference, current):
        for column in frame.columns:
            np.sort(frame[column].to_numpy())
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="reference rows")
    parser.add_argument("--current-rows", type=int, default=None, help="current rows (default: --rows)")
    parser.add_argument("--cols", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="threads for compute_drift (default: CPUs)")
    parser.add_argument("--skip-evidently", action="store_true", help="time loopform only")
    parser.add_argument("--json", default=None, help="also write the rows of `make bench`'s table there")
    args = parser.parse_args(argv)
    current_rows = args.current_rows or args.rows

    reference, current = make_data(args.rows, current_rows, args.cols, args.seed)
    print(f"data: reference {args.rows:,} x {args.cols}, current {current_rows:,} x {args.cols}, CPUs {os.cpu_count()}")
    bound = sort_bound(reference, current)
    print(f"sort bound (np.sort of every column, both sides, 1 thread): {bound:8.2f} s")

    lf_seconds, lf_peak, ours = run_isolated(lambda: loopform_run(reference, current, args.workers))
    drifted = sum(d["drifted"] for d in ours.values())
    print(
        f"loopform compute_drift: {lf_seconds:8.2f} s  peak +{lf_peak / 2**20:7.0f} MiB  drifted {drifted}/{args.cols}"
    )
    print(f"  ratio to sort bound: {lf_seconds / bound:.2f}x")
    size = f"{args.rows:,} x {current_rows:,} x {args.cols}"
    rows = [ratio_row(f"drift statistics, {size}", lf_seconds, bound, "sort bound", "s", 1.5)]
    _, cal_peak, (cold, warm, cal_drifted) = run_isolated(lambda: calibrated_run(reference, current, args.workers))
    level = decision_rule(GATES, args.cols)[1]
    print(
        f"loopform calibrated decision: cold {cold:8.2f} s, warm {warm:8.2f} s  peak +{cal_peak / 2**20:7.0f} MiB  "
        f"drifted {cal_drifted}/{args.cols} ({null_draws(level)} null draws per column at "
        f"{min(current_rows, CALIBRATION_MAX_ROWS)} rows)"
    )
    if args.skip_evidently:
        write_json(args.json, rows, None)
        return 0

    ev_seconds, ev_peak, theirs = run_isolated(lambda: evidently_run(reference, current), _import_evidently)
    print(f"evidently DataDriftPreset: {ev_seconds:8.2f} s  peak +{ev_peak / 2**20:7.0f} MiB")
    same_method = all(ours[c]["method"] == theirs[c]["method"] for c in ours)
    same_drift = all(ours[c]["drifted"] == theirs[c]["drifted"] for c in ours)
    worst = max(abs(ours[c]["score"] - theirs[c]["score"]) for c in ours)
    print(
        f"agreement: methods {'all equal' if same_method else 'DIFFER'}, decisions "
        f"{'all equal' if same_drift else 'DIFFER'}, max |score difference| {worst:.2e}"
    )
    print(f"speed-up: {ev_seconds / lf_seconds:.1f}x faster, memory {ev_peak / max(lf_peak, 1):.1f}x less")
    print(f"calibrated decision vs Evidently: {ev_seconds / cold:.1f}x faster cold, {ev_seconds / warm:.1f}x warm")
    rows.append(ratio_row(f"drift statistics, {size}, Evidently", lf_seconds, ev_seconds, "Evidently", "s", 1.0))
    write_json(args.json, rows, same_method and same_drift)
    return 0 if same_method and same_drift else 1


if __name__ == "__main__":
    raise SystemExit(main())
