"""Feast local feature repository: definitions, point-in-time retrieval, and no train/serve skew."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loopform import data
from loopform.features import FeatureRepo
from models.fraud.train import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def source() -> pd.DataFrame:
    df = data.generate(3000, seed=4, cards=60)
    # One transaction per card and instant, so "the row as of time t" is unambiguous.
    return df.drop_duplicates([data.ENTITY, data.TIMESTAMP]).reset_index(drop=True)


@pytest.fixture(scope="module")
def cutoff(source) -> pd.Timestamp:
    """Materialisation time: the middle of the data, so later transactions exist but are not online."""
    return source[data.TIMESTAMP].iloc[len(source) // 2]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, source, cutoff) -> FeatureRepo:
    """One repository and FeatureStore for the module: constructing a store costs seconds."""
    repo = FeatureRepo(tmp_path_factory.mktemp("feast"), ROOT / "models" / "fraud")
    repo.write(source)
    repo.apply()
    repo.materialize(cutoff.to_pydatetime())
    return repo


def as_of(source: pd.DataFrame, moment: pd.Timestamp) -> pd.DataFrame:
    """Independent oracle: each card's latest source row at or before `moment`, indexed by card."""
    seen = source[source[data.TIMESTAMP] <= moment]
    return seen.sort_values(data.TIMESTAMP).groupby(data.ENTITY).tail(1).set_index(data.ENTITY)


def test_definitions_are_applied(repo):
    assert repo.apply() == ["card", "card_transactions", "fraud_v1"]
    service = repo.feature_service
    assert service.name == "fraud_v1"
    [projection] = service.feature_view_projections
    assert projection.name == "card_transactions"
    assert [f.name for f in projection.features] == list(data.FEATURE_NAMES)
    assert (repo.workdir / "feature_store.yaml").read_text().count("entity_key_serialization_version: 3") == 1
    assert data.LABEL not in pd.read_parquet(repo.data_path).columns


def test_training_frame_is_point_in_time_correct(repo, source):
    entity = source[[data.ID, data.ENTITY, data.TIMESTAMP, data.LABEL]]
    frame = repo.training_frame(entity)
    assert len(frame) == len(source)
    joined = frame.merge(source, on=data.ID, suffixes=("", "_source"))
    for name in (*data.FEATURE_NAMES, data.LABEL):
        assert joined[name].tolist() == joined[f"{name}_source"].tolist(), name

    # Between two transactions of a card, the features are those of the earlier one, never the later.
    ordered = source.sort_values([data.ENTITY, data.TIMESTAMP])
    nxt = ordered.groupby(data.ENTITY)[data.TIMESTAMP].shift(-1)
    pairs = ordered[nxt.notna()].assign(next_ts=nxt[nxt.notna()]).head(200)
    midway = pairs[data.TIMESTAMP] + (pairs["next_ts"] - pairs[data.TIMESTAMP]) / 2
    probe = pd.DataFrame({data.ID: pairs[data.ID].to_numpy(), data.ENTITY: pairs[data.ENTITY].to_numpy()})
    probe[data.TIMESTAMP] = midway.to_numpy()
    got = repo.training_frame(probe).set_index(data.ID).loc[pairs[data.ID]]
    expected = pairs.set_index(data.ID)
    for name in data.FEATURE_NAMES:
        assert got[name].tolist() == expected[name].tolist(), name


def test_no_train_serve_skew(repo, source, cutoff):
    """Same card, same time: the online store serves exactly what historical retrieval trains on."""
    labelled = source[source[data.TIMESTAMP] <= cutoff][[data.ID, data.ENTITY, data.TIMESTAMP, data.LABEL]]
    model = train(repo.training_frame(labelled), seed=1, max_epochs=20)

    oracle = as_of(source, cutoff)
    cards = oracle.index.to_numpy()
    later = source[(source[data.TIMESTAMP] > cutoff) & source[data.ENTITY].isin(cards)]
    assert len(later) > 0, "the test needs cards with transactions after the cutoff"

    served = repo.online(cards).set_index(data.ENTITY).loc[cards]
    entity = pd.DataFrame({data.ENTITY: cards, data.TIMESTAMP: cutoff})
    trained_on = repo.training_frame(entity).set_index(data.ENTITY).loc[cards]
    for name in data.FEATURE_NAMES:
        assert served[name].tolist() == trained_on[name].tolist() == oracle[name].tolist(), name
    served_scores = model.predict_proba(served.reset_index())
    trained_scores = model.predict_proba(trained_on.reset_index())
    assert np.array_equal(served_scores, trained_scores)
    assert len(np.unique(served_scores)) > 1


def test_unknown_card_reads_nulls(repo, source):
    known = int(source[data.ENTITY].iloc[0])
    rows = repo.online([known, 1]).set_index(data.ENTITY)
    assert rows.loc[1, list(data.FEATURE_NAMES)].isna().all()
    assert rows.loc[known, list(data.FEATURE_NAMES)].notna().all()


def test_write_refuses_a_frame_without_features(tmp_path, source):
    repo = FeatureRepo(tmp_path / "bad", ROOT / "models" / "fraud")
    with pytest.raises(ValueError, match="amount"):
        repo.write(source.drop(columns=["amount"]))
    with pytest.raises(FileNotFoundError, match="call write"):
        _ = repo.store
