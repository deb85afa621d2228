"""`loopform new model NAME --task classification|regression`: a model folder, its bento and its stack entries.

The scaffold is a working example, not a stub: a contract with event- and entity-scope features,
a sample-data generator with drift, a `loopform.tabular` MLP and its training, and a BentoML
service built from the contract. It renders, trains on its sample data, passes its gates and
serves as written; the user then replaces the contract, generator and model with theirs. The
model's entries go into the local and dev stack files (comments kept), shown as a diff.
"""

from __future__ import annotations

import difflib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from loopform.contract import TASKS
from loopform.spec import CONFIG_KEY, load_stack, stack_file

TEMPLATES = Path(__file__).parent / "templates" / "model"
NAME = re.compile(r"^[a-z][a-z0-9]{0,39}$")
#: The scaffold's regressor predicts with noise of standard deviation 3; its gate leaves room above that.
REGRESSION_MAX_RMSE = 5.0
STACKS = ("local", "dev")

_MODEL_FILES = ("__init__.py", "contract.py", "data.py", "model.py", "train.py")
_BENTO_FILES = ("service.py", "bentofile.yaml", "README.md")

_TASK_VALUES: dict[str, dict[str, str]] = {
    "classification": {
        "label": "label",
        "label_description": "1 when the event is positive (what the classifier predicts).",
        "label_range": "",
        "label_shift_doc": "adds to every event's probability of a positive label",
        "label_code": (
            "    probability = 1.0 / (1.0 + np.exp(-(score - 3.0)))\n"
            "    label = (rng.random(n) < np.clip(probability + label_shift, 0.0, 1.0)).astype(np.int64)"
        ),
        "base": "TabularClassifier",
        "trainer": "train_classifier",
        "kind": "classifier",
        "output": "the logit of a positive label (`predict_proba`, `threshold`)",
        "predict_doc": "`predict_proba(frame)` with an operating `threshold` for a classifier",
    },
    "regression": {
        "label": "target",
        "label_description": "The number the regressor predicts.",
        "label_range": "\n    label_range=(-1000.0, 1000.0),",
        "label_shift_doc": "adds label_shift x 50 to every label",
        "label_code": (
            "    noise = rng.normal(0.0, 3.0, n)\n"
            "    label = np.round(np.clip(50.0 + 5.0 * score + noise + 50.0 * label_shift, -1000.0, 1000.0), 3)"
        ),
        "base": "TabularRegressor",
        "trainer": "train_regressor",
        "kind": "regressor",
        "output": "the standardised label (`predict` scales it back)",
        "predict_doc": "`predict(frame)` for a regressor",
    },
}


class ScaffoldError(ValueError):
    """The name or task cannot be scaffolded here; the message says why."""


@dataclass
class Scaffold:
    """What `new_model` wrote: files, and each stack file's diff."""

    files: list[Path] = field(default_factory=list)
    diffs: dict[str, str] = field(default_factory=dict)


def values(name: str, task: str) -> dict[str, str]:
    """The template values of model `name` with task `task`."""
    entity = f"{name}_entity_id"
    return {
        "model": name,
        "task": task,
        "entity": entity,
        "entity_api": f"predict_{entity.removesuffix('_id')}",
        "model_class": f"{name.capitalize()}Model",
        "service_class": f"{name.capitalize()}Service",
        **_TASK_VALUES[task],
    }


def stack_entry(name: str, task: str, stack: str) -> dict[str, Any]:
    """The model's entry under `models` of a stack file."""
    entry: dict[str, Any] = {"path": f"models/{name}"}
    if stack != "local":
        entry["serving"] = {"min_replicas": 1, "max_replicas": 2}
    if task == "regression":
        entry["gates"] = {"max_rmse": REGRESSION_MAX_RMSE}
    return entry


def new_model(root: Path, name: str, task: str) -> Scaffold:
    """Write models/<name>/, bentos/<name>/ and the model's local and dev stack entries (see the module docstring)."""
    if not NAME.fullmatch(name):
        raise ScaffoldError(
            f"model name {name!r}: use lowercase letters and digits, starting with a letter (it is a Python package, "
            "a Kubernetes name and an MLflow model name)"
        )
    if task not in TASKS:
        raise ScaffoldError(f"task {task!r}: one of {', '.join(TASKS)}")
    for folder in (root / "models" / name, root / "bentos" / name):
        if folder.exists():
            raise ScaffoldError(f"{folder} exists: pick another name or remove it")
    texts = {stack: stack_file(stack, root).read_text() for stack in STACKS}
    for stack, text in texts.items():
        if _has_model(text, name):
            raise ScaffoldError(f"stacks/Pulumi.{stack}.yaml already declares model {name!r}")
    scaffold = Scaffold(files=write_model_files(root, name, task))
    for stack, text in texts.items():
        path = stack_file(stack, root)
        updated = with_model(text, name, stack_entry(name, task, stack))
        path.write_text(updated)
        scaffold.diffs[stack] = "".join(
            difflib.unified_diff(
                text.splitlines(keepends=True),
                updated.splitlines(keepends=True),
                f"a/stacks/{path.name}",
                f"b/stacks/{path.name}",
            )
        )
        load_stack(path, root)  # the stack with the new model is a valid spec, and the model folder checks out
    return scaffold


def write_model_files(root: Path, name: str, task: str) -> list[Path]:
    """Write models/<name>/ and bentos/<name>/ from the templates (no stack entry); returns the files written.
    `new_model` checks the name first; `bench/iac.py` writes hundreds of models with it."""
    given = values(name, task)
    files = []
    for target, names in ((root / "models" / name, _MODEL_FILES), (root / "bentos" / name, _BENTO_FILES)):
        target.mkdir(parents=True)
        for file in names:
            path = target / file
            path.write_text(Template((TEMPLATES / f"{file}.tmpl").read_text()).substitute(given))
            files.append(path)
    return files


def _has_model(text: str, name: str) -> bool:
    import yaml

    models = (yaml.safe_load(text)["config"][CONFIG_KEY].get("models")) or {}
    return name in models


def with_model(text: str, name: str, entry: dict[str, Any]) -> str:
    """The stack file's text with `models.<name>` added; comments and layout of the rest kept."""
    from loopform.promotion import _yaml

    rt = _yaml()
    document = rt.load(text)
    platform = document["config"][CONFIG_KEY]
    if platform.get("models") is None:
        platform["models"] = {}
    # First under `models`: a comment after the last model belongs to the key that follows it (ruamel keeps it
    # with the last model), so appending would slip the new model under that comment.
    platform["models"].insert(0, name, entry)
    buffer = io.StringIO()
    rt.dump(document, buffer)
    return buffer.getvalue()
