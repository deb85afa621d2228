"""Training of the delivery model (the `train` of its interface; evaluation is `loopform.evaluation`'s).

`loopform.tabular.train_regressor` fits the MLP on the standardised delivery minutes with mean
squared error (the loss of the RMSE it is judged on) and early stopping on a random validation split.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from loopform.tabular import train_regressor
from models.delivery.contract import CONTRACT
from models.delivery.model import DeliveryModel


def train(df: pd.DataFrame, seed: int, **settings: Any) -> DeliveryModel:
    """Fit a DeliveryModel on `df` (features + label); `settings` are `train_regressor`'s and `loopform.tabular.fit`'s."""
    return train_regressor(DeliveryModel, df, CONTRACT, seed, **settings)
