"""No train/serve skew on the card path, and card aggregates that never see the future.

The skew tests replay what production does, in order: the online store is materialised up to a
cutoff; each later transaction arrives, the feature pipeline writes its card aggregates (computed
from the card's earlier transactions) to the online store, and the card path scores it from the
request's own fields plus those aggregates, logging the vector it scored; later the transactions
are labelled and ingested, and training joins each one point-in-time. The vector in the payload
log must equal the transaction's training row, feature for feature.

The leakage tests recompute txn_count_24h and avg_amount_30d from the raw transaction history with
pandas' time windows (an implementation independent of the generator's) and show that aggregates
computed with the current or later transactions are caught.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from loopform.features import AS_OF, FeatureRepo
from loopform.payloads import PayloadLog, read_payloads
from loopform.serving.release import Release
from loopform.serving.scorer import Scorer
from models.fraud import data
from models.fraud.contract import CONTRACT

DAY = pd.Timedelta(days=1)
MONTH = pd.Timedelta(days=30)


# --- the raw-history oracle ------------------------------------------------------------------------------


def recompute(history: pd.DataFrame) -> pd.DataFrame:
    """txn_count_24h and avg_amount_30d of every row from its card's rows in [t - 24 h, t) and [t - 30 d, t).

    pandas' time-based rolling windows with closed="left" include the window's start and exclude the
    row's own instant, so neither the transaction itself, nor one at the same instant, nor a later
    one ever counts. Indexed like `history`.
    """
    ordered = history[[data.ENTITY, data.TIMESTAMP, "amount"]].sort_values(data.TIMESTAMP, kind="stable")
    by_card = ordered.groupby(data.ENTITY, sort=False)
    count = by_card.rolling("24h", on=data.TIMESTAMP, closed="left").count()["amount"]
    mean = by_card.rolling("30D", on=data.TIMESTAMP, closed="left").mean()["amount"]
    out = pd.DataFrame(
        {
            "txn_count_24h": count.fillna(0).astype(np.int64).to_numpy(),
            "avg_amount_30d": mean.fillna(data.AVG_AMOUNT_NO_HISTORY).to_numpy(),
        },
        index=count.index.get_level_values(-1),
    )
    return out.loc[history.index]


def leaks(frame: pd.DataFrame, history: pd.DataFrame) -> dict[str, float]:
    """Share of `frame`'s rows whose aggregates differ from a recomputation over `history` (0.0: none).

    Only rows whose window lies inside `history` are judged (the history starts somewhere): from one
    day after its first event for txn_count_24h, from 30 days after it for avg_amount_30d.
    """
    truth = recompute(history).loc[frame.index]
    first = history[data.TIMESTAMP].min()
    shares = {}
    for name, window, tolerance in (("txn_count_24h", DAY, 0), ("avg_amount_30d", MONTH, 0.005 + 1e-9)):
        judged = frame[data.TIMESTAMP] >= first + window
        assert judged.sum() >= 100, f"too few rows with a full {window} of history to judge {name}"
        wrong = (frame.loc[judged, name] - truth.loc[judged, name]).abs() > tolerance
        shares[name] = float(wrong.mean())
    return shares


@pytest.fixture(scope="module")
def long_history() -> pd.DataFrame:
    """45 days, so rows after day 30 have their whole 30-day past inside the frame."""
    return data.generate(6_000, 5, days=45, cards=150)


def test_generated_aggregates_are_point_in_time(long_history: pd.DataFrame) -> None:
    assert leaks(long_history, long_history) == {"txn_count_24h": 0.0, "avg_amount_30d": 0.0}
    assert long_history["txn_count_24h"].max() >= 3  # not a trivially empty history


def _future_variants(history: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Aggregates computed the wrong ways: with the current row, with later rows, with the card's last row."""
    ordered = history.sort_values(data.TIMESTAMP, kind="stable")
    by_card = ordered[[data.ENTITY, data.TIMESTAMP, "amount"]].groupby(data.ENTITY, sort=False)
    with_current = history.copy()
    with_current["avg_amount_30d"] = (
        by_card.rolling("30D", on=data.TIMESTAMP, closed="both").mean()["amount"].droplevel(0).loc[history.index]
    )
    with_current["txn_count_24h"] = (
        by_card.rolling("24h", on=data.TIMESTAMP, closed="both").count()["amount"].droplevel(0).loc[history.index]
    )
    # The next 24 h / 30 days instead of the previous ones (a window anchored the wrong way round):
    # the same windows over mirrored time, where the future comes first.
    mirror = pd.Timestamp("2000-01-01", tz="UTC") + (ordered[data.TIMESTAMP].max() - ordered[data.TIMESTAMP])
    flipped = (
        ordered[[data.ENTITY, "amount"]].assign(**{data.TIMESTAMP: mirror}).iloc[::-1].groupby(data.ENTITY, sort=False)
    )
    forward = history.copy()
    ahead_mean = flipped.rolling("30D", on=data.TIMESTAMP, closed="left").mean()["amount"].droplevel(0)
    forward["avg_amount_30d"] = ahead_mean.fillna(data.AVG_AMOUNT_NO_HISTORY).loc[history.index]
    ahead_count = flipped.rolling("24h", on=data.TIMESTAMP, closed="left").count()["amount"].droplevel(0)
    forward["txn_count_24h"] = ahead_count.fillna(0).loc[history.index]
    # The card's next transaction's aggregates (its past includes this transaction).
    shifted = history.copy()
    for name in data.CARD_FEATURES:
        shifted[name] = ordered.groupby(data.ENTITY)[name].shift(-1).loc[history.index].fillna(history[name])
    # The card's newest row for all its transactions (a join that ignores time, like "latest per card").
    latest = history.copy()
    newest = ordered.groupby(data.ENTITY).tail(1).set_index(data.ENTITY)
    for name in data.CARD_FEATURES:
        latest[name] = history[data.ENTITY].map(newest[name])
    return {"with the current row": with_current, "forward": forward, "next row": shifted, "latest": latest}


