"""Model services built from a contract: the fraud service over real HTTP on localhost, `bentoml build` of its
Bento, and the regression path (schemas, answers, payload records and metrics of a regressor).

One module-scoped fraud server: a small model trained with models/fraud/train.py, registered in a temporary
MLflow SQLite store with alias `production`, a local Feast repo for /predict_card, and a payload log that
only writes at shutdown (huge flush thresholds), so the last fraud test proves that SIGTERM drains every record.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from loopform.contract import Contract, Feature
from loopform.serving.release import ENV_MODEL_URI, ENV_TRACKING_URI, parse_model_uri, release_from_env
from loopform.serving.schemas import entity_api, schemas
from models.fraud import data
from models.fraud.contract import CONTRACT
from tests.helpers_serving import CALLER, free_port, in_process, token_env

REPO = Path(__file__).resolve().parent.parent
SERVICE = "bentos.fraud.service:FraudService"
OFFLINE = {"MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true"}

GOOD = {
    "amount": 84.5,
    "hour_of_day": 14,
    "distance_from_home_km": 3.2,
    "txn_count_24h": 2,
    "avg_amount_30d": 61.0,
    "card_age_days": 800,
    "is_foreign": 0,
    "merchant_category": "grocery",
    "channel": "chip",
}
CARD_LEVEL = ("txn_count_24h", "avg_amount_30d", "card_age_days")  # from the online store on the card path
OWN = {k: v for k, v in GOOD.items() if k not in CARD_LEVEL}  # the transaction's own fields


class Stack:
    """The running server plus what the tests need to check its answers."""

    def __init__(
        self, server: Any, model: Any, version: int, repo: Any, cards: list[int], payload_uri: str, auth: str
    ) -> None:
        self.server = server
        self.auth = auth  # the Authorization header of the tests' caller
        self.model = model
        self.version = version
        self.repo = repo
        self.cards = cards
        self.payload_uri = payload_uri
        self.answered: dict[str, tuple[str, dict[str, Any]]] = {}  # request_id -> (api, body) of every 200

    def post(self, api: str, body: Any, **kwargs: Any) -> httpx.Response:
        if "content" not in kwargs:
            kwargs["json"] = body
        kwargs["headers"] = {"Authorization": self.auth, **kwargs.get("headers", {})}
        response = httpx.post(f"{self.server.url}/{api}", timeout=60.0, **kwargs)
        if response.status_code == 200:
            answers = response.json()
            rows = body["events"] if api == "predict_batch" else [body]
            for answer, row in zip(answers if isinstance(answers, list) else [answers], rows, strict=True):
                self.answered[answer["request_id"]] = (api, row)
        return response


def serve_release(
    work: Path, contract: Any, model: Any, frame: Any, service: str, **env: str
) -> tuple[Any, Any, int, Any, str, str]:
    """Release `model` as `<model>@production` in a fresh MLflow store, load `frame` into a local Feast repo and
    start `service` on them, with a tokens file naming the tests' caller: (server, the released model as loaded
    back, version, Feast repo, payload URI, the caller's Authorization header)."""
    from loopform import registry
    from loopform.contract import fingerprint
    from loopform.features import FeatureRepo
    from loopform.serving.process import BentoServer

    name = contract.model
    tracking_uri = f"sqlite:///{work}/mlflow.db"
    run = registry.log_training_run(
        tracking_uri, name, model, gate_results={}, training_data_fingerprint=fingerprint(frame)
    )
    version = registry.register_version(tracking_uri, name, run.run_id).version
    registry.set_alias(tracking_uri, name, "production", version)
    repo = FeatureRepo(work / "feast", contract)
    repo.write(frame)
    repo.apply()
    repo.materialize(frame[contract.timestamp].max())
    payload_uri = str(work / "lake" / "payloads")
    tokens, headers = token_env(work / "tokens.json")
    env = {
        **OFFLINE,
        **tokens,
        "LOOPFORM_TRACKING_URI": tracking_uri,
        "LOOPFORM_MODEL_URI": f"models:/{name}@production",
        "LOOPFORM_FEAST_REPO": str(work / "feast"),
        "LOOPFORM_PAYLOAD_URI": payload_uri,
        "BENTOML_HOME": str(work / "bentoml"),
        "MPLCONFIGDIR": str(work / "mpl"),
        **env,
    }
    server = BentoServer(service, working_dir=REPO, port=free_port(), env=env, log_path=work / "serve.log").start()
    return server, registry.load_model(tracking_uri, name, version), version, repo, payload_uri, headers[CALLER]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    from models.fraud.train import train

    frame = data.generate(2500, 11, days=10, cards=150)
    server, loaded, version, repo, payload_uri, auth = serve_release(
        tmp_path_factory.mktemp("service"),
        CONTRACT,
        train(frame, 11, max_epochs=4),
        frame,
        SERVICE,
        LOOPFORM_PAYLOAD_FLUSH_ROWS="1000000",  # nothing is written before shutdown ...
        LOOPFORM_PAYLOAD_FLUSH_SECONDS="86400",  # ... so the last test checks the drain on SIGTERM
    )
    cards = sorted(int(c) for c in frame[data.ENTITY].unique())[:20]
    yield Stack(server, loaded, version, repo, cards, payload_uri, auth)
    server.stop()


