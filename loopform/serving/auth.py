"""Caller authentication of a model service: bearer tokens from a file, checked before anything is parsed,
scored or logged.

The tokens file (env LOOPFORM_API_TOKENS_FILE; on the cluster a Secret's `tokens.json` mounted at
/var/run/secrets/loopform/api/tokens.json) is a JSON object `{"<caller name>": "<token>", ...}`. Callers send
`Authorization: Bearer <token>` on every API route; health, /metrics and the OpenAPI document stay open
(kubelet probes and Prometheus carry no token). A missing or wrong token is a 401 with a JSON body, before the
body is read. Every configured token is compared in constant time (`hmac.compare_digest`), all of them on every
request, so the answer's timing tells nothing about which token came close.

The caller's name is kept for the request in a context variable (`current_caller`), which the scorer writes into
each payload row (`caller`), so the drift monitor can weigh traffic by who sent it (`loopform.monitor`). The file
is re-read when it changes (a rotated Secret), at most once a second; a file that turns unreadable keeps the
tokens last read and logs why.

Without the variable a service refuses to start, unless LOOPFORM_ALLOW_ANONYMOUS=true says so explicitly: then
every request is the caller `anonymous`. A silent fallback to open would turn a missing mount into open writes to
the payload log the monitor acts on.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_TOKENS_FILE = "LOOPFORM_API_TOKENS_FILE"
ENV_ALLOW_ANONYMOUS = "LOOPFORM_ALLOW_ANONYMOUS"
#: Where the ModelService component mounts the tokens Secret's `tokens.json`.
CLUSTER_TOKENS_FILE = "/var/run/secrets/loopform/api/tokens.json"
ANONYMOUS = "anonymous"
#: Shortest token accepted: a guessable token is no authentication.
MIN_TOKEN_CHARS = 16
_RELOAD_SECONDS = 1.0

_CALLER: ContextVar[str | None] = ContextVar("loopform_caller", default=None)

ASGIApp = Callable[..., Any]


class TokensError(RuntimeError):
    """The service's caller configuration is missing or invalid: it must not start."""


def current_caller() -> str | None:
    """The authenticated caller of the request being served (None outside a request: tests, the bench)."""
    return _CALLER.get()


def read_tokens(path: str | os.PathLike[str]) -> dict[str, str]:
    """`{caller: token}` from a tokens file, validated: names and tokens non-empty strings, tokens long and unique."""
    source = Path(path)
    try:
        loaded = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokensError(f"cannot read the API tokens file {source} ({ENV_TOKENS_FILE}): {error}") from None
    if not isinstance(loaded, dict) or not loaded:
        raise TokensError(f"{source} must hold a JSON object {{caller: token}} with at least one caller")
    for name, token in loaded.items():
        if not name or not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise TokensError(
                f"{source}: caller {name!r} needs a token string of at least {MIN_TOKEN_CHARS} characters"
            )
        if name == ANONYMOUS:
            raise TokensError(f"{source}: {ANONYMOUS!r} is the name of unauthenticated traffic, not a caller")
    if len(set(loaded.values())) != len(loaded):
        raise TokensError(f"{source}: two callers share a token, so the payload log could not tell them apart")
    return dict(loaded)


def anonymous_allowed(environ: Mapping[str, str]) -> bool:
    return environ.get(ENV_ALLOW_ANONYMOUS, "").strip().lower() == "true"


def describe(environ: Mapping[str, str] | None = None) -> str:
    """How the service will authenticate callers (for start-up messages); raises TokensError if it must not start."""
    callers = Callers.from_env(environ)
    if callers.path is None:
        return f"anonymous callers allowed ({ENV_ALLOW_ANONYMOUS}=true): every request is caller {ANONYMOUS!r}"
    return f"callers authenticated by bearer token ({len(callers.tokens)} in {callers.path})"


class Callers:
    """Who may call: the tokens file's callers, or everyone as `anonymous` when explicitly allowed."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.tokens: list[tuple[str, bytes]] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if path is not None:
            self._load(read_tokens(path), self._file_stamp())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Callers:
        environ = os.environ if environ is None else environ
        named = environ.get(ENV_TOKENS_FILE)
        if named:
            return cls(Path(named))
        if anonymous_allowed(environ):
            return cls(None)
        raise TokensError(
            f"set {ENV_TOKENS_FILE} to a JSON file {{caller: token}} (the cluster mounts {CLUSTER_TOKENS_FILE}), "
            f"or {ENV_ALLOW_ANONYMOUS}=true to serve unauthenticated callers on purpose"
        )

    def identify(self, authorization: bytes | None) -> str | None:
        """The caller whose token the `Authorization` header carries, `anonymous` when allowed, else None."""
        if self.path is None:
            return ANONYMOUS
        self._maybe_reload()
        scheme, _, token = (authorization or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        token = token.strip()
        found = None
        for name, expected in self.tokens:  # every token, always: no early exit
            if hmac.compare_digest(token, expected):
                found = name
        return found

    def _load(self, tokens: Mapping[str, str], stamp: tuple[int, int, int] | None) -> None:
        self.tokens = [(name, token.encode()) for name, token in tokens.items()]
        self._stamp = stamp

    def _file_stamp(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < _RELOAD_SECONDS:
            return
        with self._lock:
            if now - self._checked < _RELOAD_SECONDS:
                return
            self._checked = now
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            try:
                self._load(read_tokens(self.path), stamp)  # type: ignore[arg-type]
                log.info("reloaded %d API tokens from %s", len(self.tokens), self.path)
            except TokensError as error:
                log.error("keeping the API tokens last read: %s", error)


class BearerAuth:
    """ASGI middleware: requests to `protected` paths need a known bearer token (401 otherwise), and the caller's
    name is set for the rest of the request (`current_caller`). Other paths pass untouched."""

    def __init__(self, app: ASGIApp, *, protected: Collection[str], callers: Callers | None = None) -> None:
        self.app = app
        self.protected = frozenset(protected)
        # Read here, when the server builds its app: a misconfigured service fails its start, never a request.
        self.callers = callers if callers is not None else Callers.from_env()

    async def __call__(self, scope: dict[str, Any], receive: ASGIApp, send: ASGIApp) -> None:
        if scope["type"] != "http" or scope["path"] not in self.protected:
            await self.app(scope, receive, send)
            return
        header = next((value for key, value in scope["headers"] if key == b"authorization"), None)
        caller = self.callers.identify(header)
        if caller is None:
            problem = "missing Authorization header" if header is None else "unknown or malformed bearer token"
            await json_error(
                send,
                401,
                {"error": f"unauthorized: {problem}", "detail": "send `Authorization: Bearer <token>`"},
                [(b"www-authenticate", b'Bearer realm="loopform"')],
            )
            return
        _CALLER.set(caller)  # this request's task only: each request runs in a task of its own
        await self.app(scope, receive, send)


async def json_error(
    send: ASGIApp, status: int, body: Mapping[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer a request with a JSON error and close the connection (its body may be left unread)."""
    content = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})
