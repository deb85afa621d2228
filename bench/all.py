"""`make bench`: every benchmark at a size that fits a few minutes, then one table of ratios against each peer.

    python bench/all.py                 # each script in turn, then the table (Markdown, for bench/README.md)
    python bench/all.py --only gates    # one script's rows

Each script runs as its own process with `--json` (bench/table.py) and prints its own detail as it goes; the
peers (Evidently, plain FastAPI, the raw model, the sort bound, one pass over the columns, Evidently and the
in-memory gate for data beyond memory, `import pulumi`) run in the same process or run as loopform. The exit
status is non-zero only when a script's decisions differ from its peer's (or a script fails); a missed time
target shows as NO in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.table import markdown  # noqa: E402

#: (name, script and arguments): the smallest sizes that still show each claim (e.g. the 500-model render).
BENCHMARKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gates", ("bench/gates.py", "--sizes", "200000", "1000000", "--monitor-reference", "1000000")),
    ("drift", ("bench/drift.py", "--rows", "200000", "--cols", "20")),
    ("serving", ("bench/serving.py", "--requests", "400")),
    # The 50M-row window is most of the run (about 13 minutes on two cores): the 2 GiB claim needs it.
    ("data beyond memory", ("bench/out_of_core.py", "--sizes", "1000000", "50000000", "--in-memory-max", "1000000")),
    ("iac", ("bench/iac.py", "--models", "1", "50", "500", "--repeat", "1")),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[name for name, _ in BENCHMARKS], help="run only these")
    args = parser.parse_args(argv)
    chosen = [(name, command) for name, command in BENCHMARKS if not args.only or name in args.only]
    rows: list[dict] = []
    failed: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, command in chosen:
            out = Path(tmp) / f"{name}.json"
            print(f"\n=== {name}: {' '.join(command)}", flush=True)
            code = subprocess.call([sys.executable, *command, "--json", str(out)], cwd=ROOT)
            result = json.loads(out.read_text()) if out.exists() else {"rows": [], "decisions_agree": None}
            rows += [{"benchmark": name, **row} for row in result["rows"]]
            if code != 0 or result["decisions_agree"] is False:
                failed.append(f"{name} (exit {code}, decisions agree: {result['decisions_agree']})")
    load = os.getloadavg()
    print(
        f"\n## make bench: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end, {time.perf_counter() - started:.0f} s in all\n"
    )
    print(markdown(rows))
    if failed:
        print(f"\nFAILED (decisions differ from the peer's, or the script failed): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
