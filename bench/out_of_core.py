"""Benchmark: validation and drift gates out of core over Parquet, 1M to 50M rows, against peers that fit in memory.

    python bench/out_of_core.py                                  # 1M, 10M and 50M rows (35 minutes on 2 shared cores)
    python bench/out_of_core.py --sizes 1000000 --json out.json  # what `make bench` may run

Each size is a window of N rows x 20 numeric features (bench/drift.py's four shapes; every third feature
of the newest 20% shifted) plus event id, entity, event time and a 0/1 label, written as Parquet in row
groups of 1M rows (never all in memory) to a temp folder under /tmp, deleted after. The out-of-core gates
(`loopform.gates.out_of_core`: validation over all N rows, drift of the newest 20% against the older 80%,
DuckDB memory_limit --memory-limit, threads = CPUs) run in a forked child; its time and peak RSS
(getrusage ru_maxrss of the child: the whole process, interpreter and imports included) are reported.
Beside them, where they still fit: the in-memory gates (pandas read of the same files + `validate_data` +
`drift_gate`, up to --in-memory-max rows) and Evidently 0.7.23's DataDriftPreset on pandas (up to
--evidently-max rows; its read of the Parquet is not timed), each in its own child. The run fails only
when a decision differs: out-of-core against Evidently (method and drifted flag per feature) or against
the in-memory gates (every statistic to 1e-9 relative, every decision equal).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.table import limit_row, ratio_row, write_json
from loopform.contract import Contract, Feature
from loopform.spec import GatesSpec

GATES = GatesSpec()
FEATURES = 20
ROW_GROUP = 1_000_000
CURRENT_SHARE = 0.2  # the newest 20% of the window is compared with the older 80%, as validate-data does
RSS_LIMIT_GIB = 2.0
IN_MEMORY_RATIO = 5.0  # out of core may cost this much more time than in memory, where memory suffices


def contract() -> Contract:
    features = tuple(
        Feature(f"x{i:02d}", "numeric", "float64", -1e12, 1e12, None, "", "entity" if i == 0 else "event")
        for i in range(FEATURES)
    )
    return Contract(
        "numbers", "classification", "event_id", "entity", "", "event_timestamp", "label", "", features, "", ""
    )


def _block(rows: int, shifted: bool, first_id: int, rng: np.random.Generator) -> Any:
    """One row group: bench/drift.py's shapes (normal, log-normal, gamma, rounded normal)."""
    import pyarrow as pa

    columns: dict[str, Any] = {
        "event_id": pa.array(np.arange(first_id, first_id + rows, dtype=np.int64)),
        "entity": pa.array(rng.integers(0, 100_000, rows)),
        "event_timestamp": pa.array(
            np.datetime64("2026-11-01") + (first_id + np.arange(rows)).astype("timedelta64[ms]"),
            type=pa.timestamp("ms", tz="UTC"),
        ),
    }
    for i in range(FEATURES):
        s = 0.3 if shifted and i % 3 == 0 else 0.0
        shape = i % 4
        if shape == 0:
            values = rng.normal(s, 1.0, rows)
        elif shape == 1:
            values = rng.lognormal(3.0 + s, 0.8, rows)
        elif shape == 2:
            values = rng.gamma(2.0 + 2 * s, 10.0, rows)
        else:
            values = np.round(rng.normal(50 + 10 * s, 15, rows), 1)
        columns[f"x{i:02d}"] = pa.array(values)
    columns["label"] = pa.array((rng.random(rows) < 0.02).astype(np.int64))
    return pa.table(columns)


