"""Callers authenticate before anything is read, scored or logged: the tokens file, the 401s, the open routes, the
caller in each payload row, and the refusal to start without tokens unless anonymity is asked for."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from loopform.serving import auth
from loopform.serving.auth import ANONYMOUS, ENV_ALLOW_ANONYMOUS, ENV_TOKENS_FILE, Callers, TokensError, read_tokens
from tests.helpers_serving import in_process, token_env, write_tokens
from tests.test_service import ETA, TRIP, stub_regressor

ALICE, BOB = "a" * 20, "b" * 24


def _tokens(tmp_path: Path, content: Any) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_the_tokens_file_is_validated(tmp_path: Path) -> None:
    assert read_tokens(_tokens(tmp_path, {"alice": ALICE, "bob": BOB})) == {"alice": ALICE, "bob": BOB}
    for content, problem in (
        ("{not json", "cannot read"),
        ([ALICE], "JSON object"),
        ({}, "at least one caller"),
        ({"alice": "short"}, "at least 16 characters"),
        ({"alice": 12345678901234567890}, "token string"),
        ({"alice": ALICE, "bob": ALICE}, "share a token"),
        ({ANONYMOUS: ALICE}, "unauthenticated traffic"),
    ):
        with pytest.raises(TokensError, match=problem):
            read_tokens(_tokens(tmp_path, content))
    with pytest.raises(TokensError, match="cannot read"):
        read_tokens(tmp_path / "missing.json")


def test_a_caller_is_named_by_its_token_only(tmp_path: Path) -> None:
    callers = Callers(_tokens(tmp_path, {"alice": ALICE, "bob": BOB}))
    assert callers.identify(f"Bearer {ALICE}".encode()) == "alice"
    assert callers.identify(f"bearer  {BOB} ".encode()) == "bob"  # the scheme is case-insensitive
    for header in (None, b"", ALICE.encode(), f"Basic {ALICE}".encode(), f"Bearer {ALICE}x".encode(), b"Bearer "):
        assert callers.identify(header) is None, header


def test_a_rotated_file_is_read_again_and_a_broken_one_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _tokens(tmp_path, {"alice": ALICE})
    callers = Callers(path)
    monkeypatch.setattr(auth, "_RELOAD_SECONDS", 0.0)
    path.write_text(json.dumps({"carol": BOB, "alice-2": "c" * 30}))
    assert callers.identify(f"Bearer {ALICE}".encode()) is None
    assert callers.identify(f"Bearer {BOB}".encode()) == "carol"
    path.write_text("{broken")  # a half-written rotation keeps the tokens last read
    assert callers.identify(f"Bearer {BOB}".encode()) == "carol"


def test_no_tokens_means_no_start_unless_anonymity_is_explicit(tmp_path: Path) -> None:
    from loopform.serve import ServeRefused, checked_callers
    from loopform.serving.process import BentoServer

    with pytest.raises(TokensError, match=ENV_ALLOW_ANONYMOUS):
        Callers.from_env({})
    with pytest.raises(TokensError, match=ENV_TOKENS_FILE):
        Callers.from_env({ENV_ALLOW_ANONYMOUS: "yes"})  # only "true" says it
    assert Callers.from_env({ENV_ALLOW_ANONYMOUS: "true"}).identify(None) == ANONYMOUS
    with pytest.raises(ServeRefused, match="cannot serve without callers' tokens"):
        checked_callers({})
    assert "anonymous callers allowed" in checked_callers({ENV_ALLOW_ANONYMOUS: "true"})
    path = _tokens(tmp_path, {"alice": ALICE})
    assert "1 in" in checked_callers({ENV_TOKENS_FILE: str(path), ENV_ALLOW_ANONYMOUS: "true"})  # the file wins
    # The test helper (and the local loop) start no server without tokens: refused before a process starts.
    environ = {k: v for k, v in os.environ.items() if k not in (ENV_TOKENS_FILE, ENV_ALLOW_ANONYMOUS)}
    server = BentoServer("bentos.fraud.service:FraudService", working_dir=tmp_path, port=1)
    server.env = environ
    with pytest.raises(TokensError):
        server.start()
    assert server.process is None


def test_the_local_loop_writes_a_private_tokens_file_its_service_reads(tmp_path: Path) -> None:
    from loopform.local import LOCAL_CALLER, TOKENS_FILE, local_token, local_tokens, serve_env

    tokens = local_tokens(tmp_path)
    assert (tmp_path / TOKENS_FILE).stat().st_mode & 0o777 == 0o600
    assert read_tokens(tmp_path / TOKENS_FILE) == tokens and local_token(tmp_path) == tokens[LOCAL_CALLER]
    release = {"model": "fraud", "version": 1, "artifacts": "sha256:" + "0" * 64}
    env = serve_env(tmp_path, "fraud", "sqlite:////x.db", release)
    assert Callers.from_env(env).identify(f"Bearer {tokens[LOCAL_CALLER]}".encode()) == LOCAL_CALLER


def test_the_tokens_helper_writes_a_private_file(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "t.json", ("x", "y"))
    assert (tmp_path / "t.json").stat().st_mode & 0o777 == 0o600
    assert read_tokens(tmp_path / "t.json") == tokens and len(set(tokens.values())) == 2


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The regressor's service in process (stub model, own metrics registry), with two callers' tokens."""
    from loopform.serving import bento

    env, headers = token_env(tmp_path / "tokens.json", ("alice", "bob"))
    counted = stub_regressor(tmp_path, monkeypatch, **env)
    return bento.model_service(ETA), headers, counted, tmp_path / "payloads"