def test_aggregates_with_future_rows_are_caught(long_history: pd.DataFrame) -> None:
    for variant, frame in _future_variants(long_history).items():
        shares = leaks(frame, long_history)
        assert max(shares.values()) > 0.3, (variant, shares)
        assert shares["avg_amount_30d"] > 0.3, (variant, shares)


# --- served vector vs training row ------------------------------------------------------------------------


class World:
    """One Feast repo, a model, a Scorer with a payload log, and the transactions served through it."""

    def __init__(self, root: Path) -> None:
        from models.fraud.train import train

        self.frame = data.generate(5_000, 23, days=35, cards=120)
        self.cutoff = self.frame[data.TIMESTAMP].quantile(0.85)
        self.history = self.frame[self.frame[data.TIMESTAMP] <= self.cutoff]
        later = self.frame[self.frame[data.TIMESTAMP] > self.cutoff]
        # Arrivals: the first few later transactions of many cards, so cards also see each other's writes.
        self.arrivals = later.groupby(data.ENTITY).head(2).head(60)
        self.repo = FeatureRepo(root / "feast", CONTRACT)
        self.repo.write(self.history)  # only what has been ingested so far
        self.repo.apply()
        self.repo.materialize(self.cutoff.to_pydatetime())
        trained_on = self.repo.training_frame(_events(self.history))
        model = train(trained_on, seed=3, max_epochs=3)
        self.payload_uri = str(root / "payloads")
        self.log = PayloadLog(self.payload_uri, "fraud", flush_rows=10_000, flush_seconds=3_600)
        self.scorer = Scorer(
            Release(model=model, name="fraud", version=1, uri="models:/fraud/1"),
            CONTRACT,
            payloads=self.log,
            online=self.repo,
            with_metrics=False,
        )


