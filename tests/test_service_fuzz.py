"""The model services fuzzed from their own OpenAPI documents (Schemathesis), and the hostile inputs a fuzzer may not
reach by chance, on real `bentoml serve` processes of the fraud classifier and the delivery regressor.

Schemathesis (its Python API: each operation as a Hypothesis strategy; its lazy pytest loader fails on pytest 9,
no `_nodeid`) reads each service's /docs.json (BentoML's document, rewritten by `loopform.serving.openapi` to list
every error status and its body) and generates at least `EXAMPLES` bodies per API, valid and invalid ones, sent
with a caller's bearer token. Checks: no 5xx (`not_a_server_error`), every answer's status documented
(`status_code_conformance`) and its body matching the documented schema (`response_schema_conformance`).
Hypothesis runs without a deadline, database or shrinking, one request at a time, so the time is bounded by the
example count: a few minutes for both services.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings, strategies
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from loopform.serving.schemas import BATCH_FIELD, MAX_BATCH_ROWS
from tests.test_service import GOOD, OFFLINE, OWN, serve_release

EXAMPLES = 500
APIS = {
    "fraud": ("/predict", "/predict_batch", "/predict_card"),
    "delivery": ("/predict", "/predict_batch", "/predict_restaurant"),
}
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def _serve(tmp_path_factory: pytest.TempPathFactory, model: str) -> tuple[Any, str]:
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    if model == "fraud":
        from models.fraud import data
        from models.fraud.contract import CONTRACT
        from models.fraud.train import train

        frame = data.generate(1200, 5, days=10, cards=50)
        trained = train(frame, 5, max_epochs=2)
        service = "bentos.fraud.service:FraudService"
    else:
        from models.delivery import data
        from models.delivery.contract import CONTRACT
        from models.delivery.train import train

        frame = data.generate(1200, 5, days=10)
        trained = train(frame, 5, max_epochs=2)
        service = "bentos.delivery.service:DeliveryService"
    server, _, _, _, _, auth = serve_release(
        tmp_path_factory.mktemp(f"fuzz-{model}"), CONTRACT, trained, frame, service
    )
    return server, auth


@pytest.fixture(scope="module")
def fraud_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server, auth = _serve(tmp_path_factory, "fraud")
    yield server, auth
    server.stop()


@pytest.fixture(scope="module")
def delivery_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server, auth = _serve(tmp_path_factory, "delivery")
    yield server, auth
    server.stop()


def _fuzz(server: Any, auth: str, path: str) -> int:
    """Fuzz one API from the service's own document: valid and invalid bodies, every answer checked; cases sent."""
    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json")
    operation = schema[path]["POST"]
    cases = strategies.one_of(*(operation.as_strategy(mode) for mode in GenerationMode))
    sent = 0

    @FUZZ
    @given(case=cases)
    def run(case: Any) -> None:
        nonlocal sent
        sent += 1
        case.call_and_validate(headers={"Authorization": auth}, checks=CHECKS, timeout=30)

    run()
    return sent


@pytest.mark.slow
@pytest.mark.parametrize("path", APIS["fraud"])
def test_fuzz_fraud(fraud_server: Any, path: str) -> None:
    assert _fuzz(*fraud_server, path) >= EXAMPLES


@pytest.mark.slow
@pytest.mark.parametrize("path", APIS["delivery"])
def test_fuzz_delivery(delivery_server: Any, path: str) -> None:
    assert _fuzz(*delivery_server, path) >= EXAMPLES


@pytest.mark.slow
def test_the_checks_catch_an_answer_the_document_does_not_describe(fraud_server: Any) -> None:
    """The checks bite: with BentoML's own error body (`detail` a string) in the document, a 400 fails them."""
    from schemathesis.core.failures import FailureGroup

    server, auth = fraud_server
    document = httpx.get(f"{server.url}/docs.json").json()
    document["components"]["schemas"]["Error"]["properties"]["detail"] = {"type": "string"}
    case = schemathesis.openapi.from_dict(document)["/predict"]["POST"].Case(body={**GOOD, "amount": "84.5"})
    with pytest.raises(FailureGroup, match="detail"):
        case.call_and_validate(base_url=server.url, headers={"Authorization": auth}, checks=CHECKS, timeout=30)