def test_every_api_needs_a_token_and_nothing_else_does(service: Any) -> None:
    from loopform.payloads import read_payloads

    svc, headers, counted, payloads = service
    own = {name: TRIP[name] for name in ETA.event_features}
    bodies = {"/predict": TRIP, "/predict_batch": {"events": [TRIP]}, "/predict_driver": {"driver_id": 1, **own}}
    with in_process(svc) as client:
        for path, body in bodies.items():
            for sent in ({}, {"Authorization": "Bearer " + "z" * 20}, {"Authorization": headers["alice"] + "x"}):
                response = client.post(path, json=body, headers=sent)
                assert response.status_code == 401, (path, sent, response.text)
                assert response.json()["error"].startswith("unauthorized: ")
                assert response.headers["www-authenticate"].startswith("Bearer")
            # A malformed body from an unknown caller is a 401 too: its body is never read.
            assert client.post(path, content=b"{not json", headers={"Authorization": "Bearer no"}).status_code == 401
        missing = client.post("/predict", json=TRIP).json()["error"]
        assert "missing Authorization header" in missing
        for path in ("/healthz", "/livez", "/readyz", "/docs.json"):
            assert client.get(path).status_code == 200, path
        assert (
            client.post(
                "/predict", json={**TRIP, "trip_id": "t-a"}, headers={"Authorization": headers["alice"]}
            ).status_code
            == 200
        )
        batch = client.post("/predict_batch", json={"events": [TRIP, TRIP]}, headers={"Authorization": headers["bob"]})
        assert batch.status_code == 200
        assert (
            client.post("/predict", json={**TRIP, "stops": 0}, headers={"Authorization": headers["bob"]}).status_code
            == 400
        )
    # Nothing of the refused requests was scored or logged; each row names its authenticated caller.
    rows = read_payloads(str(payloads), "eta")
    assert sorted(rows["caller"]) == ["alice", "bob", "bob"]
    assert rows.loc[rows["caller"] == "alice", "trip_id"].tolist() == ["t-a"]  # the request's own caller id stays
    assert counted.predictions.labels(model="eta", version="4", api="predict")._value.get() == 1
    assert counted.predictions.labels(model="eta", version="4", api="predict_batch")._value.get() == 2
