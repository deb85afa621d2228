"""Request and response models of a model's service, built from its `Contract`.

Types are strict (a string is not a number), categories must be known and numeric values finite and inside
the contract's range, and unknown fields are errors, so malformed input is a 400 before it reaches the model
and a misspelt field is never silently ignored. Three requests:

- `request`: the caller's id and every feature (the raw path, `/predict`);
- `batch`: `{"events": [request, ...]}` (`/predict_batch`, one forward pass);
- `by_entity`: the entity id, the caller's id and the event's own fields, all required (`/predict_<entity>`);
  the entity-scope features come from the online store and are refused in the request.

The response follows the task: a class, its probability and the operating threshold for a classifier, a value
in the label's unit for a regressor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from loopform.contract import Contract, Feature

#: The batch body's field: `{"events": [...]}`.
BATCH_FIELD = "events"
MAX_BATCH_ROWS = 10_000
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Schemas:
    """The pydantic models of one model's APIs."""

    request: type[BaseModel]
    batch: type[BaseModel]
    by_entity: type[BaseModel]
    response: type[BaseModel]


def entity_api(contract: Contract) -> str:
    """Name (and route) of the by-entity API: `predict_card` for entity `card_id`."""
    return f"predict_{contract.entity.removesuffix('_id')}"


def schemas(contract: Contract, max_batch_rows: int = MAX_BATCH_ROWS) -> Schemas:
    """The request, batch, by-entity and response models of `contract`'s service."""
    prefix = class_prefix(contract.model)
    config = ConfigDict(extra="forbid", frozen=True)
    caller_id = (str | None, Field(None, max_length=200, description="Caller's id, kept in the payload log."))
    request = create_model(  # type: ignore[call-overload]
        f"{prefix}Request",
        __config__=config,
        __doc__=f"Every feature of one {contract.model} event.",
        **{contract.id: caller_id},
        **{f.name: _field(f) for f in contract.features},
    )
    entity_id = Annotated[int, Field(strict=True, ge=0, le=_INT64_MAX, description=contract.entity_description)]
    by_entity = create_model(  # type: ignore[call-overload]
        f"{prefix}EntityRequest",
        __config__=config,
        __doc__=(
            f"A {contract.entity} and the event's own fields; "
            f"{', '.join(contract.entity_features)} come from the online store."
        ),
        **{contract.entity: (entity_id, ...), contract.id: caller_id},
        **{f.name: _field(f) for f in contract.features if f.scope == "event"},
    )
    batch = create_model(  # type: ignore[call-overload]
        f"{prefix}Batch",
        __config__=config,
        __doc__=f"Many {contract.model} events scored in one forward pass.",
        **{BATCH_FIELD: (list[request], Field(min_length=1, max_length=max_batch_rows))},  # type: ignore[valid-type]
    )
    return Schemas(request=request, batch=batch, by_entity=by_entity, response=_response(contract, prefix))


def _field(feature: Feature) -> tuple[Any, Any]:
    """(annotation, default) of a required feature field: strict type, the contract's range or categories."""
    if feature.kind == "categorical":
        return Annotated[Literal[tuple(feature.categories or ())], Field(description=feature.description)], ...  # type: ignore[valid-type]
    base: type = int if feature.dtype == "int64" else float
    field = Field(
        strict=True,
        ge=feature.min,
        le=feature.max,
        allow_inf_nan=False if base is float else None,
        description=feature.description,
    )
    return Annotated[base, field], ...


def _response(contract: Contract, prefix: str) -> type[BaseModel]:
    """The answer to one event: request id, the task's prediction fields, model and version."""
    if contract.classification:
        answer: dict[str, Any] = {
            "prediction": (
                int,
                Field(description=f"1 when the score reaches the threshold: {contract.label_description}"),
            ),
            "score": (float, Field(description=f"Probability that {contract.label} is 1.")),
            "threshold": (float, Field(description="Operating threshold of the released model.")),
        }
    else:
        answer = {"prediction": (float, Field(description=f"Predicted {contract.label}: {contract.label_description}"))}
    return create_model(  # type: ignore[call-overload]
        f"{prefix}Prediction",
        __doc__=f"The answer of model {contract.model!r} to one event.",
        request_id=(str, Field(description="Id of this answer; the payload log row carries the same id.")),
        **answer,
        model=(str, Field(description="Registered model name.")),
        version=(int, Field(description="Registered model version that answered.")),
    )


def class_prefix(name: str) -> str:
    """`fraud` -> `Fraud`, `delivery-eta` -> `DeliveryEta`: a prefix for schema names in the OpenAPI document."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9A-Za-z]+", name) if part) or "Model"
