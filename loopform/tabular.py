"""What every tabular torch model of loopform shares: raw-frame encoding, the pickle-free format and seeded training.

`TabularModel` is an MLP over standardised numeric and one-hot categorical columns, with its
preprocessing (feature order, statistics, vocabularies) in plain JSON (`preprocessing()`) and
only the network exported with torch.export, which `loopform.registry` stores in MLflow's `pt2`
format and rebuilds with `from_exported`. `TabularClassifier` and `TabularRegressor` add what
their task needs (an operating threshold, the label's scale) through `task_preprocessing` and
`restore_task`. A model folder's model class subclasses one of them (the registry records the
subclass, so a stored version loads with the folder's own class), and its `train.py` calls
`train_classifier` or `train_regressor`; a model with other targets or another loss calls `fit`.

Only model code imports this module, so torch is imported at the top.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from loopform.contract import Contract
from loopform.evaluation import best_f1_threshold, stratified_split

M = TypeVar("M", bound="TabularModel")
C = TypeVar("C", bound="TabularClassifier")
R = TypeVar("R", bound="TabularRegressor")


class TabularModel(nn.Module):
    """An MLP over a raw DataFrame; `outputs(frame)` does its own preprocessing from stored statistics."""

    FORMAT: ClassVar[int] = 1  # version of the preprocessing JSON

    def __init__(
        self,
        numeric: Sequence[str],
        categorical: Mapping[str, Sequence[str]],
        mean: np.ndarray,
        std: np.ndarray,
        hidden: Sequence[int] = (64, 32),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.numeric: list[str] = list(numeric)
        self.categorical: dict[str, list[str]] = {name: [str(c) for c in cats] for name, cats in categorical.items()}
        self.info: dict[str, Any] = {}  # training facts (epochs, best validation loss, seed) for the registry
        self.hidden: list[int] = [int(size) for size in hidden]
        self.dropout_p: float = float(dropout)
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, dtype=np.float32)))
        width = self.width
        layers: list[nn.Module] = []
        for size in self.hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    @property
    def features(self) -> list[str]:
        """Input columns the model reads, in order."""
        return [*self.numeric, *self.categorical]

    @property
    def width(self) -> int:
        """Columns of the encoded matrix the network reads."""
        return len(self.numeric) + sum(len(c) for c in self.categorical.values())

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

    def encode_records(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """`encode(pd.DataFrame.from_records(rows))` without a DataFrame: the serving path, where pandas costs
        more than the network.

        Rows whose every feature is a plain value (numbers as int or float, missing numbers as None, categories
        as str) are encoded with numpy alone, with the same float64 arithmetic as `encode`, so the matrix is
        bit-identical; anything else (strings for numbers, non-str categories, absent keys) goes through
        `encode` itself, so both paths always agree.
        """
        if not rows:
            return np.zeros((0, self.width), dtype=np.float32)
        try:
            numeric = np.array([[_number(row[name]) for name in self.numeric] for row in rows], dtype=np.float64)
            hot = [[self._columns[name].get(_category(row[name]), -1) for name in self.categorical] for row in rows]
        except (KeyError, TypeError):  # an absent feature or a value only pandas' coercion defines
            return self.encode(pd.DataFrame.from_records(list(rows)))
        mean = self.mean.cpu().numpy().astype(np.float64)
        std = self.std.cpu().numpy().astype(np.float64)
        numeric = np.where(np.isnan(numeric), mean, numeric)
        matrix = np.zeros((len(rows), self.width), dtype=np.float32)
        matrix[:, : len(self.numeric)] = (numeric - mean) / std
        columns = np.asarray(hot, dtype=np.int64).reshape(len(rows), len(self.categorical))
        seen = columns >= 0
        matrix[np.nonzero(seen)[0], columns[seen]] = 1.0
        return matrix

    @functools.cached_property
    def _columns(self) -> dict[str, dict[str, int]]:
        """Per categorical feature: category -> its column in the encoded matrix (an unseen one has none)."""
        start = len(self.numeric)
        columns: dict[str, dict[str, int]] = {}
        for name, categories in self.categorical.items():
            columns[name] = {category: start + i for i, category in enumerate(categories)}
            start += len(categories)
        return columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output (one number per row) for an encoded batch."""
        return self.net(x).squeeze(-1)

    def outputs(self, df: pd.DataFrame) -> torch.Tensor:
        """The network's output per row of a raw feature DataFrame, in eval mode, on the CPU."""
        return self._infer(self.encode(df))

    def outputs_records(self, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """`outputs` of rows given as mappings of raw features (`encode_records`): the serving path."""
        return self._infer(self.encode_records(rows))

    def _infer(self, encoded: np.ndarray) -> torch.Tensor:
        """The forward pass in eval mode under `torch.inference_mode` (no autograd bookkeeping), on the CPU."""
        was_training = self.training
        if was_training:
            self.eval()
        try:
            with torch.inference_mode():
                return self(torch.from_numpy(encoded).to(self.mean.device)).cpu()
        finally:
            if was_training:
                self.train()

    def task_preprocessing(self) -> dict[str, Any]:
        """What the subclass adds to the preprocessing JSON (its threshold, its label's scale)."""
        return {}

    def restore_task(self, preprocessing: Mapping[str, Any]) -> None:
        """Read back what `task_preprocessing` wrote."""

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
            "info": self.info,
            **self.task_preprocessing(),
        }

    def example_input(self, rows: int = 2) -> np.ndarray:
        """An encoded batch (the exported network's input; more than one row keeps the batch size dynamic)."""
        return np.zeros((max(rows, 2), self.width), dtype=np.float32)

    @classmethod
    def from_exported(cls: type[M], preprocessing: Mapping[str, Any], network: nn.Module) -> M:
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
        model.info = dict(preprocessing.get("info") or {})
        model.restore_task(preprocessing)
        return model.eval()


