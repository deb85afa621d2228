"""The in-cluster Redis requires its password, and what the platform gives clients authenticates: checked on a
real redis-server (Debian's `redis-server`, which `.ci/run` installs) started with the rendered arguments, the
config file the Secret holds and the StatefulSet's probe command, and with Feast's own connection-string parser."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.feature_store import REDIS_AUTH_DIR, REDIS_PING, redis_config, redis_connection_string
from loopform.spec import InClusterRedis

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None and not os.environ.get("CI"), reason="redis-server missing (apt-get install redis-server)"
)
PASSWORD = "0f3c9a7e5d1b2c4a6e8f0a1b3c5d7e9f1a2b3c4d"


def _statefulset(rendered) -> dict[str, Any]:
    (redis,) = [r.manifest() for r in rendered("dev") if r.kind == "StatefulSet" and "redis" in r.name]
    return redis


def test_the_redis_pod_reads_its_password_from_files_only(rendered) -> None:
    pod = _statefulset(rendered)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == f"{REDIS_AUTH_DIR}/redis.conf"
    assert "env" not in container  # no secret in the environment
    assert {"name": "auth", "mountPath": REDIS_AUTH_DIR, "readOnly": True} in container["volumeMounts"]
    (auth,) = [v for v in pod["volumes"] if v["name"] == "auth"]
    assert auth["secret"]["secretName"].endswith("-redis-auth")
    assert container["readinessProbe"]["exec"]["command"] == REDIS_PING


@pytest.fixture
def server(tmp_path: Path, rendered) -> Iterator[int]:
    assert REDIS_SERVER, "redis-server missing: apt-get install redis-server"
    auth, data = tmp_path / "auth", tmp_path / "data"
    auth.mkdir()
    data.mkdir()
    (auth / "redis.conf").write_text(redis_config(PASSWORD))
    (auth / "password").write_text(PASSWORD)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (container,) = _statefulset(rendered)["spec"]["template"]["spec"]["containers"]
    args = [a.replace(REDIS_AUTH_DIR, str(auth)).replace("/data", str(data)) for a in container["args"]]
    process = subprocess.Popen(
        [REDIS_SERVER, *args, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


@needs_redis
def test_anonymous_clients_are_refused_and_the_platforms_connect(server: int, tmp_path: Path) -> None:
    import redis
    from feast.infra.online_stores.redis import RedisOnlineStore

    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server).ping()
    with pytest.raises(redis.exceptions.AuthenticationError, match="Authentication required"):
        redis.Redis(host="127.0.0.1", port=server).set("card:1", "x")  # a write that would rewrite a profile
    # Feast's parser, on the connection string the platform puts in the online-store Secret.
    connection = redis_connection_string(InClusterRedis(), PASSWORD, "127.0.0.1")
    nodes, params = RedisOnlineStore._parse_connection_string(connection)
    client = redis.Redis(host=nodes[0]["host"], port=server, **params)
    assert client.ping() and client.set("card:1", "x")
    # The StatefulSet's probe authenticates from the mounted password file, and fails without it.
    probe = REDIS_PING[2].replace(REDIS_AUTH_DIR, str(tmp_path / "auth")).replace("redis-cli", f"redis-cli -p {server}")
    assert subprocess.run(["sh", "-c", probe], capture_output=True, text=True).stdout.strip() == "PONG"
    wrong = probe.replace(str(tmp_path / "auth"), str(tmp_path / "missing"))
    assert subprocess.run(["sh", "-c", wrong], capture_output=True, text=True).stdout.strip() != "PONG"
