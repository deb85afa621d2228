"""`loopform new model`: what it refuses, and that what it writes is a valid model of the project.

The end-to-end proof (the scaffold rendered, trained, gated, promoted and served) is in test_local_loop.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from string import Template

import pytest

from loopform.scaffold import NAME, TEMPLATES, values
from tests.helpers_project import cli, copy_project


def _new(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(root, "new", "model", *args)


def test_refusals_name_the_problem_and_write_nothing(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
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
    root = copy_project(tmp_path)
    result = _new(root, "demo", "--task", task)
    assert result.returncode == 0, result.stderr
    # The stacks validate against the copy (its model folder checks out: contract, interface files, gates).
    for stack in ("local", "dev"):
        checked = cli(root, "validate", "--stack", stack)
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