def _score(model: Any, row: dict[str, Any]) -> float:
    import pandas as pd

    return float(model.predict_proba(pd.DataFrame([row]))[0])


# --- schemas and configuration (no server) ------------------------------------------------------------


def test_request_schema_is_strict() -> None:
    from pydantic import ValidationError

    api = schemas(CONTRACT)
    transaction, by_card = api.request, api.by_entity
    assert transaction.model_validate(GOOD).amount == 84.5
    for bad in (
        {**GOOD, "amount": "84.5"},
        {**GOOD, "hour_of_day": 14.5},
        {**GOOD, "channel": "pigeon"},
        {**GOOD, "x": 1},
    ):
        with pytest.raises(ValidationError):
            transaction.model_validate(bad)
    assert set(OWN) == set(data.TRANSACTION_FEATURES) and set(CARD_LEVEL) == set(data.CARD_FEATURES)
    # The card path: the card plus the transaction's own fields, every one required; no aggregates.
    assert by_card.model_validate({"card_id": 7, **OWN}).channel == "chip"
    assert set(by_card.model_fields) == {"card_id", "transaction_id", *OWN}
    for missing in ("card_id", *OWN):
        body = {"card_id": 7, **OWN}
        del body[missing]
        with pytest.raises(ValidationError) as error:
            by_card.model_validate(body)
        assert (missing,) in [e["loc"] for e in error.value.errors()]
    for aggregate in CARD_LEVEL:
        with pytest.raises(ValidationError) as error:
            by_card.model_validate({"card_id": 7, **OWN, aggregate: GOOD[aggregate]})
        assert (aggregate,) in [e["loc"] for e in error.value.errors()]


def test_model_uri_forms_and_missing_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_model_uri("models:/fraud@production") == ("fraud", "production", None)
    assert parse_model_uri("models:/fraud/3") == ("fraud", None, 3)
    for bad in ("fraud@production", "models:/fraud", "models:/fraud/0", "models:/@prod", "runs:/abc/model"):
        with pytest.raises(ValueError, match="models:/NAME@ALIAS"):
            parse_model_uri(bad)
    monkeypatch.delenv(ENV_TRACKING_URI, raising=False)
    monkeypatch.delenv(ENV_MODEL_URI, raising=False)
    with pytest.raises(RuntimeError, match="LOOPFORM_TRACKING_URI and LOOPFORM_MODEL_URI"):
        release_from_env()


