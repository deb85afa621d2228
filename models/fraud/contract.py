"""The fraud model's data contract: one card transaction, its features and the label `is_fraud`.

Transaction fields (amount, hour, distance, merchant, channel, is_foreign) arrive with the
transaction; the card's aggregates (txn_count_24h, avg_amount_30d, card_age_days) are the
card as of the transaction, computed upstream from its earlier transactions and served by
card id from the feature store.
"""

from loopform.contract import Contract, Feature

MERCHANT_CATEGORIES = (
    "grocery",
    "restaurant",
    "fuel",
    "pharmacy",
    "utilities",
    "entertainment",
    "travel",
    "online_retail",
    "electronics",
    "jewelry",
)
CHANNELS = ("chip", "contactless", "swipe", "online", "manual_entry")

CONTRACT = Contract(
    model="fraud",
    task="classification",
    description="Card-transaction fraud scoring.",
    id="transaction_id",
    entity="card_id",
    entity_description="A payment card; every stored feature is keyed by it.",
    timestamp="event_timestamp",
    label="is_fraud",
    label_description="1 when the transaction was reported as fraud.",
    feature_service="fraud_v1",
    entity_view="card_aggregates",
    features=(
        Feature("amount", "numeric", "float64", 0.0, 50_000.0, None, "Transaction amount in EUR."),
        Feature("hour_of_day", "numeric", "int64", 0.0, 23.0, None, "Local hour of the transaction (0-23)."),
        Feature("distance_from_home_km", "numeric", "float64", 0.0, 20_000.0, None, "Distance from the card's home."),
        Feature(
            "txn_count_24h",
            "numeric",
            "int64",
            0.0,
            500.0,
            None,
            "The card's transactions in the 24 h before this one (not counting it).",
            "entity",
        ),
        Feature(
            "avg_amount_30d",
            "numeric",
            "float64",
            0.0,
            50_000.0,
            None,
            "The card's mean amount over the 30 days before this transaction (0 without any).",
            "entity",
        ),
        Feature("card_age_days", "numeric", "int64", 0.0, 20_000.0, None, "Days since the card was issued.", "entity"),
        Feature("is_foreign", "numeric", "int64", 0.0, 1.0, None, "1 when the merchant is abroad."),
        Feature("merchant_category", "categorical", "string", None, None, MERCHANT_CATEGORIES, "Merchant category."),
        Feature("channel", "categorical", "string", None, None, CHANNELS, "How the card was presented."),
    ),
)
