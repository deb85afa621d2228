"""A model's data contract: what one labelled event looks like, declared once in `models/<m>/contract.py`.

Every generic part of loopform reads a `Contract` and never a particular model: the Feast
definitions are derived from it (`loopform.feast_objects`), the validation, drift and OOD
gates check its columns and ranges, the BentoML request and response schemas are built from
its features and task, the payload log records its id, entity and features, and evaluation
picks the metrics of its task.

An event has an id (`id`), the entity it belongs to (`entity`, the feature store's join key),
an event time (`timestamp`), the label the model learns (`label`) and features of two scopes:

- "event": the event's own fields, in the request at serving and in the labelled event at
  training (never read from the store, so an entity's previous event cannot stand in);
- "entity": the entity as of the event, computed upstream from its earlier events only,
  served by entity id from the online store and joined point in time for training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import pandas as pd

Task = Literal["classification", "regression"]
TASKS: tuple[Task, ...] = ("classification", "regression")


@dataclass(frozen=True)
class Feature:
    """One model input: its kind, storage dtype and the allowed range or categories the gates enforce."""

    name: str
    kind: Literal["numeric", "categorical"]
    dtype: Literal["float64", "int64", "string"]
    min: float | None
    max: float | None
    categories: tuple[str, ...] | None
    description: str
    scope: Literal["event", "entity"] = "event"

    def __post_init__(self) -> None:
        if self.kind == "categorical" and (self.dtype != "string" or not self.categories):
            raise ValueError(f"feature {self.name!r}: a categorical feature is a string with a list of categories")
        if self.kind == "numeric" and (self.dtype == "string" or self.min is None or self.max is None):
            raise ValueError(f"feature {self.name!r}: a numeric feature is float64 or int64 with a min and a max")
        if self.kind == "numeric" and self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"feature {self.name!r}: min {self.min} is above max {self.max}")
        if self.scope not in ("event", "entity"):
            raise ValueError(f"feature {self.name!r}: scope is 'event' or 'entity', not {self.scope!r}")


@dataclass(frozen=True)
class Contract:
    """The columns of a model's labelled events and what each means (see the module docstring)."""

    model: str
    task: Task
    id: str
    entity: str
    entity_description: str
    """The entity id is an int64 (Feast's join key type and the online store's key)."""
    timestamp: str
    label: str
    label_description: str
    features: tuple[Feature, ...]
    feature_service: str
    """Name of the Feast feature service the model trains and serves on (`models.<m>.feature_service`)."""
    entity_view: str
    """Name of the Feast feature view of the entity-scope features."""
    label_range: tuple[float, float] | None = None
    """Regression: the range a label must lie in (validation refuses others). Classification: labels are 0/1."""
    description: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"contract {self.model!r}: task is one of {', '.join(TASKS)}, not {self.task!r}")
        names = [f.name for f in self.features]
        reserved = {self.id, self.entity, self.timestamp, self.label}
        clashes = sorted({n for n in names if names.count(n) > 1} | (set(names) & reserved))
        if clashes or len(reserved) < 4:
            raise ValueError(f"contract {self.model!r}: column names must be unique (clashes: {clashes})")
        if not any(f.scope == "entity" for f in self.features):
            raise ValueError(
                f"contract {self.model!r}: declares no entity-scope feature (the feature store serves them)"
            )
        if self.task == "regression" and (self.label_range is None or self.label_range[0] >= self.label_range[1]):
            raise ValueError(f"contract {self.model!r}: a regression label needs label_range (low, high)")

    @property
    def classification(self) -> bool:
        return self.task == "classification"

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def numeric(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features if f.kind == "numeric")

    @property
    def categorical(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features if f.kind == "categorical")

    @property
    def by_name(self) -> dict[str, Feature]:
        return {f.name: f for f in self.features}

    @property
    def kinds(self) -> dict[str, Literal["numeric", "categorical"]]:
        """Each feature's kind, as the drift and OOD gates compare it."""
        return {f.name: f.kind for f in self.features}

    @property
    def event_features(self) -> tuple[str, ...]:
        """The event's own fields: in the request at serving, in the labelled event at training."""
        return tuple(f.name for f in self.features if f.scope == "event")

    @property
    def entity_features(self) -> tuple[str, ...]:
        """The entity as of the event: read from the feature store by entity id."""
        return tuple(f.name for f in self.features if f.scope == "entity")

    @property
    def keys(self) -> tuple[str, ...]:
        """Columns every stored row needs: the id deduplicates, entity and time join features, the label trains."""
        return (self.id, self.entity, self.timestamp, self.label)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column of a labelled event, in order."""
        return (self.id, self.entity, self.timestamp, *self.feature_names, self.label)


def fingerprint(df: pd.DataFrame) -> str:
    """sha256 of the content: column names, dtypes and values in row order (stable across runs/processes)."""
    import pandas as pd  # not at import: the Pulumi program and the CLI read contracts and never fingerprint

    digest = hashlib.sha256()
    for name in sorted(df.columns, key=str):
        column = df[name]
        digest.update(f"{name}\x00{column.dtype}\x00{len(column)}\x00".encode())
        hashed = pd.util.hash_pandas_object(column, index=False, categorize=False).to_numpy()
        digest.update(hashed.tobytes())
    return digest.hexdigest()
