"""Bounded service: body limit before parsing (413, chunked too), JSON only (415), bounded metrics labels for unknown
paths, the OpenAPI document listing those answers; on a real `bentoml serve`, a streamed 300 MiB body and 50 random
paths."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from loopform.serving.limits import DEFAULT_MAX_BODY_BYTES, ENV_MAX_BODY_BYTES, max_body_bytes
from loopform.serving.paths import UNKNOWN_PATH, FoldUnknownPaths
from loopform.serving.schemas import BATCH_FIELD, MAX_BATCH_ROWS
from tests.test_service import ETA, GOOD, OFFLINE, TRIP, stub_regressor

MiB = 2**20


def test_the_limit_comes_from_the_environment() -> None:
    assert max_body_bytes({}) == DEFAULT_MAX_BODY_BYTES == 16 * MiB
    assert max_body_bytes({ENV_MAX_BODY_BYTES: "1000"}) == 1000
    for bad in ("0", "-5", "1e6", "lots"):
        with pytest.raises(ValueError, match=ENV_MAX_BODY_BYTES):
            max_body_bytes({ENV_MAX_BODY_BYTES: bad})


@pytest.mark.parametrize("model", ["fraud", "delivery"])
def test_the_default_limit_fits_the_largest_batch_with_margin(model: str) -> None:
    """MAX_BATCH_ROWS rows, every caller id at its longest (200 characters) and every number at its longest
    decimal form, fit in half the default."""
    from loopform.serving.schemas import schemas
    from models.delivery.contract import CONTRACT as DELIVERY
    from models.fraud.contract import CONTRACT as FRAUD

    contract = {"fraud": FRAUD, "delivery": DELIVERY}[model]
    request = schemas(contract).request
    row: dict[str, Any] = {contract.id: "x" * 200}
    for feature in contract.features:
        if feature.kind == "categorical":
            row[feature.name] = max(feature.categories or (), key=len)
        elif feature.dtype == "int64":
            row[feature.name] = int(feature.max if feature.max is not None else 2**63 - 1)
        else:
            row[feature.name] = float(feature.max if feature.max is not None else 1e300) - 1 / 3  # 17 digits
    request.model_validate(row)  # a row the schema accepts
    size = len(json.dumps({BATCH_FIELD: [row] * MAX_BATCH_ROWS}).encode())
    assert 2 * size <= DEFAULT_MAX_BODY_BYTES, size


def test_unknown_paths_fold_into_one() -> None:
    seen: list[tuple[str, bytes]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["path"], scope["raw_path"]))

    import asyncio

    folded = FoldUnknownPaths(app, frozenset({"/predict", "/metrics"}))
    for path in ("/predict", "/metrics", "/x1", "/predict/", "/predict_batch", "/%2e%2e/etc"):
        asyncio.run(folded({"type": "http", "path": path, "raw_path": path.encode()}, None, None))
    assert seen[:2] == [("/predict", b"/predict"), ("/metrics", b"/metrics")]
    assert set(seen[2:]) == {(UNKNOWN_PATH, UNKNOWN_PATH.encode())}


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The regressor's service in process (stub model), a 64 KiB body limit, and the caller's header."""
    from loopform.serving import bento
    from tests.helpers_serving import CALLER, in_process, token_env

    env, headers = token_env(tmp_path / "tokens.json")
    counted = stub_regressor(tmp_path, monkeypatch, **env, **{ENV_MAX_BODY_BYTES: str(64 * 1024)})
    with in_process(bento.model_service(ETA)) as test_client:
        test_client.headers["Authorization"] = headers[CALLER]
        yield test_client, counted


