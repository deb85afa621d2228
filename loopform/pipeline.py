"""The training pipeline, declared once.

validate-data -> get-features -> train -> evaluate -> register -> promote-to-staging.

The declaration is light (no heavy imports): the Orchestrator component renders it to an
Argo WorkflowTemplate, the local runner executes the same steps in-process, and each step
is the container entrypoint `loopform step NAME`. Steps pass state through one run
directory (an Argo artifact on Kubernetes, a folder locally).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

StepName = Literal["validate-data", "get-features", "train", "evaluate", "register", "promote-to-staging"]


@dataclass(frozen=True)
class Step:
    """One pipeline step: what it runs, what it waits for, where it runs."""

    name: StepName
    function: str  # "module:function" taking a StepContext, imported only when the step runs
    needs: tuple[StepName, ...]
    description: str
    compute: Literal["cpu", "training"] = "cpu"  # "training" runs with the model's training resources and GPUs

    def load(self) -> Callable[..., object]:
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(module), attr)


PIPELINE: tuple[Step, ...] = (
    Step(
        "validate-data", "loopform.steps:validate_data", (), "Schema, range, missing, drift and OOD gates on new data."
    ),
    Step(
        "get-features",
        "loopform.steps:get_features",
        ("validate-data",),
        "Point-in-time-correct training set from Feast.",
    ),
    Step("train", "loopform.steps:train", ("get-features",), "Train the torch model with early stopping.", "training"),
    Step("evaluate", "loopform.steps:evaluate", ("train",), "Holdout metrics and comparison with the champion."),
    Step("register", "loopform.steps:register", ("evaluate",), "MLflow model version with its evidence as tags."),
    Step(
        "promote-to-staging",
        "loopform.steps:promote_to_staging",
        ("register",),
        "Gate the evidence, set the staging alias.",
    ),
)

STEP_NAMES: tuple[StepName, ...] = tuple(step.name for step in PIPELINE)


def step(name: str) -> Step:
    """The declared step called `name`, or a ValueError listing the real ones."""
    for candidate in PIPELINE:
        if candidate.name == name:
            return candidate
    raise ValueError(f"no pipeline step {name!r}; steps are: {', '.join(STEP_NAMES)}")