# --- what a fuzzer meets rarely: each a 4xx naming the problem ------------------------------------------------------


def _post(server: Any, auth: str, path: str, content: bytes, content_type: str = "application/json") -> httpx.Response:
    headers = {"Authorization": auth, "Content-Type": content_type}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60.0)


def _locations(response: httpx.Response) -> list[list[Any]]:
    return [problem["loc"] for problem in response.json()["detail"]]


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"{", b"not json", b'{"amount": 84.5,}', b"\xff\xfe{}", b"{" * 5000])
def test_malformed_json_is_400(fraud_server: Any, content: bytes) -> None:
    response = _post(*fraud_server, "/predict", content)
    assert response.status_code == 400, response.text
    assert response.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.slow
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_400_naming_the_field(fraud_server: Any, literal: str) -> None:
    body = json.dumps(GOOD).replace('"amount": 84.5', f'"amount": {literal}')
    assert literal in body
    response = _post(*fraud_server, "/predict", body.encode())
    assert response.status_code == 400, response.text
    assert _locations(response) == [["amount"]]
    batch = json.dumps({BATCH_FIELD: [GOOD, GOOD]}).replace('"amount": 84.5', f'"amount": {literal}', 2)
    response = _post(*fraud_server, "/predict_batch", batch.encode())
    assert response.status_code == 400 and _locations(response) == [
        [BATCH_FIELD, 0, "amount"],
        [BATCH_FIELD, 1, "amount"],
    ]


@pytest.mark.slow
def test_a_batch_over_the_maximum_is_400_naming_the_field(fraud_server: Any) -> None:
    body = json.dumps({BATCH_FIELD: [GOOD] * (MAX_BATCH_ROWS + 1)}).encode()
    response = _post(*fraud_server, "/predict_batch", body)
    assert response.status_code == 400, response.text[:500]
    (problem,) = response.json()["detail"]
    assert problem["loc"] == [BATCH_FIELD] and problem["type"] == "too_long"
    exact = _post(*fraud_server, "/predict_batch", json.dumps({BATCH_FIELD: [GOOD] * MAX_BATCH_ROWS}).encode())
    assert exact.status_code == 200 and len(exact.json()) == MAX_BATCH_ROWS


@pytest.mark.slow
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/vnd.bentoml+pickle"]
)
def test_a_wrong_content_type_is_415_naming_it(fraud_server: Any, content_type: str) -> None:
    response = _post(*fraud_server, "/predict", json.dumps(GOOD).encode(), content_type)
    assert response.status_code == 415, response.text
    assert response.json()["field"] == "content-type" and content_type in response.json()["error"]


@pytest.mark.slow
def test_an_unknown_entity_is_404_naming_the_field(fraud_server: Any, delivery_server: Any) -> None:
    response = _post(*fraud_server, "/predict_card", json.dumps({"card_id": 987_654_321, **OWN}).encode())
    assert response.status_code == 404, response.text
    assert _locations(response) == [["card_id"]] and "card_id=987654321" in response.json()["error"]
    from models.delivery.contract import CONTRACT as DELIVERY

    event = {
        f.name: f.categories[0] if f.categories else int(f.min) if f.dtype == "int64" else float(f.min)
        for f in DELIVERY.features
        if f.scope == "event"
    }
    response = _post(*delivery_server, "/predict_restaurant", json.dumps({DELIVERY.entity: 2**62, **event}).encode())
    assert response.status_code == 404, response.text
    assert _locations(response) == [[DELIVERY.entity]]


def test_the_fuzzed_apis_are_the_services_apis() -> None:
    from loopform.serving.schemas import entity_api
    from models.delivery.contract import CONTRACT as DELIVERY
    from models.fraud.contract import CONTRACT as FRAUD

    for name, contract in (("fraud", FRAUD), ("delivery", DELIVERY)):
        assert APIS[name] == ("/predict", "/predict_batch", f"/{entity_api(contract)}")
