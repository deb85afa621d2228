"""The fraud model: an MLP over standardised numeric and one-hot categorical features.

The object is self-contained: standardisation statistics, category vocabularies, the
feature order and the operating threshold live inside it, so the pickled model that
MLflow stores scores a raw feature DataFrame with no other code than this module
(the service and the champion comparison load it and call `predict_proba`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn


class FraudModel(nn.Module):
    """MLP fraud scorer; `predict_proba(df)` does its own preprocessing from stored statistics."""

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
