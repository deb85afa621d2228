"""Feast definitions of the fraud model's features (entity, source, feature view, feature service).

Design: one feature view, `card_transactions`, keyed by card (`card_id`), whose source is
the transaction table with one row per card transaction. Each row carries the card's
profile as of that transaction (aggregates such as txn_count_24h and avg_amount_30d,
card_age_days, computed upstream at transaction time, so they never see the future) next
to the transaction's own fields (amount, hour, merchant category, channel, ...).

- Training asks Feast for a point-in-time-correct join: for each labelled transaction
  (card_id, event_timestamp) it gets the feature row of that card as of that instant,
  never a later one. Labels travel in the entity frame, not in the feature table.
- Serving reads the online store through the same feature service `fraud_v1`: by card_id
  it gets the card's latest materialised row, i.e. exactly what training would have
  seen for that card at that time. A request that carries the transaction's own fields
  may override those, and the profile still comes from the store.

Keeping every model input in one view behind one feature service is what makes the
training and serving paths read the same definitions (no train/serve skew). The source
path comes from LOOPFORM_FEAST_DATA (relative paths resolve against the Feast repo); on
Kubernetes the FeatureStore component sets LOOPFORM_FEAST_OFFLINE_URI, the offline store's
folder, and the table is `transactions.parquet` in it.
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
    description="Card transactions with the card's profile as of each transaction (Parquet).",
)

card_transactions = FeatureView(
    name="card_transactions",
    entities=[card],
    ttl=timedelta(days=90),
    schema=[Field(name=f.name, dtype=_TYPES[f.dtype], description=f.description) for f in data.FEATURES],
    source=transactions_source,
    online=True,
    description="Per-card profile and latest transaction fields, as of each transaction.",
)

fraud_v1 = FeatureService(
    name="fraud_v1",
    features=[card_transactions],
    description="Every input of the fraud model, for training and serving alike.",
)