def write_window(folder: Path, rows: int, seed: int) -> tuple[Path, Path]:
    """(reference folder, current folder): the older 80% and the newest 20% of a window of `rows` rows."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    current_rows = round(rows * CURRENT_SHARE)
    parts = ((folder / "reference", rows - current_rows, False, 0), (folder / "current", current_rows, True, rows))
    for path, n, shifted, first in parts:
        path.mkdir(parents=True)
        writer = None
        for start in range(0, n, ROW_GROUP):
            table = _block(min(ROW_GROUP, n - start), shifted, first + start, rng)
            writer = writer or pq.ParquetWriter(path / "part-0.parquet", table.schema)
            writer.write_table(table, row_group_size=ROW_GROUP)
        assert writer is not None
        writer.close()
    return folder / "reference", folder / "current"


def _child(fn: Callable[[], Any], conn: Any) -> None:
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    conn.send((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, result))
    conn.close()


def in_child(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    """(seconds, peak RSS bytes of the child process, result) of fn in a forked child."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(fn, child))
    process.start()
    child.close()
    out = parent.recv()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"child exited with {process.exitcode}")
    return out


def _decisions(validation: Any, drift: Any) -> dict[str, Any]:
    return {"validation": validation.to_dict(), "drift": drift.to_dict()}


def out_of_core(reference: Path, current: Path, memory_limit: str) -> dict[str, Any]:
    from loopform.gates import out_of_core as ooc

    window = [*ooc.parquet_files(reference), *ooc.parquet_files(current)]
    with ooc.connect(memory_limit) as con:
        validation = ooc.validate_data(window, GATES, contract(), require_label=True, con=con)
        drift = ooc.drift_gate(reference, current, GATES, contract(), con=con)
    return _decisions(validation, drift)


def in_memory(reference: Path, current: Path) -> dict[str, Any]:
    import pandas as pd

    from loopform.gates import drift_gate, validate_data

    older, newest = pd.read_parquet(reference), pd.read_parquet(current)
    validation = validate_data(pd.concat([older, newest], ignore_index=True), GATES, contract(), require_label=True)
    return _decisions(validation, drift_gate(older, newest, GATES, contract()))


def evidently(reference: Path, current: Path) -> tuple[float, dict[str, Any]]:
    """(seconds of Evidently's report alone, its decisions per feature)."""
    import pandas as pd

    from bench.drift import _import_evidently, evidently_run

    _import_evidently()
    columns = list(contract().feature_names)
    older, newest = pd.read_parquet(reference, columns=columns), pd.read_parquet(current, columns=columns)
    started = time.perf_counter()
    decisions = evidently_run(older, newest)
    return time.perf_counter() - started, decisions


