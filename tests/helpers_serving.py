"""Shared by the tests and benchmarks that run a service as a process."""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loopform.serving.auth import ENV_TOKENS_FILE

#: The caller the tests' traffic authenticates as.
CALLER = "tests"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_tokens(path: Path, callers: tuple[str, ...] = (CALLER,)) -> dict[str, str]:
    """A tokens file (0600) with a fresh token per caller: `{caller: token}`, as the service reads it."""
    tokens = {name: secrets.token_urlsafe(24) for name in callers}
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(tokens, out)
    return tokens


def token_env(path: Path, callers: tuple[str, ...] = (CALLER,)) -> tuple[dict[str, str], dict[str, str]]:
    """(the service's environment naming a new tokens file at `path`, `{caller: Authorization header}`)."""
    tokens = write_tokens(path, callers)
    return {ENV_TOKENS_FILE: str(path)}, {name: f"Bearer {token}" for name, token in tokens.items()}


@contextmanager
def in_process(service: Any) -> Iterator[Any]:
    """A TestClient of `service`'s ASGI app, as BentoML's worker serves it.

    BentoML's HTTP metrics register in the process's default Prometheus registry when an app first answers, so a
    second app in one process would collide: their collectors are removed before and after (test-only; the
    registry has no public way to list collectors).
    """
    from starlette.testclient import TestClient

    _forget_bentoml_metrics()
    try:
        with TestClient(service.to_asgi()) as client:
            yield client
    finally:
        _forget_bentoml_metrics()


def _forget_bentoml_metrics() -> None:
    from prometheus_client import REGISTRY

    collectors = {c for name, c in REGISTRY._names_to_collectors.items() if name.startswith("bentoml_")}
    for collector in collectors:
        REGISTRY.unregister(collector)