# --- over HTTP --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_answers_with_the_released_version(stack: Stack) -> None:
    response = stack.post("predict", {**GOOD, "transaction_id": "t-1"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == "fraud" and answer["version"] == stack.version
    assert math.isclose(answer["score"], _score(stack.model, GOOD), rel_tol=1e-6, abs_tol=1e-9)
    assert answer["threshold"] == pytest.approx(stack.model.threshold)
    assert answer["prediction"] == int(answer["score"] >= answer["threshold"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**GOOD, "amount": "84.5"}, "amount"),  # wrong type: string for a number
        ({**GOOD, "hour_of_day": 14.5}, "hour_of_day"),  # wrong type: float for an integer
        ({**GOOD, "is_foreign": True}, "is_foreign"),  # wrong type: boolean
        ({k: v for k, v in GOOD.items() if k != "channel"}, "channel"),  # missing field
        ({**GOOD, "merchant_category": "casino"}, "merchant_category"),  # out-of-domain category
        ({**GOOD, "amount": -5.0}, "amount"),  # outside the schema's range
        ({**GOOD, "hour_of_day": 24}, "hour_of_day"),
        ({**GOOD, "amout": 1.0}, "amout"),  # misspelt (unknown) field
        ({**GOOD, "amount": None}, "amount"),
    ],
)
def test_malformed_payloads_get_400_naming_the_field(stack: Stack, body: dict[str, Any], field: str) -> None:
    response = stack.post("predict", body)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert [field] in [error["loc"] for error in detail], detail
    assert all(error["msg"] for error in detail)


@pytest.mark.slow
@pytest.mark.parametrize(
    "content",
    [b"not json", b"", b"[1, 2, 3]", b'{"amount": NaN}', json.dumps({**GOOD, "amount": 1e400}).encode()],
)
def test_unparseable_bodies_get_400(stack: Stack, content: bytes) -> None:
    response = stack.post("predict", None, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]


@pytest.mark.slow
def test_batch(stack: Stack) -> None:
    rows = [GOOD, {**GOOD, "amount": 4000.0, "hour_of_day": 3, "is_foreign": 1, "channel": "online"}]
    response = stack.post("predict_batch", {"events": rows})
    assert response.status_code == 200, response.text
    answers = response.json()
    assert [a["score"] for a in answers] == pytest.approx([_score(stack.model, r) for r in rows], rel=1e-6)
    assert stack.post("predict_batch", {"events": []}).status_code == 400
    bad = stack.post("predict_batch", {"events": [GOOD, {**GOOD, "channel": "fax"}]})
    assert bad.status_code == 400 and bad.json()["detail"][0]["loc"] == ["events", 1, "channel"]


@pytest.mark.slow
def test_predict_by_card_reads_the_online_store(stack: Stack) -> None:
    """The request's own fields plus the card's aggregates from the store: nothing else, nothing stale."""
    card = stack.cards[0]
    stored = stack.repo.online([card]).iloc[0].to_dict()
    aggregates = {name: stored[name] for name in CARD_LEVEL}
    response = stack.post("predict_card", {"card_id": card, **OWN, "transaction_id": "card-1"})
    assert response.status_code == 200, response.text
    assert math.isclose(
        response.json()["score"], _score(stack.model, {**OWN, **aggregates}), rel_tol=1e-6, abs_tol=1e-9
    )

    other = {**OWN, "amount": 4321.0, "hour_of_day": 3, "distance_from_home_km": 900.0, "channel": "online"}
    response = stack.post("predict_card", {"card_id": card, **other})
    assert response.status_code == 200, response.text
    expected = _score(stack.model, {**other, **aggregates})
    assert math.isclose(response.json()["score"], expected, rel_tol=1e-6, abs_tol=1e-9)


@pytest.mark.slow
def test_predict_by_card_errors(stack: Stack) -> None:
    unknown = stack.post("predict_card", {"card_id": 987_654_321, **OWN})
    assert unknown.status_code == 404
    assert "no online features for card_id=987654321" in unknown.text
    assert stack.post("predict_card", {"card_id": "12", **OWN}).status_code == 400
    assert stack.post("predict_card", {"card_id": 2**70, **OWN}).status_code == 400  # beyond int64: never a 500
    assert stack.post("predict_card", {"card_id": stack.cards[0], **OWN, "channel": "pigeon"}).status_code == 400
    assert stack.post("predict_card", OWN).status_code == 400
    # A request without the transaction's own fields is a 400 naming each missing field ...
    response = stack.post("predict_card", {"card_id": stack.cards[0], "amount": 1.0})
    assert response.status_code == 400
    missing = {tuple(error["loc"]) for error in response.json()["detail"]}
    assert missing == {(name,) for name in OWN if name != "amount"}, missing
    # ... and one that tries to supply a card aggregate a 400 naming it: those come from the store.
    response = stack.post("predict_card", {"card_id": stack.cards[0], **OWN, "txn_count_24h": 0})
    assert response.status_code == 400 and ["txn_count_24h"] in [e["loc"] for e in response.json()["detail"]]
    assert stack.post("predict", GOOD).status_code == 200  # still serving after the errors


