"""Feast local feature repository: definitions, point-in-time retrieval, online reads and writes.

The store holds the card-level features only; a transaction's own fields travel with the
event (training) or the request (serving). tests/test_skew.py compares what is served with
what is trained on, end to end.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from loopform.features import AS_OF, FeatureRepo
from models.fraud import data
from models.fraud.contract import CONTRACT

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
    repo = FeatureRepo(tmp_path_factory.mktemp("feast"), CONTRACT)
    repo.write(source)
    repo.apply()
    repo.materialize(cutoff.to_pydatetime())
    return repo


def as_of(source: pd.DataFrame, moment: pd.Timestamp) -> pd.DataFrame:
    """Independent oracle: each card's latest source row at or before `moment`, indexed by card."""
    seen = source[source[data.TIMESTAMP] <= moment]
    return seen.sort_values(data.TIMESTAMP).groupby(data.ENTITY).tail(1).set_index(data.ENTITY)


def events(frame: pd.DataFrame) -> pd.DataFrame:
    """The entity frame of training: labelled events with their own transaction fields."""
    return frame[[data.ID, data.ENTITY, data.TIMESTAMP, data.LABEL, *data.TRANSACTION_FEATURES]]


def test_definitions_are_applied(repo):
    assert repo.apply() == ["card_aggregates", "fraud_card", "fraud_v1"]
    service = repo.feature_service
    assert service.name == "fraud_v1"
    [projection] = service.feature_view_projections
    assert projection.name == "card_aggregates"
    # Only the card as of the transaction lives in the store, never the transaction's own fields.
    assert [f.name for f in projection.features] == list(data.CARD_FEATURES)
    assert repo.stored_features() == list(data.CARD_FEATURES)
    assert (repo.workdir / "feature_store.yaml").read_text().count("entity_key_serialization_version: 3") == 1
    assert data.LABEL not in pd.read_parquet(repo.data_path).columns


def test_training_frame_is_point_in_time_correct(repo, source):
    frame = repo.training_frame(events(source))
    assert len(frame) == len(source)
    joined = frame.merge(source, on=data.ID, suffixes=("", "_source"))
    for name in (*data.FEATURE_NAMES, data.LABEL):
        assert joined[name].tolist() == joined[f"{name}_source"].tolist(), name

    # Between two transactions of a card, the card features are those of the earlier one, never the later.
    ordered = source.sort_values([data.ENTITY, data.TIMESTAMP])
    nxt = ordered.groupby(data.ENTITY)[data.TIMESTAMP].shift(-1)
    pairs = ordered[nxt.notna()].assign(next_ts=nxt[nxt.notna()]).head(200)
    midway = pairs[data.TIMESTAMP] + (pairs["next_ts"] - pairs[data.TIMESTAMP]) / 2
    probe = events(pairs).drop(columns=[data.LABEL]).assign(**{data.TIMESTAMP: midway.to_numpy()})
    got = repo.training_frame(probe).set_index(data.ID).loc[pairs[data.ID]]
    expected = pairs.set_index(data.ID)
    for name in data.FEATURE_NAMES:  # card features as of the earlier row; own fields passed through
        assert got[name].tolist() == expected[name].tolist(), name


def test_entity_frame_carries_the_transaction_not_the_card(repo, source):
    with pytest.raises(ValueError, match="lacks \\['amount'"):
        repo.training_frame(events(source).drop(columns=["amount"]))
    with pytest.raises(ValueError, match="txn_count_24h"):
        repo.training_frame(source[[data.ID, data.ENTITY, data.TIMESTAMP, *data.FEATURE_NAMES]])


def test_online_store_serves_what_the_join_gives_at_the_same_instant(repo, source, cutoff):
    """Same card, same instant: the online store holds the card features historical retrieval joins then."""
    oracle = as_of(source, cutoff)
    cards = oracle.index.to_numpy()
    later = source[(source[data.TIMESTAMP] > cutoff) & source[data.ENTITY].isin(cards)]
    assert len(later) > 0, "the test needs cards with transactions after the cutoff"

    served = repo.online(cards, with_time=True).set_index(data.ENTITY).loc[cards]
    probe = oracle[list(data.TRANSACTION_FEATURES)].reset_index().assign(**{data.TIMESTAMP: cutoff})
    trained_on = repo.training_frame(probe).set_index(data.ENTITY).loc[cards]
    for name in data.CARD_FEATURES:
        assert served[name].tolist() == trained_on[name].tolist() == oracle[name].tolist(), name
    assert served[AS_OF].tolist() == oracle[data.TIMESTAMP].tolist()
    assert str(served["txn_count_24h"].dtype) == "Int64"


def test_write_online_makes_an_arriving_transaction_current(repo, source, cutoff):
    """The feature pipeline's write on arrival: the card's online row becomes that transaction's, then back."""
    arriving = source[source[data.TIMESTAMP] > cutoff].head(5)
    cards = arriving[data.ENTITY].tolist()
    try:
        repo.write_online(arriving)
        served = repo.online(cards, with_time=True)
        latest = arriving.sort_values(data.TIMESTAMP).groupby(data.ENTITY).tail(1).set_index(data.ENTITY).loc[cards]
        for name in data.CARD_FEATURES:
            assert served[name].tolist() == latest[name].tolist(), name
        assert served[AS_OF].tolist() == latest[data.TIMESTAMP].tolist()
    finally:
        repo.materialize(cutoff.to_pydatetime())  # the other tests read the store as of the cutoff
    assert repo.online(cards, with_time=True)[AS_OF].max() <= cutoff


def test_unknown_card_reads_nulls(repo, source):
    known = int(source[data.ENTITY].iloc[0])
    rows = repo.online([known, 1], with_time=True).set_index(data.ENTITY)
    assert rows.loc[1, list(data.CARD_FEATURES)].isna().all() and pd.isna(rows.loc[1, AS_OF])
    assert rows.loc[known, list(data.CARD_FEATURES)].notna().all()


def test_write_refuses_a_frame_without_features(tmp_path, source):
    repo = FeatureRepo(tmp_path / "bad", CONTRACT)
    with pytest.raises(ValueError, match="amount"):
        repo.write(source.drop(columns=["amount"]))
    with pytest.raises(FileNotFoundError, match="call write"):
        _ = repo.store
