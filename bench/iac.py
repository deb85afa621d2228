"""Benchmark: the Pulumi program's start-up and `loopform render`'s growth with the number of models.

    python bench/iac.py            # import x 5, render with 1, 50 and 500 models x 3 (several minutes)
    python bench/iac.py --quick    # import x 5, render with 1 and 50 models once
    python bench/iac.py --json out.json   # also write the rows of `make bench`'s table (bench/table.py)

Program import: `import components.platform` (what `__main__.py` imports before it reads the stack), each in a
fresh process, against the floor every Pulumi program pays, `import pulumi, pulumi_kubernetes`, timed the same
way in the same run. Render: a copy of the project whose prod stack declares N scaffolded models (each with a
training schedule and serving replicas, as the stack's own models), rendered by `loopform render --stack prod`
in a fresh process, wall and CPU (user + system) time; the growth column is each CPU time over the first row's.
Medians throughout. Exits non-zero only if a render fails: times are reported, never asserted (there are no
decisions to compare with a peer's, so `decisions_agree` is null).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.table import limit_row, write_json  # noqa: E402
from loopform.scaffold import stack_entry, write_model_files  # noqa: E402
from loopform.spec import CONFIG_KEY  # noqa: E402

#: What a user's repository holds that render reads (the runtime itself is the installed package).
PROJECT = ("Pulumi.yaml", "__main__.py", "stacks", "models", "bentos", "policies", "deploy")
STACK = "prod"
SCHEDULE = "0 3 * * *"
#: The issue's targets (issue 15, item 5), printed beside the measurements.
IMPORT_TARGET_S = 1.0
RENDER_TARGET_S = {500: 20.0}

_TIMED_IMPORT = "import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"


def timed_import(modules: str, repeat: int) -> float:
    """Median seconds to import `modules` in a fresh interpreter started in the repository (start-up excluded)."""
    times = []
    for _ in range(repeat):
        done = subprocess.run(
            [sys.executable, "-c", _TIMED_IMPORT.format(module=modules)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        times.append(float(done.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def make_project(folder: Path, models: int) -> Path:
    """A copy of the project whose prod stack declares `models` models: its own, then scaffolded ones."""
    folder.mkdir(parents=True)
    for name in PROJECT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(source, folder / name)
    path = folder / "stacks" / f"Pulumi.{STACK}.yaml"
    document = yaml.safe_load(path.read_text())
    declared = document["config"][CONFIG_KEY]["models"]
    for i in range(max(models, 1) - len(declared)):
        name = f"bench{i:04d}"
        write_model_files(folder, name, "classification")
        declared[name] = {**stack_entry(name, "classification", STACK), "training": {"schedule": SCHEDULE}}
    # Fewer than the stack's own: keep the first ones (at least one).
    document["config"][CONFIG_KEY]["models"] = dict(list(declared.items())[: max(models, 1)])
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return folder


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_render(project: Path, repeat: int) -> tuple[float, float, int]:
    """Median wall and CPU seconds of `loopform render --stack prod` in a fresh process, and the files it wrote.

    CPU time (user + system) is what a shared machine's load inflates least."""
    times, cpu, files = [], [], 0
    for i in range(repeat):
        out = project / f"rendered-{i}"
        start, start_cpu = time.perf_counter(), _children_cpu()
        done = subprocess.run(
            [sys.executable, "-m", "loopform.cli", "render", "--stack", STACK, "--out", str(out)],
            cwd=project,
            capture_output=True,
            text=True,
        )
        times.append(time.perf_counter() - start)
        cpu.append(_children_cpu() - start_cpu)
        if done.returncode != 0:
            raise SystemExit(f"render of {project} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr}")
        files = sum(1 for p in out.iterdir() if p.suffix == ".yaml")
    return statistics.median(times), statistics.median(cpu), files


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 50 models, each rendered once (for make bench)")
    parser.add_argument("--models", type=int, nargs="+", help="model counts to render (default 1 50 500)")
    parser.add_argument("--repeat", type=int, help="renders per model count (default 3, --quick 1)")
    parser.add_argument("--import-repeat", type=int, default=5, help="fresh processes per import (default 5)")
    parser.add_argument("--json", default=None, help="also write the rows of `make bench`'s table there")
    args = parser.parse_args()
    counts = args.models or ([1, 50] if args.quick else [1, 50, 500])
    repeat = args.repeat or (1 if args.quick else 3)

    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}")
    program = timed_import("components.platform", args.import_repeat)
    floor = timed_import("pulumi, pulumi_kubernetes", args.import_repeat)
    print(f"\nprogram import, median of {args.import_repeat} fresh processes:\n")
    print("| import | seconds | x pulumi + pulumi_kubernetes | target |")
    print("|---|---|---|---|")
    print(f"| pulumi, pulumi_kubernetes (the floor) | {floor:.2f} | 1.00 | |")
    print(f"| components.platform (the program) | {program:.2f} | {program / floor:.2f} | <= {IMPORT_TARGET_S:.0f} s |")

    rows = []
    with tempfile.TemporaryDirectory(prefix="loopform-bench-iac-") as tmp:
        for count in counts:
            project = make_project(Path(tmp) / f"models-{count}", count)
            wall, cpu, files = timed_render(project, repeat)
            rows.append((count, files, wall, cpu))
            shutil.rmtree(project)
    base = rows[0][3]
    print(f"\nloopform render --stack {STACK}, median of {repeat} fresh processes:\n")
    print("| models | rendered files | wall s | CPU s | CPU ms per model | CPU x first row | target |")
    print("|---|---|---|---|---|---|---|")
    for count, files, wall, cpu in rows:
        target = f"<= {RENDER_TARGET_S[count]:.0f} s" if count in RENDER_TARGET_S else ""
        print(
            f"| {count} | {files} | {wall:.1f} | {cpu:.1f} | {1000 * cpu / count:.0f} | {cpu / base:.1f} | {target} |"
        )
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    write_json(args.json, json_rows(program, floor, rows), None)
    return 0


def json_rows(program: float, floor: float, renders: list[tuple[int, int, float, float]]) -> list[dict[str, Any]]:
    """The rows of `make bench`'s table: the import against its floor, and each render's wall and CPU seconds
    (against the issue's target where it sets one, else reported only)."""
    row = limit_row("program import (components.platform)", program, "s", IMPORT_TARGET_S)
    rows = [{**row, "peer": floor, "peer_name": "import pulumi, pulumi_kubernetes", "ratio": program / floor}]
    for count, _, wall, cpu in renders:
        for clock, seconds in (("wall", wall), ("CPU user+sys", cpu)):
            check = f"render, {count} model{'s' if count > 1 else ''} ({clock})"
            if count in RENDER_TARGET_S:
                rows.append(limit_row(check, seconds, "s", RENDER_TARGET_S[count]))
            else:
                rows.append({**limit_row(check, seconds, "s", float("inf")), "target": "none (growth)", "met": True})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