@pytest.mark.slow
def test_concurrent_requests(stack: Stack) -> None:
    def one(i: int) -> httpx.Response:
        if i % 3 == 0:
            card = stack.cards[i % len(stack.cards)]
            return stack.post("predict_card", {"card_id": card, **OWN, "amount": float(i)})
        if i % 7 == 0:
            return stack.post("predict", {**GOOD, "channel": "teleport"})  # malformed ones mixed in
        return stack.post("predict", {**GOOD, "amount": float(10 * i), "transaction_id": f"c-{i}"})

    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(one, range(60)))
    codes = [r.status_code for r in responses]
    malformed = [i for i in range(60) if i % 3 and i % 7 == 0]
    assert [codes[i] for i in malformed] == [400] * len(malformed)
    assert all(code == 200 for i, code in enumerate(codes) if i not in malformed), codes
    ids = [r.json()["request_id"] for r in responses if r.status_code == 200]
    assert len(ids) == len(set(ids)) == 60 - len(malformed)
    for i, response in enumerate(responses):
        if i % 3 and i % 7:
            row = {**GOOD, "amount": float(10 * i)}
            assert math.isclose(response.json()["score"], _score(stack.model, row), rel_tol=1e-6, abs_tol=1e-9)


def _metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@pytest.mark.slow
def test_prometheus_metrics_count_predictions(stack: Stack) -> None:
    labels = {"model": "fraud", "version": str(stack.version), "api": "predict"}
    before = httpx.get(f"{stack.server.url}/metrics").text
    for amount in (1.0, 2.0, 3.0):
        assert stack.post("predict", {**GOOD, "amount": amount}).status_code == 200
    assert stack.post("predict", {**GOOD, "amount": "x"}).status_code == 400
    after = httpx.get(f"{stack.server.url}/metrics").text
    name = "loopform_predictions_total"
    assert _metric(after, name, **labels) - _metric(before, name, **labels) == 3
    score = "loopform_prediction_score_count"
    version = {"model": "fraud", "version": str(stack.version)}
    assert _metric(after, score, **version) - _metric(before, score, **version) == 3
    assert _metric(after, "loopform_rejected_requests_total", model="fraud", reason="unknown_entity") >= 1
    assert "bentoml_service_request_total" in after  # BentoML's own request metrics stay there


@pytest.mark.slow
def test_graceful_shutdown_logs_every_answered_request(stack: Stack) -> None:
    """Last test of the module: SIGTERM, then the payload log holds exactly the answered requests."""
    import pandas as pd

    from loopform.features import AS_OF
    from loopform.payloads import read_payloads

    for i in range(20):  # traffic of its own, so the test also holds when run alone
        assert stack.post("predict", {**GOOD, "amount": 500.0 + i}).status_code == 200
        card = stack.cards[i % len(stack.cards)]
        assert stack.post("predict_card", {"card_id": card, **OWN, "amount": 900.0 + i}).status_code == 200
    assert len(stack.answered) >= 20
    assert stack.server.stop(signal.SIGTERM) == 0, stack.server.log_tail()
    rows = read_payloads(stack.payload_uri, "fraud")
    assert len(rows) == len(stack.answered)
    assert set(rows["request_id"]) == set(stack.answered)
    assert set(rows["model_version"]) == {stack.version}
    assert set(rows["caller"]) == {CALLER}  # the authenticated caller, beside the request's own caller id
    by_id = rows.set_index("request_id")
    cards = [body["card_id"] for api, body in stack.answered.values() if api == "predict_card"]
    assert cards, "the module sent card-path requests"
    store = stack.repo.online(sorted(set(cards)), with_time=True).set_index("card_id")
    for request_id, (api, body) in stack.answered.items():
        row = by_id.loc[request_id]
        if api == "predict_card":
            # The vector scored: the request's own transaction, the card's aggregates as the store held them.
            assert row["card_id"] == body["card_id"] and row["api"] == "predict_card"
            for name in data.TRANSACTION_FEATURES:
                assert row[name] == body[name], (request_id, name)
            for name in data.CARD_FEATURES:
                assert row[name] == store.loc[body["card_id"], name], (request_id, name)
            assert row[AS_OF] == store.loc[body["card_id"], AS_OF]
        else:
            assert pd.isna(row[AS_OF])
        for name in data.FEATURE_NAMES:
            if body.get(name) is not None:  # what was sent is what the model saw and what was logged
                assert row[name] == body[name], (request_id, name)
        assert json.loads(row["request"]).items() >= {k: v for k, v in body.items() if v is not None}.items()