def test_bodies_over_the_limit_are_413_before_parsing(client: Any) -> None:
    http, counted = client
    big = json.dumps({BATCH_FIELD: [TRIP] * 2000}).encode()  # ~130 KB of valid JSON
    assert len(big) > 64 * 1024
    declared = http.post("/predict_batch", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413
    assert declared.json()["limit"] == 64 * 1024 and ENV_MAX_BODY_BYTES in declared.json()["error"]

    def chunks(body: bytes, size: int = 4096) -> Any:
        for start in range(0, len(body), size):
            yield body[start : start + size]

    streamed = http.post("/predict_batch", content=chunks(big), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "chunked body" in streamed.json()["error"]
    assert counted.predictions.labels(model="eta", version="4", api="predict_batch")._value.get() == 0
    # Under the limit, a chunked body is read and scored like any other.
    small = json.dumps({BATCH_FIELD: [TRIP] * 50}).encode()
    accepted = http.post("/predict_batch", content=chunks(small, 100), headers={"content-type": "application/json"})
    assert accepted.status_code == 200 and len(accepted.json()) == 50


@pytest.mark.parametrize("content_type", ["text/plain", "multipart/form-data; boundary=x", "application/xml"])
def test_other_content_types_are_415_naming_the_type(client: Any, content_type: str) -> None:
    http, _ = client
    response = http.post("/predict", content=json.dumps(TRIP).encode(), headers={"content-type": content_type})
    assert response.status_code == 415
    assert response.json()["field"] == "content-type" and content_type.split(";")[0] in response.json()["error"]
    charset = http.post(
        "/predict", content=json.dumps(TRIP), headers={"content-type": "application/json; charset=utf-8"}
    )
    assert charset.status_code == 200


def test_the_openapi_document_lists_the_answers(client: Any) -> None:
    http, _ = client
    document = http.get("/docs.json").json()
    for path in ("/predict", "/predict_batch", "/predict_driver"):
        operation = document["paths"][path]["post"]
        assert {"200", "400", "401", "404", "413", "415", "500", "503"} <= set(operation["responses"])
        assert "Authorization: Bearer" in operation["description"]
    detail = document["components"]["schemas"]["Error"]["properties"]["detail"]
    assert {"string", "array"} == {option["type"] for option in detail["anyOf"]}


# --- a real server ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The fraud service under `bentoml serve` with the default body limit: (server, Authorization header)."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    from models.fraud import data
    from models.fraud.contract import CONTRACT
    from models.fraud.train import train
    from tests.test_service import serve_release

    frame = data.generate(1200, 3, days=10, cards=50)
    server, _, _, _, _, auth = serve_release(
        tmp_path_factory.mktemp("limits"),
        CONTRACT,
        train(frame, 3, max_epochs=2),
        frame,
        "bentos.fraud.service:FraudService",
    )
    yield server, auth
    server.stop()


def _workers_rss(server: Any) -> int:
    """Resident memory of the server's processes, the workers included."""
    import psutil

    parent = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)] if p.is_running())


def _stream(url: str, headers: dict[str, str], total: int, chunk: int = MiB) -> tuple[int, bytes, int]:
    """POST `total` bytes chunked over a raw socket, never allocating more than a chunk; stop when the server answers.

    Returns (the status, the response head and body read, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sent = 0
    answer = b""
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(
            f"POST /predict_batch HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n{head}\r\n".encode()
        )
        block = f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n"  # whitespace: valid JSON padding
        sock.setblocking(False)
        try:
            while sent < total:
                try:
                    answer += sock.recv(65536)
                    break  # the server answered before the body ended
                except BlockingIOError:
                    pass
                view = memoryview(block)
                while view:
                    try:
                        view = view[sock.send(view) :]
                    except BlockingIOError:
                        time.sleep(0.001)
                sent += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.setblocking(True)
        sock.settimeout(10)
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except (ConnectionResetError, TimeoutError):
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, answer, sent


@pytest.mark.slow
def test_a_300_mib_body_is_refused_while_streaming_and_memory_stays_small(served: Any) -> None:
    server, auth = served
    headers = {"Authorization": auth, "Content-Type": "application/json"}
    before = _workers_rss(server)
    status, answer, sent = _stream(server.url, headers, 300 * MiB)
    assert status == 413, answer[:500]
    assert b'"limit": 16777216' in answer
    assert sent < 300 * MiB  # refused while streaming, not after
    # A declared length over the limit is refused before a byte of the body is sent.
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST /predict_batch HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {300 * MiB}\r\n\r\n".encode()
        )
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head[:300]
    # The server kept at most the limit of one body: its processes grew by far less than the body.
    assert _workers_rss(server) - before < 64 * MiB, (before, _workers_rss(server))
    assert httpx.post(f"{server.url}/predict", json=GOOD, headers={"Authorization": auth}).status_code == 200


@pytest.mark.slow
def test_random_paths_add_no_metric_series(served: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    server, auth = served

    def endpoints() -> set[str]:
        text = httpx.get(f"{server.url}/metrics").text
        return {
            sample.labels["endpoint"]
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.startswith("bentoml_service_request") and "endpoint" in sample.labels
        }

    for index in range(50):
        path = f"/{secrets.token_hex(6)}/{index}"
        method = httpx.get if index % 2 else httpx.post
        assert method(f"{server.url}{path}", headers={"Authorization": auth}).status_code == 404
    assert httpx.get(f"{server.url}/predict", headers={"Authorization": auth}).status_code == 405  # known path
    found = endpoints()
    assert UNKNOWN_PATH in found
    served = {"/predict", "/predict_batch", "/predict_card", "/healthz", "/livez", "/readyz", "/docs.json", "/"}
    assert found <= {UNKNOWN_PATH, *served}, found  # none of the 50 random paths
