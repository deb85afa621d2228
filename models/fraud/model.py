"""The fraud model: an MLP over standardised numeric and one-hot categorical features.

Preprocessing (standardisation statistics, category vocabularies, the feature order) and
the operating threshold live in this code and in the JSON `preprocessing()` returns; the
network alone is exported with torch.export (MLflow's `pt2` format). Nothing is pickled:
a stored version is the exported program (raw tensor bytes + graph JSON) plus that JSON,
and `from_exported` rebuilds the model from them with this module's code (the service and
the champion comparison then call `predict_proba`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn


class FraudModel(nn.Module):
    """MLP fraud scorer; `predict_proba(df)` does its own preprocessing from stored statistics."""

    FORMAT: ClassVar[int] = 1  # version of the preprocessing JSON

    def __init__(
        self,
        numeric: Sequence[str],
        categorical: dict[str, Sequence[str]],
        mean: np.ndarray,
        std: np.ndarray,
        hidden: Sequence[int] = (64, 32),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.numeric: list[str] = list(numeric)
        self.categorical: dict[str, list[str]] = {name: [str(c) for c in cats] for name, cats in categorical.items()}
        self.threshold: float = 0.5
        self.info: dict[str, Any] = {}  # training facts (epochs, best validation loss, seed) for the registry
        self.hidden: list[int] = [int(size) for size in hidden]
        self.dropout_p: float = float(dropout)
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, dtype=np.float32)))
        width = len(self.numeric) + sum(len(c) for c in self.categorical.values())
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    @property
    def features(self) -> list[str]:
        """Input columns the model reads, in order."""
        return [*self.numeric, *self.categorical]

    def encode(self, df: pd.DataFrame) -> np.ndarray:
        """Raw columns -> float32 matrix: numeric standardised (missing -> mean), categories one-hot (unseen -> 0)."""
        absent = [name for name in self.features if name not in df.columns]
        if absent:
            raise KeyError(f"input lacks feature column(s) {absent}; the model reads {self.features}")
        mean = self.mean.cpu().numpy()
        std = self.std.cpu().numpy()
        numeric = df[self.numeric].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        numeric = np.where(np.isnan(numeric), mean, numeric)
        parts = [((numeric - mean) / std).astype(np.float32)]
        for name, categories in self.categorical.items():
            values = df[name].astype("string").to_numpy(dtype=object)
            parts.append((values[:, None] == np.asarray(categories, dtype=object)[None, :]).astype(np.float32))
        return np.concatenate(parts, axis=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of fraud for an encoded batch."""
        return self.net(x).squeeze(-1)

    @torch.no_grad()
    def predict_proba(self, df: pd.DataFrame) -> np.ndarray:
        """Fraud probability per row of a raw feature DataFrame."""
        was_training = self.training
        self.eval()
        device = self.mean.device
        x = torch.from_numpy(self.encode(df)).to(device)
        scores = torch.sigmoid(self(x)).cpu().numpy().astype(np.float64)
        self.train(was_training)
        return scores

    def predict(self, df: pd.DataFrame) -> np.ndarray:
        """1 where the score reaches the operating threshold."""
        return (self.predict_proba(df) >= self.threshold).astype(np.int64)

    @property
    def width(self) -> int:
        """Columns of the encoded matrix the network reads."""
        return len(self.numeric) + sum(len(c) for c in self.categorical.values())

    def preprocessing(self) -> dict[str, Any]:
        """Everything but the network's weights, as plain JSON data (logged next to the exported network)."""
        return {
            "format": self.FORMAT,
            "class": f"{type(self).__module__}:{type(self).__qualname__}",
            "numeric": list(self.numeric),
            # pairs, not a mapping: the order of the one-hot blocks is the network's input order
            "categorical": [[name, list(cats)] for name, cats in self.categorical.items()],
            "mean": [float(v) for v in self.mean.cpu().numpy()],
            "std": [float(v) for v in self.std.cpu().numpy()],
            "hidden": list(self.hidden),
            "dropout": self.dropout_p,
            "threshold": float(self.threshold),
            "info": self.info,
        }

    def example_input(self, rows: int = 2) -> np.ndarray:
        """An encoded batch (the exported network's input; more than one row keeps the batch size dynamic)."""
        return np.zeros((max(rows, 2), self.width), dtype=np.float32)

    @classmethod
    def from_exported(cls, preprocessing: dict[str, Any], network: nn.Module) -> FraudModel:
        """Rebuild the model from its preprocessing JSON and the exported network (its `net.*` weights)."""
        if preprocessing.get("format") != cls.FORMAT:
            raise ValueError(f"preprocessing format {preprocessing.get('format')!r} is not {cls.FORMAT}")
        model = cls(
            preprocessing["numeric"],
            {name: cats for name, cats in preprocessing["categorical"]},
            np.asarray(preprocessing["mean"], dtype=np.float32),
            np.asarray(preprocessing["std"], dtype=np.float32),
            hidden=preprocessing["hidden"],
            dropout=preprocessing["dropout"],
        )
        weights = {
            key.removeprefix("net."): value.detach().clone()
            for key, value in network.state_dict().items()
            if key.startswith("net.")
        }
        model.net.load_state_dict(weights, strict=True)  # a missing or extra layer fails here
        model.threshold = float(preprocessing["threshold"])
        model.info = dict(preprocessing.get("info") or {})
        return model.eval()