# --- the regression path: schemas, answers, payload records and metrics follow the contract's task ------------

# A small regression contract of the test's own: the service code must need nothing but a contract.
ETA = Contract(
    model="eta",
    task="regression",
    id="trip_id",
    entity="driver_id",
    entity_description="A driver.",
    timestamp="event_timestamp",
    label="minutes",
    label_description="Minutes of the trip.",
    label_range=(0.0, 100.0),
    feature_service="eta_v1",
    entity_view="driver_stats",
    features=(
        Feature("distance_km", "numeric", "float64", 0.0, 50.0, None, "Trip distance."),
        Feature("stops", "numeric", "int64", 1.0, 10.0, None, "Stops on the way."),
        Feature("vehicle", "categorical", "string", None, None, ("bike", "car"), "Vehicle."),
        Feature("trips_24h", "numeric", "int64", 0.0, 100.0, None, "The driver's trips in the 24 h before.", "entity"),
    ),
)
TRIP = {"distance_km": 3.5, "stops": 2, "vehicle": "car", "trips_24h": 6}


class MinutesStub:
    """A regressor as the contract's interface sees it: `predict(frame)` in the label's unit."""

    def predict(self, frame: Any) -> Any:
        return 10.0 + 4.0 * frame["distance_km"].to_numpy() + frame["stops"].to_numpy()


