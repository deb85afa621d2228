"""The delivery model's data contract: one food-delivery order, its features and the label `delivery_minutes`.

The order's own fields (distance, items, hour, vehicle, weather) arrive with the
order; the restaurant's aggregates (orders_last_1h, avg_delivery_30d, restaurant_age_days)
are the restaurant as of the order, computed upstream from its earlier orders and served by
restaurant id from the feature store.
"""

from loopform.contract import Contract, Feature

VEHICLES = ("bicycle", "scooter", "car")
WEATHER = ("clear", "cloudy", "rain", "snow")

CONTRACT = Contract(
    model="delivery",
    task="regression",
    description="Food-delivery time prediction: minutes from order to the customer's door.",
    id="order_id",
    entity="restaurant_id",
    entity_description="A restaurant on the platform; every stored feature is keyed by it.",
    timestamp="event_timestamp",
    label="delivery_minutes",
    label_description="Minutes from the order to its delivery.",
    label_range=(1.0, 240.0),
    feature_service="delivery_v1",
    entity_view="restaurant_stats",
    features=(
        Feature("distance_km", "numeric", "float64", 0.0, 100.0, None, "Road distance from restaurant to customer."),
        Feature("items", "numeric", "int64", 1.0, 50.0, None, "Items in the order."),
        Feature("hour_of_day", "numeric", "int64", 0.0, 23.0, None, "Local hour of the order (0-23)."),
        Feature(
            "orders_last_1h",
            "numeric",
            "int64",
            0.0,
            500.0,
            None,
            "The restaurant's orders in the hour before this one (not counting it): the kitchen's load.",
            "entity",
        ),
        Feature(
            "avg_delivery_30d",
            "numeric",
            "float64",
            0.0,
            240.0,
            None,
            "The restaurant's mean delivery minutes over the 30 days before this order (0 without any).",
            "entity",
        ),
        Feature(
            "restaurant_age_days",
            "numeric",
            "int64",
            0.0,
            20_000.0,
            None,
            "Days since the restaurant joined the platform.",
            "entity",
        ),
        Feature("vehicle", "categorical", "string", None, None, VEHICLES, "The courier's vehicle."),
        Feature("weather", "categorical", "string", None, None, WEATHER, "Weather on the way at the order's time."),
    ),
)
