"""The BentoML service of a model, built from its `Contract`, so a model's bento is a few lines:

    # bentos/fraud/service.py
    from loopform.serving.bento import model_service
    from models.fraud.contract import CONTRACT

    FraudService = model_service(CONTRACT)

`bentoml serve bentos.fraud.service:FraudService` and the bentofile's `service:` import the service by that
module attribute (BentoML records the import string it was imported by), so a class built here serves and
builds like one written in the bento's module. APIs (JSON; schemas in `loopform.serving.schemas`):

- POST /predict            every feature of one event, plus the caller's id (optional);
- POST /predict_batch      `{"events": [...]}`, scored in one forward pass;
- POST /predict_<entity>   the entity id and the event's own fields (e.g. `/predict_card` for `card_id`): the
                           entity-scope features come from the online store, never from the request, and the
                           event's own fields never from the store (that would score the entity's previous event).

Every API route needs a caller's bearer token (`loopform.serving.auth`, a 401 before anything is read), bodies
are limited before parsing (`loopform.serving.limits`, 413/415), and paths the service does not serve reach
BentoML's metrics as one label (`loopform.serving.paths`); health, /metrics and the OpenAPI document stay open.

Configuration comes from the environment (`loopform.serving.release`). Malformed input is a 400 from the
typed schema (BentoML answers pydantic errors itself), an unknown entity a 404, a missing feature store a
503; the server keeps serving. APIs share logic through the plain `Scorer`: one API calling another would go
over HTTP and deadlock. Annotations here are evaluated (no `from __future__ import annotations`): BentoML
derives the batch output schema from the return annotation, a type built at run time.
"""

from typing import Any

import bentoml
from bentoml.exceptions import ServiceUnavailable
from starlette.responses import JSONResponse

from loopform.contract import Contract
from loopform.serving.auth import BearerAuth
from loopform.serving.limits import BodyLimit
from loopform.serving.openapi import documented
from loopform.serving.paths import FoldUnknownPaths, known_paths
from loopform.serving.release import (
    ENV_FEAST_CONFIG,
    ENV_FEAST_REPO,
    online_store_from_env,
    payload_log_from_env,
    release_from_env,
)
from loopform.serving.schemas import class_prefix, entity_api, schemas
from loopform.serving.scorer import Scorer, UnknownEntity, torch_threads


class ModelService(bentoml.Service):  # type: ignore[misc,type-arg]
    """BentoML's service with two changes: its app folds unknown paths into one metrics label (`serving.paths`), and
    its OpenAPI document lists the errors and the token the service answers with (`serving.openapi`)."""

    __slots__ = ()

    def to_asgi(self, is_main: bool = True) -> Any:
        app = super().to_asgi(is_main)
        return FoldUnknownPaths(app, known_paths(app))

    @property
    def openapi_spec(self) -> Any:
        from bentoml._internal.service.openapi.specification import OpenAPISpecification
        from bentoml._internal.utils.cattr import bentoml_cattr

        spec = documented(super().openapi_spec.asdict(), [f"/{name}" for name in self.apis])
        return bentoml_cattr.structure(spec, OpenAPISpecification)


def model_service(contract: Contract, *, timeout: float = 30) -> Any:
    """The BentoML service (`bentoml.Service`) scoring `contract`'s model with its released version."""
    api = schemas(contract)
    request, batch, by_entity, response = api.request, api.batch, api.by_entity, api.response
    by_entity_name = entity_api(contract)
    if by_entity_name == "predict_batch":
        raise ValueError(f"entity {contract.entity!r} names its API {by_entity_name!r}, the batch API's name")

    class Service:
        def __init__(self) -> None:
            torch_threads()
            release = release_from_env()
            self.scorer = Scorer(
                release, contract, payloads=payload_log_from_env(release.name), online=online_store_from_env(contract)
            )

        @bentoml.on_shutdown
        def close_payload_log(self) -> None:
            """Graceful shutdown: write every queued payload record before the worker exits."""
            if self.scorer.payloads is not None:
                self.scorer.payloads.close()

        @bentoml.api(input_spec=request, output_spec=response)
        async def predict(self, **event: Any) -> response:  # type: ignore[valid-type]
            """Score one event given every feature, on the event loop: one row (~0.2 ms) costs less than the hand-off
            to a worker thread (bench/SERVING.md). The payload log's enqueue waits only when its 100,000-record
            queue is full. The batch and by-entity APIs, which take longer, run on a worker thread."""
            return response(**self.scorer.score_rows([event], "predict")[0])

        @bentoml.api(input_spec=batch)
        def predict_batch(self, events: list[Any]) -> list[response]:  # type: ignore[valid-type]
            """Score many events in one call (one forward pass): `{"events": [...]}`."""
            # `events` is the batch body's field (schemas.BATCH_FIELD): BentoML passes fields by name.
            rows = [e.model_dump() for e in events]
            return [response(**answer) for answer in self.scorer.score_rows(rows, "predict_batch")]

    def score_by_entity(self: Any, **event: Any) -> response:  # type: ignore[valid-type]
        if self.scorer.online is None:
            raise ServiceUnavailable(
                f"scoring by {contract.entity} needs the online feature store: "
                f"set {ENV_FEAST_REPO} or {ENV_FEAST_CONFIG}"
            )
        try:
            return response(**self.scorer.score_entity(event, by_entity_name))
        except UnknownEntity as error:  # BentoML's NotFound would answer a list: the documented body names the field
            problem = {"loc": [contract.entity], "msg": str(error), "type": "unknown_entity"}
            return JSONResponse({"error": str(error), "detail": [problem]}, status_code=404)

    score_by_entity.__name__ = score_by_entity.__qualname__ = by_entity_name
    score_by_entity.__doc__ = (
        f"Score an event of a {contract.entity}: its own fields from the request, "
        f"{', '.join(contract.entity_features)} from the online store."
    )
    setattr(Service, by_entity_name, bentoml.api(input_spec=by_entity, output_spec=response)(score_by_entity))
    Service.__name__ = Service.__qualname__ = f"{class_prefix(contract.model)}Service"
    Service.__doc__ = contract.description or f"Scores {contract.model} events with the released model."
    routes = [f"/{name}" for name in ("predict", "predict_batch", by_entity_name)]
    service = bentoml.service(
        name=contract.model,
        service_class=ModelService,
        traffic={"timeout": timeout},
        # Every answer is counted by the Prometheus metrics and kept, with its request id, in the payload log, and
        # loopform configures no trace exporter: an access-log line and an unexported span per request only cost
        # time (bench/SERVING.md). A deployment's BentoML configuration (BENTOML_CONFIG) overrides both.
        logging={"access": {"enabled": False}},
        tracing={"excluded_urls": routes},
    )(Service)
    # Added in this order, authentication runs first: an unknown caller's body is never read.
    service.add_asgi_middleware(BearerAuth, protected=routes)
    service.add_asgi_middleware(BodyLimit, json_paths=routes)
    return service
