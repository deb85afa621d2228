"""Feast definitions of the fraud model's features (entity, source, feature view, feature service).

Design: features come at two levels (`loopform.data.Feature.scope`), and only the card level
lives in Feast.

- The transaction's own fields (amount, hour, distance, merchant category, channel,
  is_foreign) arrive with the transaction: in the request at serving, in the labelled event
  (the entity frame) at training. They are never read from the store, so a card's previous
  transaction cannot stand in for the current one.
- The card as of the transaction (txn_count_24h, avg_amount_30d, card_age_days) is the
  feature view `card_aggregates`, keyed by card (`card_id`). Its source is the transaction
  table: each row carries the card's aggregates computed upstream from the card's
  transactions strictly before that row's event time, stamped with that event time.

Training asks Feast for a point-in-time join: each labelled event (card_id,
event_timestamp, plus its own fields and label) gets the card's aggregates as of that
instant, i.e. the row of the event itself, computed from the past only, never a later row.
Serving reads the online store by card_id through the same feature service `fraud_v1`: the
aggregates of the card's latest row there. When the feature pipeline writes the arriving
transaction's aggregates before it is scored (`FeatureRepo.write_online`), that is exactly
the row training joins to it; a batch-materialised store serves the state as of its last
materialisation.

The source path comes from LOOPFORM_FEAST_DATA (relative paths resolve against the Feast
repo); on Kubernetes the FeatureStore component sets LOOPFORM_FEAST_OFFLINE_URI, the offline
store's folder, and the table is `transactions.parquet` in it.
"""

from __future__ import annotations

import os
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Float64, Int64, String

from loopform import data

_TYPES = {"float64": Float64, "int64": Int64, "string": String}

card = Entity(
    name="card",
    join_keys=[data.ENTITY],
    value_type=ValueType.INT64,
    description="A payment card; every feature is keyed by it.",
)


def _source_path() -> str:
    if "LOOPFORM_FEAST_DATA" in os.environ:
        return os.environ["LOOPFORM_FEAST_DATA"]
    folder = os.environ.get("LOOPFORM_FEAST_OFFLINE_URI")
    if not folder:
        return "data/transactions.parquet"
    # Feast's file source takes s3:// and gs:// URIs, but a local folder as a plain path.
    return f"{folder.removeprefix('file://').rstrip('/')}/transactions.parquet"


transactions_source = FileSource(
    name="transactions",
    path=_source_path(),
    timestamp_field=data.TIMESTAMP,
    description="Card transactions, each with the card's aggregates from before it (Parquet).",
)

card_aggregates = FeatureView(
    name="card_aggregates",
    entities=[card],
    ttl=timedelta(days=90),
    schema=[
        Field(name=f.name, dtype=_TYPES[f.dtype], description=f.description) for f in data.FEATURES if f.scope == "card"
    ],
    source=transactions_source,
    online=True,
    description="The card as of each transaction, from its earlier transactions only (24 h count, 30-day mean, age).",
)

fraud_v1 = FeatureService(
    name="fraud_v1",
    features=[card_aggregates],
    description="The fraud model's card-level inputs; the transaction's own fields come with the request or event.",
)