class TabularClassifier(TabularModel):
    """A binary classifier: the network's output is the logit of the positive class; `threshold` turns scores into alerts."""

    threshold: float = 0.5

    def predict_proba(self, df: pd.DataFrame) -> np.ndarray:
        """Probability of the positive class per row of a raw feature DataFrame."""
        return torch.sigmoid(self.outputs(df)).numpy().astype(np.float64)

    def predict_proba_records(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """`predict_proba` of rows given as mappings of raw features, without a DataFrame (the serving path)."""
        return torch.sigmoid(self.outputs_records(rows)).numpy().astype(np.float64)

    def predict(self, df: pd.DataFrame) -> np.ndarray:
        """1 where the score reaches the operating threshold."""
        return (self.predict_proba(df) >= self.threshold).astype(np.int64)

    def task_preprocessing(self) -> dict[str, Any]:
        return {"threshold": float(self.threshold)}

    def restore_task(self, preprocessing: Mapping[str, Any]) -> None:
        self.threshold = float(preprocessing["threshold"])


class TabularRegressor(TabularModel):
    """A regressor: the network predicts the standardised label, `predict` scales it back to the label's unit."""

    label_mean: float = 0.0
    label_std: float = 1.0

    def predict(self, df: pd.DataFrame) -> np.ndarray:
        """The predicted label per row of a raw feature DataFrame."""
        return self.outputs(df).numpy().astype(np.float64) * self.label_std + self.label_mean

    def predict_records(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """`predict` of rows given as mappings of raw features, without a DataFrame (the serving path)."""
        return self.outputs_records(rows).numpy().astype(np.float64) * self.label_std + self.label_mean

    def task_preprocessing(self) -> dict[str, Any]:
        return {"label_mean": float(self.label_mean), "label_std": float(self.label_std)}

    def restore_task(self, preprocessing: Mapping[str, Any]) -> None:
        self.label_mean = float(preprocessing["label_mean"])
        self.label_std = float(preprocessing["label_std"])


def _number(value: Any) -> float:
    """A numeric feature's value as `encode` reads it, for the values it reads the same way; TypeError for others."""
    kind = type(value)
    if kind is float:
        return value
    if kind is int and -(2**63) <= value < 2**63:  # beyond int64, pandas picks another dtype
        return float(value)
    if value is None:
        return math.nan
    raise TypeError(f"{value!r} needs pandas' numeric coercion")


def _category(value: Any) -> str:
    """A categorical feature's value as `encode` reads it when it is a str; TypeError for others (None, numbers)."""
    if type(value) is str:
        return value
    raise TypeError(f"{value!r} needs pandas' string conversion")


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present, else CPU (an explicit choice wins)."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_split(rows: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (fit, validation) with `share` of the rows validating; deterministic for a seed."""
    order = np.random.default_rng(seed).permutation(rows)
    cut = max(1, round(rows * share)) if rows > 1 else 0
    return np.sort(order[cut:]), np.sort(order[:cut])


def statistics(
    frame: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str], declared: Mapping[str, Sequence[str]]
) -> tuple[np.ndarray, np.ndarray, dict[str, list[str]]]:
    """(mean, std, vocabularies) of the rows a model is fitted on; a vocabulary is its seen and declared categories."""
    values = frame[list(numeric)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    mean = np.nan_to_num(np.nanmean(values, axis=0)) if len(values) else np.zeros(len(numeric))
    std = np.nan_to_num(np.nanstd(values, axis=0)) if len(values) else np.ones(len(numeric))
    std = np.where(std > 1e-9, std, 1.0)
    vocab = {name: sorted(set(frame[name].dropna().astype(str)) | set(declared.get(name, ()))) for name in categorical}
    return mean, std, vocab


def fit(
    model_class: type[M],
    frame: pd.DataFrame,
    target: np.ndarray,
    split: tuple[np.ndarray, np.ndarray],
    loss: nn.Module,
    *,
    seed: int,
    contract: Contract,
    numeric: Sequence[str] | None = None,
    categorical: Sequence[str] | None = None,
    hidden: Sequence[int] = (64, 32),
    dropout: float = 0.1,
    lr: float = 5e-3,
    weight_decay: float = 1e-5,
    batch_size: int = 1024,
    max_epochs: int = 100,
    patience: int = 6,
    device: str | None = None,
    cpu_threads: int = 1,
) -> M:
    """A `model_class` fitted on `frame` to `target` (float32 per row) with early stopping on `loss` over `split`.

    `split` is (fit rows, validation rows); statistics and vocabularies come from the fit rows.
    Columns default to the contract's numeric and categorical features; a categorical
    feature's vocabulary holds its declared categories even where the data lacks some.
    Same data + seed -> same weights: the initialisation and the shuffles are seeded inside
    `torch.random.fork_rng`, so the caller's random state is left alone. Adam; the weights
    of the best validation epoch are restored. The result is on the CPU whatever device
    trained it, so it exports and loads anywhere, with the training facts in `info`. On the
    CPU it trains on `cpu_threads` threads: for a network this small, thread hand-offs cost
    more than they save, above all on a shared machine.
    """
    numeric = tuple(numeric if numeric is not None else contract.numeric)
    categorical = tuple(categorical if categorical is not None else contract.categorical)
    declared = {f.name: tuple(f.categories or ()) for f in contract.features if f.kind == "categorical"}
    fit_idx, val_idx = split
    mean, std, vocab = statistics(frame.iloc[fit_idx], numeric, categorical, declared)
    y_all = np.asarray(target, dtype=np.float32)

    target_device = pick_device(device)
    devices = [target_device.index or 0] if target_device.type == "cuda" else []
    threads = torch.get_num_threads()
    if target_device.type == "cpu":
        torch.set_num_threads(max(1, min(cpu_threads, threads)))
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model = model_class(numeric, vocab, mean, std, hidden=hidden, dropout=dropout)
            x_all = torch.from_numpy(model.encode(frame))
            x_fit, y_fit = x_all[fit_idx].to(target_device), torch.from_numpy(y_all[fit_idx]).to(target_device)
            x_val, y_val = x_all[val_idx].to(target_device), torch.from_numpy(y_all[val_idx]).to(target_device)
            model.to(target_device)
            optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
            shuffle = torch.Generator().manual_seed(seed)

            best_loss, best_state, best_epoch, waited, epochs = math.inf, copy.deepcopy(model.state_dict()), 0, 0, 0
            for epoch in range(1, max_epochs + 1):
                epochs = epoch
                model.train()
                order = torch.randperm(len(x_fit), generator=shuffle).to(target_device)
                for start in range(0, len(order), batch_size):
                    batch = order[start : start + batch_size]
                    optimiser.zero_grad(set_to_none=True)
                    loss(model(x_fit[batch]), y_fit[batch]).backward()
                    optimiser.step()
                model.eval()
                with torch.no_grad():
                    val_loss = float(loss(model(x_val), y_val))
                if val_loss < best_loss - 1e-5:
                    best_loss, best_state, best_epoch, waited = val_loss, copy.deepcopy(model.state_dict()), epoch, 0
                else:
                    waited += 1
                    if waited >= patience:
                        break
            model.load_state_dict(best_state)
    finally:
        torch.set_num_threads(threads)
    model.to("cpu").eval()
    model.info = {
        "seed": seed,
        "rows": len(frame),
        "fit_rows": len(fit_idx),
        "validation_rows": len(val_idx),
        "epochs": epochs,
        "best_epoch": best_epoch,
        "best_validation_loss": best_loss,
        "device": str(target_device),
        "hidden": list(hidden),
        "dropout": dropout,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "patience": patience,
    }
    return model


def train_classifier(
    model_class: type[C],
    df: pd.DataFrame,
    contract: Contract,
    seed: int,
    *,
    validation_share: float = 0.2,
    **settings: Any,
) -> C:
    """A `model_class` fitted on `df` (features + the contract's 0/1 label) with early stopping on validation log-loss.

    The validation split is stratified by label, and the operating threshold is the one of max F1
    on it; `info` records the split's seed and share, so `loopform.evaluation.validation_rows` can
    bootstrap the threshold's interval on the same rows. `settings` are `fit`'s (the feature
    columns, hidden, dropout, lr, max_epochs, patience, device, ...).
    """
    label = contract.label
    if df[label].nunique() < 2:
        raise ValueError(f"training data needs both classes in {label!r}; got only {df[label].unique().tolist()}")
    y_all = df[label].to_numpy(dtype=np.float32)
    split = stratified_split(y_all.astype(np.int64), validation_share, seed)
    model = fit(model_class, df, y_all, split, nn.BCEWithLogitsLoss(), seed=seed, contract=contract, **settings)
    val_idx = split[1]
    model.threshold = best_f1_threshold(y_all[val_idx].astype(np.int64), model.predict_proba(df.iloc[val_idx]))
    model.info.update(
        threshold_rule="max F1 on validation", validation_share=validation_share, base_rate=float(y_all.mean())
    )
    return model


def train_regressor(
    model_class: type[R],
    df: pd.DataFrame,
    contract: Contract,
    seed: int,
    *,
    validation_share: float = 0.2,
    **settings: Any,
) -> R:
    """A `model_class` fitted on `df` (features + the contract's numeric label) with early stopping on validation MSE.

    The network learns the label standardised with the fit rows' mean and standard deviation, on
    mean squared error (the loss of the RMSE it is judged on), over a random validation split;
    `info` records the split's seed and share and the label's scale. `settings` are `fit`'s.
    """
    label = contract.label
    values = pd.to_numeric(df[label], errors="coerce").to_numpy(dtype=np.float64)
    if len(values) < 2 or not np.isfinite(values).all():
        raise ValueError(f"training data needs at least 2 rows and a finite {label!r} in every row")
    split = random_split(len(df), validation_share, seed)
    mean = float(values[split[0]].mean())
    std = float(values[split[0]].std()) or 1.0
    target = ((values - mean) / std).astype(np.float32)
    model = fit(model_class, df, target, split, nn.MSELoss(), seed=seed, contract=contract, **settings)
    model.label_mean, model.label_std = mean, std
    model.info.update(validation_share=validation_share, label_mean=mean, label_std=std)
    return model
