"""`loopform new model`: what it refuses, and that what it writes is a valid model of the project.

The end-to-end proof (the scaffold rendered, trained, gated, promoted and served) is in test_local_loop.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from string import Template

import pytest

from loopform.scaffold import NAME, TEMPLATES, values

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("Pulumi.yaml", "__main__.py", "stacks", "models", "bentos", "policies", "deploy")


def _copy(folder: Path) -> Path:
    for name in PROJECT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(source, folder / name)
    return folder


def _new(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loopform.cli", "new", "model", *args], capture_output=True, text=True, cwd=root
    )


def test_refusals_name_the_problem_and_write_nothing(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    stacks = {p.name: p.read_text() for p in (root / "stacks").glob("*.yaml")}
    for args, message in (
        (("Bad-name", "--task", "regression"), "use lowercase letters and digits"),
        (("fraud", "--task", "regression"), "models/fraud exists"),
    ):
        result = _new(root, *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert _new(root, "demo", "--task", "ranking").returncode == 2  # argparse: not a task
    assert {p.name: p.read_text() for p in (root / "stacks").glob("*.yaml")} == stacks
    assert not (root / "models" / "demo").exists()


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_scaffold_is_a_valid_model_of_the_project(tmp_path: Path, task: str) -> None:
    root = _copy(tmp_path)
    result = _new(root, "demo", "--task", task)
    assert result.returncode == 0, result.stderr
    # The stacks validate against the copy (its model folder checks out: contract, interface files, gates).
    for stack in ("local", "dev"):
        checked = subprocess.run(
            [sys.executable, "-m", "loopform.cli", "validate", "--stack", stack],
            capture_output=True,
            text=True,
            cwd=root,
        )
        assert checked.returncode == 0 and "(3 models)" in checked.stdout, checked.stderr
    # The scaffold's code trains and is judged by the task's metrics, in a process of the copy's own.
    script = (
        "from loopform.evaluation import evaluate, time_split\n"
        "from models.demo import data, train\n"
        "from models.demo.contract import CONTRACT\n"
        "older, holdout = time_split(data.generate(6000, 1), CONTRACT.timestamp)\n"
        "m = evaluate(train.train(older, seed=1), holdout, CONTRACT, bootstrap_samples=100)\n"
        "print(m['task'], m.get('auc') or m.get('r2'))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    reported, score = run.stdout.split()
    assert reported == task and float(score) > 0.8


def test_templates_render_with_every_value_they_name() -> None:
    for task in ("classification", "regression"):
        given = values("demo", task)
        for template in TEMPLATES.glob("*.tmpl"):
            Template(template.read_text()).substitute(given)  # a missing value raises KeyError
    assert NAME.fullmatch("demo2") and not NAME.fullmatch("2demo") and not NAME.fullmatch("de-mo")