def _events(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[[data.ID, data.ENTITY, data.TIMESTAMP, data.LABEL, *data.TRANSACTION_FEATURES]]


def _request(row: dict[str, Any]) -> dict[str, Any]:
    """A /predict_card body: the card, the caller's id and the transaction's own fields (no aggregates)."""
    body = {data.ENTITY: int(row[data.ENTITY]), "transaction_id": row[data.ID]}
    return body | {name: _plain(row[name]) for name in data.TRANSACTION_FEATURES}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    world = World(tmp_path_factory.mktemp("skew"))
    # Production order: each transaction arrives, its card aggregates are written, then it is scored.
    for row in world.arrivals.to_dict("records"):
        world.repo.write_online(pd.DataFrame([row]))
        world.scorer.score_entity(_request(row), "predict_card")
    world.log.flush()
    world.served = read_payloads(world.payload_uri, "fraud").set_index("transaction_id")
    # Later: the transactions are labelled and ingested; training joins each one point-in-time.
    world.repo.write(world.frame)
    world.trained = world.repo.training_frame(_events(world.arrivals)).set_index(data.ID)
    yield world
    world.log.close()


def test_served_vector_equals_the_training_row(world: Any) -> None:
    ids = world.arrivals[data.ID].tolist()
    assert sorted(world.served.index) == sorted(ids)
    served = world.served.loc[ids]
    trained = world.trained.loc[ids]
    for name in data.FEATURE_NAMES:
        assert served[name].tolist() == trained[name].tolist(), name
    # Same vector, same model: the score logged is the score training-time features give.
    scores = world.scorer.release.model.predict_proba(trained.reset_index())
    assert np.allclose(served["score"].to_numpy(), scores, rtol=1e-6, atol=1e-9)
    # The aggregates served are those of the transaction itself (written on its arrival).
    assert served[AS_OF].tolist() == world.arrivals.set_index(data.ID).loc[ids, data.TIMESTAMP].tolist()
    assert world.arrivals[data.ENTITY].nunique() > 20 and served["txn_count_24h"].nunique() > 1


def test_card_path_payload_holds_the_request_transaction(world: Any) -> None:
    """The transaction fields logged (and scored) are the request's, never a stored transaction's."""
    for row in world.arrivals.to_dict("records"):
        logged = world.served.loc[row[data.ID]]
        request = _request(row)
        assert {name: _plain(logged[name]) for name in data.TRANSACTION_FEATURES} == {
            name: request[name] for name in data.TRANSACTION_FEATURES
        }
        assert logged[data.ENTITY] == row[data.ENTITY] and logged["api"] == "predict_card"


def test_training_rows_are_point_in_time(world: Any) -> None:
    """What training joins (and so what was served) is recomputable from the raw history's past alone."""
    trained = world.repo.training_frame(_events(world.frame))
    trained.index = world.frame.set_index(data.ID).index.get_indexer(trained[data.ID])
    history = world.frame.reset_index(drop=True)
    assert leaks(trained, history) == {"txn_count_24h": 0.0, "avg_amount_30d": 0.0}


def test_a_stale_store_or_stored_transaction_fields_are_skew(world: Any) -> None:
    """The comparison has teeth: serving without the arrival's write, or the old stored-fields path, differs."""
    world.repo.materialize(world.cutoff.to_pydatetime())  # the store as of the cutoff, no arrival written
    firsts = world.arrivals.groupby(data.ENTITY).head(1)
    stale = world.repo.online(firsts[data.ENTITY].tolist())
    trained = world.trained.loc[firsts[data.ID]]
    differ = (stale[list(data.CARD_FEATURES)].to_numpy() != trained[list(data.CARD_FEATURES)].to_numpy()).any(axis=1)
    assert differ.mean() > 0.5
    # The old card path scored the card's previous transaction's own fields: they are not this one's.
    previous = world.history.sort_values(data.TIMESTAMP).groupby(data.ENTITY).tail(1).set_index(data.ENTITY)
    previous = previous.loc[firsts[data.ENTITY], list(data.TRANSACTION_FEATURES)].to_numpy()
    assert (previous != trained[list(data.TRANSACTION_FEATURES)].to_numpy()).any(axis=1).mean() > 0.9


def test_card_path_refuses_a_request_without_its_transaction(world: Any) -> None:
    row = world.arrivals.to_dict("records")[0]
    request = _request(row)
    del request["hour_of_day"]
    with pytest.raises(ValueError, match="hour_of_day"):
        world.scorer.score_entity(request, "predict_card")
