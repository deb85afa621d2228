"""A model's own code in `models/<m>/`, found through the stack's `models.<m>.path` and imported by path.

The interface a model folder supplies (README "Add your own model"; `loopform new model` writes one):

- `contract.py`: `CONTRACT`, a `loopform.contract.Contract` (entity, time, label, task, features);
- `model.py`: the model class, a torch module with `preprocessing()`, `example_input()` and
  `from_exported(preprocessing, network)` for the pickle-free format, and `predict_proba(frame)`
  (classification, with `threshold`) or `predict(frame)` (regression);
- `train.py`: `train(frame, seed, **settings) -> model` on a frame of labelled events with the contract's
  columns; the train step passes `device` ("cuda" where the stack requests GPUs, else "cpu");
- `data.py`: `generate(rows, seed, *, start, days, covariate_drift, label_shift) -> frame`, sample
  labelled events for the local loop and tests (drift and label shift switch on the shifts the
  monitor must catch).

Generic modules never import a model package: they receive a `Contract` or a `ModelCode`, and this
module imports `models.<m>.<file>` with the repository root on `sys.path`.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from loopform.contract import Contract

if TYPE_CHECKING:
    import pandas as pd

#: The files of a model folder and what each must define.
INTERFACE: dict[str, str] = {
    "contract.py": "CONTRACT",
    "model.py": "the model class",
    "train.py": "train",
    "data.py": "generate",
}


class ModelCodeError(ValueError):
    """A model folder that does not supply the interface; the message names the file and what is missing."""


@dataclass(frozen=True)
class ModelCode:
    """The code of model `name` at `root / path`."""

    name: str
    root: Path
    path: str

    @property
    def folder(self) -> Path:
        return self.root / self.path

    @property
    def package(self) -> str:
        return self.path.strip("/").replace("/", ".")

    def module(self, name: str) -> ModuleType:
        """`<path>/<name>.py` as a module of the model's package."""
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))
        return importlib.import_module(f"{self.package}.{name}")

    @property
    def contract(self) -> Contract:
        if not (self.folder / "contract.py").is_file():
            raise ModelCodeError(
                f"models.{self.name}.path: {self.folder} has no contract.py (`loopform new model` writes a model folder)"
            )
        contract = getattr(self.module("contract"), "CONTRACT", None)
        if not isinstance(contract, Contract):
            raise ModelCodeError(f"{self.path}/contract.py: CONTRACT is not a loopform.contract.Contract")
        if contract.model != self.name:
            raise ModelCodeError(
                f"{self.path}/contract.py: CONTRACT.model is {contract.model!r}, but the stack names it {self.name!r}"
            )
        return contract

    def train(self, frame: pd.DataFrame, seed: int, **settings: Any) -> Any:
        """The model's `train.train` on labelled events, with `settings` (e.g. `device`) passed on."""
        return self.module("train").train(frame, seed=seed, **settings)

    def generate(self, rows: int, seed: int, **options: Any) -> pd.DataFrame:
        """Sample labelled events from the model's `data.generate` (start, days, covariate_drift, label_shift)."""
        return self.module("data").generate(rows, seed, **options)

    def missing(self) -> list[str]:
        """Files of the interface the folder lacks."""
        return [name for name in INTERFACE if not (self.folder / name).is_file()]


def contract_at(root: Path, path: str, name: str) -> Contract:
    """The contract of the model at `root / path`, registered as `name`."""
    return ModelCode(name, Path(root), path).contract
