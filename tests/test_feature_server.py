"""The Feast feature server serves reads only (issue 16): the review's anonymous write, tried on the real server.

The review rewrote a card's online profile with one anonymous POST to `feast serve`'s `/write-to-online-store`.
Here the command the rendered Deployment runs starts for real on localhost, over a local feature repo
(SQLite online store, materialised up to a cutoff): reads answer with the card's features, every write route
answers 404 and the card's row is unchanged afterwards, and Feast's metrics are still served. The same requests
against stock Feast's app write, so the refusal is the server's doing, not a malformed request.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from components.feature_store import FEAST_METRICS_PORT, FeatureStore, FeatureStoreArgs, feature_files
from components.registry import DatabaseEndpoint
from loopform import feature_server
from loopform.features import FeatureRepo
from loopform.render import render_components
from loopform.spec import FeatureServer, FeatureStoreSpec
from models.fraud import data
from models.fraud.contract import CONTRACT
from tests.helpers_serving import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VIEW = "card_aggregates"
#: The review's rewrite: a stolen card made to look like a quiet one.
FORGED = {"txn_count_24h": 1, "avg_amount_30d": 1.0, "card_age_days": 1}
WRITE_ROUTES = ("/write-to-online-store", "/push", "/materialize", "/materialize-incremental")


def rendered_server_container(port: int = 6566) -> dict[str, Any]:
    """The feature server Deployment's container, rendered by the real component under Pulumi mocks."""
    args = FeatureStoreArgs(
        spec=FeatureStoreSpec(server=FeatureServer(port=port)),
        feature_files=feature_files(ROOT, {"fraud": "models/fraud"}),
        registry_database=DatabaseEndpoint("db", 5432, None, "db-admin"),
        registry_password="pw",
        redis_password="redis-token",
        prometheus_release="prometheus",
    )
    resources = {r.name: r.inputs for r in render_components(lambda: FeatureStore("fs", args))}
    (container,) = resources["fs-server"]["spec"]["template"]["spec"]["containers"]
    return container


def test_the_deployment_runs_the_read_only_server() -> None:
    container = rendered_server_container(port=7000)
    command = [*container["command"], *container.get("args", [])]
    assert command[:3] == ["python", "-m", "loopform.feature_server"]
    assert "feast" not in command and "serve" not in command
    args = feature_server.parser().parse_args(command[3:])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # Listens where the Service and the ServiceMonitor point, metrics included.
    assert (args.host, args.port, args.metrics, args.metrics_port) == ("0.0.0.0", 7000, True, FEAST_METRICS_PORT)
    assert ports == {"http": 7000, "metrics": FEAST_METRICS_PORT}
    # The probes call a route the read-only server keeps.
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in feature_server.READ_ROUTES


def test_a_feast_without_a_read_route_fails_at_start() -> None:
    """A Feast that renamed a read route stops the server, rather than serving without it."""
    from fastapi import FastAPI

    app = FastAPI()
    app.post("/get-online-features")(lambda: None)
    app.post("/write-to-online-store")(lambda: None)
    with pytest.raises(RuntimeError, match="/health"):
        feature_server.read_only(app)


@pytest.fixture(scope="module")
def source() -> pd.DataFrame:
    frame = data.generate(600, seed=4, cards=20)
    return frame.drop_duplicates([data.ENTITY, data.TIMESTAMP]).reset_index(drop=True)


@pytest.fixture(scope="module")
def cutoff(source: pd.DataFrame) -> pd.Timestamp:
    """What is online: rows up to the middle of the data, so `/materialize*` would have later rows to load."""
    return source[data.TIMESTAMP].sort_values().iloc[len(source) // 2]


def profile_as_of(source: pd.DataFrame, card: int, moment: pd.Timestamp) -> dict[str, Any]:
    """Oracle: the card's features in its latest source row at or before `moment`."""
    rows = source[(source[data.ENTITY] == card) & (source[data.TIMESTAMP] <= moment)]
    row = rows.sort_values(data.TIMESTAMP).iloc[-1]
    return {name: row[name].item() for name in data.CARD_FEATURES}


@pytest.fixture(scope="module")
def card(source: pd.DataFrame, cutoff: pd.Timestamp) -> int:
    """A card whose online profile differs from the forged one and from its latest row (what a materialise loads)."""
    end = source[data.TIMESTAMP].max()
    for candidate in sorted(source.loc[source[data.TIMESTAMP] <= cutoff, data.ENTITY].unique()):
        online = profile_as_of(source, int(candidate), cutoff)
        if online != profile_as_of(source, int(candidate), end) and all(online[k] != v for k, v in FORGED.items()):
            return int(candidate)
    raise AssertionError("no card fits: change the generated data")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, source: pd.DataFrame, cutoff: pd.Timestamp) -> FeatureRepo:
    repo = FeatureRepo(tmp_path_factory.mktemp("feast") / "repo", CONTRACT)
    repo.write(source)
    repo.apply()
    repo.materialize(cutoff.to_pydatetime())
    return repo


