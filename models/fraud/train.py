"""Training of the fraud model (the `train` of its interface; evaluation is `loopform.evaluation`'s).

`loopform.tabular.train_classifier` fits the MLP (fixed seeds: same data + seed -> same weights)
with early stopping on a stratified validation split and picks the operating threshold on that
split (max F1).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from loopform.tabular import train_classifier
from models.fraud.contract import CONTRACT
from models.fraud.model import FraudModel


def train(df: pd.DataFrame, seed: int, **settings: Any) -> FraudModel:
    """Fit a FraudModel on `df` (features + label); `settings` are `train_classifier`'s and `loopform.tabular.fit`'s."""
    return train_classifier(FraudModel, df, CONTRACT, seed, **settings)