def agree_in_memory(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Differences between the out-of-core and in-memory results (statistics to 1e-9 relative)."""
    problems = []
    for gate in ("validation", "drift"):
        if ours[gate]["passed"] != theirs[gate]["passed"]:
            problems.append(f"{gate}: passed {ours[gate]['passed']} vs {theirs[gate]['passed']}")
    a, b = ours["drift"]["metrics"]["features"], theirs["drift"]["metrics"]["features"]
    for name, mine in a.items():
        other = b[name]
        for key in ("method", "drifted"):
            if mine[key] != other[key]:
                problems.append(f"{name}: {key} {mine[key]} vs {other[key]}")
        for key in ("drifted", "p_value"):
            if mine["calibrated"][key] != other["calibrated"][key]:
                problems.append(f"{name}: calibrated {key} {mine['calibrated'][key]} vs {other['calibrated'][key]}")
        if not np.isclose(mine["score"], other["score"], rtol=1e-9, atol=0):
            problems.append(f"{name}: score {mine['score']} vs {other['score']}")
    for key in ("missing_share", "out_of_range_share", "duplicate_ids", "label_rate", "rows"):
        x, y = ours["validation"]["metrics"].get(key), theirs["validation"]["metrics"].get(key)
        if x != y and not (isinstance(x, float) and np.isclose(x, y, rtol=1e-12)):
            problems.append(f"validation {key}: {x} vs {y}")
    return problems


def agree_evidently(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    features = ours["drift"]["metrics"]["features"]
    return [
        f"{name}: {features[name]['method']}/{features[name]['drifted']} vs {d['method']}/{d['drifted']}"
        for name, d in theirs.items()
        if (features[name]["method"], features[name]["drifted"]) != (d["method"], d["drifted"])
    ]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def measure(size: int, args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """(growth-table line, rows for bench/all.py, decisions agree) of one window size."""
    folder = Path(tempfile.mkdtemp(prefix="loopform-bench-ooc-", dir=args.dir))
    try:
        started = time.perf_counter()
        reference, current = in_child(lambda: write_window(folder, size, seed=size % 1000 + 1))[2]
        written = time.perf_counter() - started
        gib = sum(p.stat().st_size for p in folder.rglob("*.parquet")) / 2**30
        print(f"{size:,} rows: {gib:.2f} GiB of Parquet written in {written:.0f} s (load {load()})", flush=True)
        runs = [in_child(lambda: out_of_core(reference, current, args.memory_limit)) for _ in range(args.repeat)]
        seconds = statistics.median(r[0] for r in runs)
        peak = max(r[1] for r in runs) / 2**30
        ours = runs[0][2]
        print(f"  out-of-core: {seconds:.1f} s, peak RSS {peak:.2f} GiB (load {load()})", flush=True)
        line: dict[str, Any] = {"rows": size, "gib": gib, "ooc_s": seconds, "ooc_rss": peak}
        rows = [limit_row(f"out-of-core gates, {size:,} rows: peak RSS", peak, "GiB", RSS_LIMIT_GIB)]
        drifted = ours["drift"]["metrics"]["drifted_count"]
        print(f"  decisions: validation passed {ours['validation']['passed']}, {drifted} of {FEATURES} drifted")
        agree = True
        if size <= args.in_memory_max:
            mem_s, mem_rss, theirs = in_child(lambda: in_memory(reference, current))
            problems = agree_in_memory(ours, theirs)
            agree &= not problems
            line.update(mem_s=mem_s, mem_rss=mem_rss / 2**30)
            print(f"  in-memory gates: {mem_s:.1f} s, peak RSS {mem_rss / 2**30:.2f} GiB; agree: {problems or 'yes'}")
            check = f"out-of-core vs in-memory gates, {size:,} rows"
            rows.append(ratio_row(check, seconds, mem_s, "in-memory", "s", IN_MEMORY_RATIO))
        if size <= args.evidently_max:
            _, ev_rss, (ev_s, decisions) = in_child(lambda: evidently(reference, current))
            problems = agree_evidently(ours, decisions)
            agree &= not problems
            line.update(ev_s=ev_s, ev_rss=ev_rss / 2**30)
            print(
                f"  Evidently DataDriftPreset: {ev_s:.1f} s, peak RSS {ev_rss / 2**30:.2f} GiB; agree: {problems or 'yes'}"
            )
            rows.append(
                ratio_row(f"out-of-core gates vs Evidently drift, {size:,} rows", seconds, ev_s, "Evidently", "s", 1)
            )
        line["load"] = load()
        return line, rows, agree
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000])
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB memory_limit of the out-of-core gates")
    parser.add_argument("--in-memory-max", type=int, default=10_000_000, help="largest window the in-memory gates run")
    parser.add_argument("--evidently-max", type=int, default=1_000_000, help="largest window Evidently runs")
    parser.add_argument("--repeat", type=int, default=1, help="out-of-core runs per size (median reported)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the Parquet files go (deleted after)")
    parser.add_argument("--json", help="write the rows for bench/all.py here")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    agree = True
    table = []
    for size in args.sizes:
        line, measured, agreed = measure(size, args)
        table.append(line)
        rows += measured
        agree &= agreed

    print(
        "\n| rows | Parquet | out-of-core time | peak RSS | in-memory time / RSS | Evidently time / RSS | load 1/5 min |"
    )
    print("|---|---|---|---|---|---|---|")
    for t in table:
        mem = f"{t['mem_s']:.1f} s / {t['mem_rss']:.2f} GiB" if "mem_s" in t else "not run"
        ev = f"{t['ev_s']:.1f} s / {t['ev_rss']:.2f} GiB" if "ev_s" in t else "not run"
        print(
            f"| {t['rows']:,} | {t['gib']:.2f} GiB | {t['ooc_s']:.1f} s | {t['ooc_rss']:.2f} GiB | {mem} | {ev} | "
            f"{t['load']} |"
        )
    write_json(args.json, rows, agree)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
