"""The serving encoder (`TabularModel.encode_records`, no DataFrame) against the pandas encoding (`encode`).

Both models' contracts (the fraud classifier, the delivery regressor), on generated rows and on edge values:
each numeric feature's range ends, beyond them, ints past float64's exact range, NaN and infinities, missing
numbers, every category, unseen and empty categories, columns mixing ints, floats and None. The encoded
matrices must be bit-identical and the answers exactly equal; values only pandas' coercion defines (numeric
strings, numpy scalars, non-str categories, an absent key) take the pandas path, so they agree too, or fail
the same way.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from loopform.contract import Contract
from loopform.tabular import TabularModel, TabularRegressor, statistics
from models.delivery import data as delivery_data
from models.delivery.contract import CONTRACT as DELIVERY
from models.delivery.model import DeliveryModel
from models.fraud import data as fraud_data
from models.fraud.contract import CONTRACT as FRAUD
from models.fraud.model import FraudModel

# Values past float32's range overflow in both encodings alike (to inf, then NaN answers): that is the point.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

CASES = {"fraud": (FRAUD, fraud_data, FraudModel), "delivery": (DELIVERY, delivery_data, DeliveryModel)}


def untrained(contract: Contract, data: Any, model_class: type[TabularModel], seed: int = 7) -> tuple[Any, Any]:
    """(a model of `contract` with seeded random weights and statistics of generated rows, those rows)."""
    frame = data.generate(600, seed, days=5)
    declared = {f.name: tuple(f.categories or ()) for f in contract.features if f.kind == "categorical"}
    mean, std, vocab = statistics(frame, contract.numeric, contract.categorical, declared)
    torch.manual_seed(seed)
    model = model_class(contract.numeric, vocab, mean, std).eval()
    if isinstance(model, TabularRegressor):
        model.label_mean, model.label_std = 30.0, 9.0
    return model, frame


def plain_rows(contract: Contract, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as a service receives them: Python ints, floats and strs."""
    names = list(contract.feature_names)
    return [
        {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in frame[names].to_dict("records")
    ]


def edge_rows(contract: Contract, base: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """One row per edge value of each feature, then rows mixing them at random."""
    rows = []
    for feature in contract.features:
        if feature.kind == "categorical":
            values: list[Any] = [*(feature.categories or ()), "never-seen", "", " grocery", "GROCERY"]
        else:
            low = feature.min if feature.min is not None else -1e6
            high = feature.max if feature.max is not None else 1e6
            values = [low, high, low - 1, high + 1, 0, -0.0, 0.5, -3, 1e308, -1e308, math.nan, math.inf, -math.inf]
            values += [None, 2**53 + 1, -(2**53) - 1, 2**63 - 1, -(2**63), 10**15 + 0.1]
            if feature.dtype == "int64":
                values += [int(low), int(high)]
        rows += [{**base, feature.name: value} for value in values]
    rng = random.Random(seed)
    by_feature = {f: [row[f] for row in rows if row[f] != base[f]] for f in contract.feature_names}
    for _ in range(300):
        rows.append({f: rng.choice(by_feature[f]) if rng.random() < 0.4 else base[f] for f in contract.feature_names})
    return rows


@pytest.mark.parametrize("model_name", list(CASES))
def test_records_encoding_is_the_pandas_encoding(model_name: str) -> None:
    contract, data, model_class = CASES[model_name]
    model, frame = untrained(contract, data, model_class)
    rows = plain_rows(contract, frame)
    rows += edge_rows(contract, rows[0])
    expected = model.encode(pd.DataFrame.from_records(rows))
    fast = model.encode_records(rows)
    assert fast.dtype == np.float32 and fast.shape == (len(rows), model.width)
    np.testing.assert_array_equal(fast, expected)
    for one in rows[:: max(1, len(rows) // 200)]:  # one row at a time, as /predict scores
        np.testing.assert_array_equal(model.encode_records([one]), model.encode(pd.DataFrame([one])))
    assert (fast[:, model.width - 1] == 1).any()  # the last category's column is reached
    assert model.encode_records([]).shape == (0, model.width)


@pytest.mark.parametrize("model_name", list(CASES))
def test_records_answers_are_the_pandas_answers(model_name: str) -> None:
    contract, data, model_class = CASES[model_name]
    model, frame = untrained(contract, data, model_class, seed=11)
    rows = plain_rows(contract, frame)
    rows += edge_rows(contract, rows[1], seed=1)
    finite = [row for row in rows if all(_finite(v) for v in row.values())]
    table = pd.DataFrame.from_records(finite)
    if contract.classification:
        by_records = model.predict_proba_records
        expected, fast = model.predict_proba(table), by_records(finite)
        np.testing.assert_array_equal((fast >= model.threshold).astype(np.int64), model.predict(table))
    else:
        by_records = model.predict_records
        expected, fast = model.predict(table), by_records(finite)
    assert fast.dtype == np.float64 and len(np.unique(fast)) > len(finite) // 2  # answers that tell rows apart
    np.testing.assert_array_equal(fast, expected)
    by_frame = model.predict_proba if contract.classification else model.predict
    for i, row in enumerate(finite[:: max(1, len(finite) // 100)]):  # one row at a time, as /predict scores
        np.testing.assert_array_equal(by_records([row]), by_frame(pd.DataFrame([row])), err_msg=f"{i}: {row}")


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


@pytest.mark.parametrize("model_name", list(CASES))
def test_values_only_pandas_defines_take_the_pandas_path(model_name: str) -> None:
    contract, data, model_class = CASES[model_name]
    model, frame = untrained(contract, data, model_class)
    base = plain_rows(contract, frame)[0]
    number = contract.numeric[0]
    category = contract.categorical[0]
    odd = [
        {**base, number: "3.5"},  # a numeric string: pandas parses it
        {**base, number: "not a number"},  # pandas coerces it to missing (-> the mean)
        {**base, number: np.float32(2.5)},
        {**base, number: np.int64(4)},
        {**base, number: True},
        {**base, number: 2**64},  # beyond int64
        {**base, category: np.str_(base[category])},
    ]
    for row in odd:
        np.testing.assert_array_equal(model.encode_records([row]), model.encode(pd.DataFrame([row])))
    np.testing.assert_array_equal(model.encode_records(odd), model.encode(pd.DataFrame.from_records(odd)))
    partial = [base, {k: v for k, v in base.items() if k != number}]  # absent in one row: missing there
    np.testing.assert_array_equal(model.encode_records(partial), model.encode(pd.DataFrame.from_records(partial)))
    for row in ({**base, category: None}, {**base, category: 3}):  # pandas fails or converts: so does the fast path
        try:
            expected = model.encode(pd.DataFrame([row]))
        except TypeError:
            with pytest.raises(TypeError):
                model.encode_records([row])
        else:
            np.testing.assert_array_equal(model.encode_records([row]), expected)
    with pytest.raises(KeyError, match="lacks feature column"):
        model.encode_records([{k: v for k, v in base.items() if k != category}])


def test_inference_leaves_a_training_model_in_training_mode() -> None:
    model, frame = untrained(FRAUD, fraud_data, FraudModel)
    model.train()
    rows = plain_rows(FRAUD, frame.head(3))
    first = model.predict_proba_records(rows)
    assert model.training  # dropout is off for the answer, back on for the training loop
    np.testing.assert_array_equal(first, model.predict_proba_records(rows))