def attacks(card: int, end: pd.Timestamp) -> dict[str, dict[str, Any]]:
    """Anonymous write requests, by route, in the bodies stock Feast accepts."""
    rows = {data.ENTITY: [card], data.TIMESTAMP: [pd.Timestamp.now(tz="UTC").isoformat()]}
    rows |= {name: [value] for name, value in FORGED.items()}
    return {
        "/write-to-online-store": {"feature_view_name": VIEW, "df": rows},
        "/push": {"push_source_name": f"{VIEW}_push", "df": rows, "to": "online"},
        "/materialize": {"start_ts": "1970-01-02T00:00:00", "end_ts": end.isoformat()},
        "/materialize-incremental": {"end_ts": end.isoformat()},
    }


def read(post: Callable[..., httpx.Response], card: int) -> dict[str, Any]:
    """The card's profile through `/get-online-features` (the feature service's features, by name)."""
    response = post(
        "/get-online-features", json={"feature_service": CONTRACT.feature_service, "entities": {data.ENTITY: [card]}}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    names = body["metadata"]["feature_names"]
    values = {name: result["values"][0] for name, result in zip(names, body["results"], strict=True)}
    return {name: values[name] for name in data.CARD_FEATURES}


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes]) -> None:
    """Poll until `condition` holds; the generous deadline only keeps a broken run from hanging."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the feature server exited ({process.returncode}) before {what}"
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    client: httpx.Client
    """Of the feature server's port."""
    metrics_url: str


@pytest.fixture(scope="module")
def server(repo: FeatureRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The rendered container's command, on free localhost ports, in the repo (its working directory there)."""
    container = rendered_server_container()
    port, metrics_port = free_port(), free_port()
    command = [*container["command"], *container.get("args", [])]
    command += ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port)]
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "FEAST_USAGE": "False", "HOME": str(home)}
    log = (home / "server.log").open("wb")
    process = subprocess.Popen(
        command, cwd=repo.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        wait_for(lambda: client.get("/health").status_code == 200, "/health", process)
        yield Server(process, client, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        client.close()
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.mark.slow
def test_reads_answer_with_the_online_profile(server, source, cutoff, card) -> None:
    assert read(server.client.post, card) == pytest.approx(profile_as_of(source, card, cutoff))
    assert server.client.get("/health").status_code == 200


@pytest.mark.slow
def test_the_reviews_anonymous_rewrite_is_refused_and_the_profile_unchanged(server, repo, source, cutoff, card) -> None:
    client = server.client
    online = profile_as_of(source, card, cutoff)
    assert read(client.post, card) == pytest.approx(online)
    for route, body in attacks(card, source[data.TIMESTAMP].max()).items():
        response = client.post(route, json=body)
        # Starlette's own answer for a path with no route, not a Feast error about the request.
        assert (response.status_code, response.json()) == (404, {"detail": "Not Found"}), route
    assert read(client.post, card) == pytest.approx(online)
    # And in the online store itself, read through the SDK.
    stored = repo.online([card]).iloc[0]
    assert {name: stored[name].item() for name in data.CARD_FEATURES} == pytest.approx(online)


@pytest.mark.slow
def test_only_the_read_routes_are_served(server, repo) -> None:
    """Every route of stock Feast's app but the reads answers 404 (405 for a read path with another method)."""
    from feast.feature_server import get_app

    client = server.client
    stock = get_app(repo.store)
    paths = {route.path: getattr(route, "methods", None) or {"GET"} for route in stock.routes}
    assert set(WRITE_ROUTES) | feature_server.READ_ROUTES <= set(paths)
    for path, methods in paths.items():
        url = re.sub(r"\{[^}]+\}", "x", path)
        for method in methods - {"HEAD"}:
            status = client.request(method, url).status_code
            assert status == (200 if path == "/health" else 422 if path in feature_server.READ_ROUTES else 404), (
                method,
                path,
            )
    assert client.get("/get-online-features").status_code == 405


@pytest.mark.slow
def test_feasts_metrics_are_still_served(server, card) -> None:
    read(server.client.post, card)

    def scraped() -> bool:
        text = httpx.get(server.metrics_url, timeout=30).text
        return (
            f'feast_feature_freshness_seconds{{feature_view="{VIEW}"' in text
            and re.search(
                r'feast_feature_server_request_total\{endpoint="/get-online-features",status="success"\} [1-9]', text
            )
            is not None
        )

    wait_for(scraped, "Feast's freshness and request metrics", server.process)


@pytest.mark.slow
def test_stock_feast_takes_the_same_requests_as_writes(repo, source, cutoff, card, tmp_path: Path) -> None:
    """Control: on `feast serve`'s app (a copy of the repo), the same anonymous requests rewrite the card."""
    from fastapi.testclient import TestClient
    from feast import FeatureStore as Store
    from feast.feature_server import get_app

    copy = shutil.copytree(repo.workdir, tmp_path / "repo")
    requests = attacks(card, source[data.TIMESTAMP].max())
    with TestClient(get_app(Store(repo_path=str(copy)))) as client:
        assert read(client.post, card) == pytest.approx(profile_as_of(source, card, cutoff))
        response = client.post("/materialize-incremental", json=requests["/materialize-incremental"])
        assert response.status_code == 200, response.text
        latest = profile_as_of(source, card, source[data.TIMESTAMP].max())
        assert read(client.post, card) == pytest.approx(latest)
        response = client.post("/write-to-online-store", json=requests["/write-to-online-store"])
        assert response.status_code == 200, response.text
        assert read(client.post, card) == pytest.approx(FORGED)