def stub_regressor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Any = None, **env: str) -> Any:
    """Set up the regressor's service to run in process: the stub model as its release, metrics in `registry` (a
    new one by default, never the process's default), payloads and their spill folder under `tmp_path`, no Feast,
    no tokens file; then `env`. Returns the metrics the service counts into."""
    from prometheus_client import CollectorRegistry

    from loopform.serving import bento, scorer
    from loopform.serving.auth import ENV_ALLOW_ANONYMOUS, ENV_TOKENS_FILE
    from loopform.serving.metrics import create_metrics
    from loopform.serving.release import Release

    counted = create_metrics(ETA, CollectorRegistry() if registry is None else registry)
    monkeypatch.setattr(scorer, "metrics", lambda contract: counted)
    monkeypatch.setattr(bento, "release_from_env", lambda: Release(MinutesStub(), "eta", 4, "models:/eta/4"))
    monkeypatch.setenv("LOOPFORM_PAYLOAD_URI", str(tmp_path / "payloads"))
    monkeypatch.setenv("LOOPFORM_PAYLOAD_SPILL_DIR", str(tmp_path / "spill"))
    for name in ("LOOPFORM_FEAST_REPO", "LOOPFORM_FEAST_CONFIG", ENV_TOKENS_FILE, ENV_ALLOW_ANONYMOUS):
        monkeypatch.delenv(name, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return counted


def test_regression_schemas_follow_the_contract() -> None:
    from pydantic import ValidationError

    api = schemas(ETA)
    assert entity_api(ETA) == "predict_driver" and entity_api(CONTRACT) == "predict_card"
    assert set(api.request.model_fields) == {"trip_id", *ETA.feature_names}
    assert set(api.by_entity.model_fields) == {"driver_id", "trip_id", "distance_km", "stops", "vehicle"}
    assert set(api.response.model_fields) == {"request_id", "prediction", "model", "version"}
    assert api.response.model_fields["prediction"].annotation is float
    assert set(schemas(CONTRACT).response.model_fields) == {
        "request_id", "prediction", "score", "threshold", "model", "version"
    }  # fmt: skip
    for bad in ({**TRIP, "stops": 0}, {**TRIP, "vehicle": "drone"}, {**TRIP, "distance_km": "3"}):
        with pytest.raises(ValidationError):
            api.request.model_validate(bad)


def test_regression_buckets_span_the_label_range() -> None:
    from loopform.serving.metrics import PROBABILITY_BUCKETS, VALUE_BUCKETS, score_buckets

    buckets = score_buckets(ETA)
    assert buckets == tuple(5.0 * i for i in range(VALUE_BUCKETS + 1))  # 0, 5, ..., 100 minutes
    assert score_buckets(CONTRACT) == PROBABILITY_BUCKETS


def test_regression_service_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A regressor's service class over BentoML's ASGI app, with a stub model: answers, 400s, payloads, metrics."""
    from prometheus_client import CollectorRegistry

    from loopform.payloads import read_payloads
    from loopform.serving import bento

    registry = CollectorRegistry()
    # Anonymous: tests/test_service_auth.py covers the tokens.
    stub_regressor(tmp_path, monkeypatch, registry, LOOPFORM_ALLOW_ANONYMOUS="true")
    service = bento.model_service(ETA)
    assert set(service.apis) == {"predict", "predict_batch", "predict_driver"}
    rows = [{**TRIP, "trip_id": "t-1"}, {**TRIP, "distance_km": 8.0, "stops": 5}]
    own = {name: TRIP[name] for name in ETA.event_features}
    with in_process(service) as client:
        one = client.post("/predict", json=rows[0])
        assert one.status_code == 200, one.text
        assert one.json() == {"request_id": one.json()["request_id"], "prediction": 26.0, "model": "eta", "version": 4}
        many = client.post("/predict_batch", json={"events": rows})
        assert many.status_code == 200, many.text
        assert [a["prediction"] for a in many.json()] == [26.0, 47.0]
        for body, field in (
            ({**TRIP, "stops": 0}, ["stops"]),  # below the contract's range
            ({**TRIP, "vehicle": "drone"}, ["vehicle"]),  # unknown category
            ({**TRIP, "stops": "2"}, ["stops"]),  # a string for a number
            ({**TRIP, "eta": 3}, ["eta"]),  # unknown field
        ):
            response = client.post("/predict", json=body)
            assert response.status_code == 400 and field in [e["loc"] for e in response.json()["detail"]], body
        assert client.post("/predict_batch", json={"events": []}).status_code == 400
        entity_path = client.post("/predict_driver", json={"driver_id": 3, **own, "trips_24h": 2})
        assert entity_path.status_code == 400  # an entity feature comes from the store, never the request
        assert client.post("/predict_driver", json={"driver_id": 3, **own}).status_code == 503  # no store
    records = read_payloads(str(tmp_path / "payloads"), "eta")  # drained by the shutdown hook
    assert len(records) == 3 and "score" not in records.columns
    assert {"trip_id", "driver_id", *ETA.feature_names, "prediction", "model_version"} <= set(records)
    assert sorted(records["prediction"]) == [26.0, 26.0, 47.0] and set(records["trip_id"].dropna()) == {"t-1"}
    assert set(records["caller"]) == {"anonymous"}
    labels = {"model": "eta", "version": "4"}
    assert registry.get_sample_value("loopform_predictions_total", {**labels, "api": "predict_batch"}) == 2
    assert registry.get_sample_value("loopform_prediction_score_bucket", {**labels, "le": "50.0"}) == 3
    assert registry.get_sample_value("loopform_serving_model_version", {"model": "eta"}) == 4


@pytest.fixture(scope="module")
def delivery(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The delivery service over HTTP: a small trained regressor, released in MLflow, a local Feast repo."""
    from models.delivery import data as delivery_data
    from models.delivery.contract import CONTRACT as DELIVERY
    from models.delivery.train import train

    frame = delivery_data.generate(2000, 5, days=10)
    model = train(frame, 5, max_epochs=3)
    server, loaded, version, repo, _, auth = serve_release(
        tmp_path_factory.mktemp("delivery"), DELIVERY, model, frame, "bentos.delivery.service:DeliveryService"
    )
    yield server, loaded, version, frame, repo, {"Authorization": auth}
    server.stop()


@pytest.mark.slow
def test_delivery_service_serves_a_batch_of_the_released_regressor(delivery: Any) -> None:
    import pandas as pd

    from models.delivery.contract import CONTRACT as DELIVERY

    server, model, version, frame, repo, headers = delivery
    rows = [{name: _plain(row[name]) for name in DELIVERY.feature_names} for row in frame.head(40).to_dict("records")]
    response = httpx.post(f"{server.url}/predict_batch", json={"events": rows}, headers=headers, timeout=60.0)
    assert response.status_code == 200, response.text
    answers = response.json()
    assert {(a["model"], a["version"]) for a in answers} == {("delivery", version)}
    assert all(set(a) == {"request_id", "prediction", "model", "version"} for a in answers)
    expected = model.predict(frame.head(40))
    assert [a["prediction"] for a in answers] == pytest.approx(list(expected), rel=1e-5)

    restaurant = int(frame[DELIVERY.entity].iloc[0])
    stored = repo.online([restaurant]).iloc[0]
    own = {name: rows[0][name] for name in DELIVERY.event_features}
    response = httpx.post(
        f"{server.url}/predict_restaurant", json={DELIVERY.entity: restaurant, **own}, headers=headers, timeout=60.0
    )
    assert response.status_code == 200, response.text
    vector = {**own, **{name: _plain(stored[name]) for name in DELIVERY.entity_features}}
    assert response.json()["prediction"] == pytest.approx(float(model.predict(pd.DataFrame([vector]))[0]), rel=1e-5)

    numeric = next(f for f in DELIVERY.features if f.kind == "numeric" and f.scope == "event")
    bad = httpx.post(
        f"{server.url}/predict", json={**rows[0], numeric.name: numeric.max + 1}, headers=headers, timeout=60.0
    )
    assert bad.status_code == 400 and [numeric.name] in [e["loc"] for e in bad.json()["detail"]]
    metrics = httpx.get(f"{server.url}/metrics").text
    labels = {"model": "delivery", "version": str(version), "api": "predict_batch"}
    assert _metric(metrics, "loopform_predictions_total", **labels) == 40
    assert _metric(metrics, "loopform_prediction_score_count", model="delivery", version=str(version)) == 41
    edges = {sample["le"] for sample in _labels(metrics, "loopform_prediction_score_bucket")}
    assert {"1.0", "12.95", "240.0", "+Inf"} <= edges  # buckets across the contract's label range
    assert all("prediction" not in labels for labels in _labels(metrics, "loopform_predictions_total"))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _labels(text: str, name: str) -> list[dict[str, str]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [s.labels for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


class RecordsStub(MinutesStub):
    """A regressor that also scores rows given as mappings (`predict_records`), as loopform's tabular models do."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []

    def predict(self, frame: Any) -> Any:
        raise AssertionError("the scorer built a DataFrame for a model that scores mappings")

    def predict_records(self, rows: list[dict[str, Any]]) -> list[float]:
        self.calls.append(rows)
        return [10.0 + 4.0 * row["distance_km"] + row["stops"] for row in rows]


def test_a_scorer_passes_feature_vectors_to_a_model_that_takes_them(tmp_path: Path) -> None:
    from loopform.payloads import PayloadLog, read_payloads
    from loopform.serving.release import Release
    from loopform.serving.scorer import Scorer

    model = RecordsStub()
    rows = [{**TRIP, "trip_id": "t-1"}, {**TRIP, "distance_km": 8.0, "stops": 5}]
    with PayloadLog(str(tmp_path / "payloads"), "eta") as payloads:
        scorer = Scorer(Release(model, "eta", 4, "models:/eta/4"), ETA, payloads=payloads, with_metrics=False)
        answers = scorer.score_rows(rows, "predict_batch")
        assert [a["prediction"] for a in answers] == [26.0, 47.0]
        assert model.calls == [[{name: row[name] for name in ETA.feature_names} for row in rows]]  # no trip_id
    records = read_payloads(str(tmp_path / "payloads"), "eta").sort_values("prediction")
    assert records["distance_km"].tolist() == [3.5, 8.0] and records["stops"].tolist() == [2, 5]
    assert records["vehicle"].tolist() == ["car", "car"] and records["trip_id"].tolist() == ["t-1", None]


def test_a_scorer_refuses_a_model_without_its_tasks_method() -> None:
    from loopform.serving.release import Release
    from loopform.serving.scorer import Scorer

    with pytest.raises(TypeError, match="classification model by its contract but lacks predict_proba, threshold"):
        Scorer(Release(MinutesStub(), "fraud", 1, "models:/fraud/1"), CONTRACT, with_metrics=False)


def build_context_here(folder: Path) -> tuple[Path, dict[str, str]]:
    """(build context, extra environment) of a Bento as this machine builds it: a copy of what the bentofiles
    include, where a wheel named by URL on a host this machine cannot reach stands in as that version, which the
    lock (uv) finds through this machine's pip find-links, as tests/test_images.py resolves the same requirements.
    (BentoML reads `requirements_txt` only from inside the build context.)"""
    import shutil

    from tests.test_images import BENTO_REQUIREMENTS, _reachable

    context = folder / "context"
    for part in ("bentos", "loopform", "models"):
        shutil.copytree(REPO / part, context / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    written = BENTO_REQUIREMENTS.read_text().splitlines()
    here = [line if not line or line.startswith("#") else _reachable(line) for line in written]
    if here == written:
        return context, {}
    (context / BENTO_REQUIREMENTS.relative_to(REPO)).write_text("\n".join(here) + "\n")
    return context, {"UV_FIND_LINKS": os.environ.get("PIP_FIND_LINKS", "")}


@pytest.mark.slow
@pytest.mark.parametrize(("model", "by_entity"), [("fraud", "predict_card"), ("delivery", "predict_restaurant")])
def test_bentoml_build(tmp_path: Path, model: str, by_entity: str) -> None:
    context, stand_in = build_context_here(tmp_path)
    env = {**os.environ, **OFFLINE, **stand_in, "BENTOML_HOME": str(tmp_path / "bentoml")}
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", f"bentos/{model}/bentofile.yaml", "-o", "tag", "."],
        cwd=context,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = tmp_path / "bentoml" / "bentos" / name / version
    assert name == model
    for path in (
        f"src/bentos/{model}/service.py",
        "src/loopform/serving/bento.py",
        "src/loopform/serving/scorer.py",
        "src/loopform/payloads.py",
        f"src/models/{model}/model.py",
    ):
        assert (bento / path).is_file(), path
    other = "delivery" if model == "fraud" else "fraud"
    assert not (bento / "src" / "models" / other).exists()  # a bento carries its own model's code only
    # lock_packages: the Bento keeps what it was given (requirements.in) and installs its lock (requirements.txt),
    # which for a fully pinned set is that set, torch as its CPU build.
    requirements = (bento / "env" / "python" / "requirements.in").read_text()
    locked = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.13.0+cpu" in locked and "bentoml==1.4.40" in locked

    def pins(text: str) -> dict[str, str]:
        found = (line.split("==") for line in text.splitlines() if "==" in line and not line.startswith("#"))
        return {name.lower().replace("_", "-"): version.split("+")[0].split(";")[0].strip() for name, version in found}

    assert pins(locked) == {**pins(requirements), "bentoml": "1.4.40"}
    routes = {route["name"] for route in json.loads((bento / "apis" / "schema.json").read_text())["routes"]}
    assert routes == {"predict", "predict_batch", by_entity}
