"""Request limits of a model service, enforced before BentoML parses a body.

- Body size: at most LOOPFORM_MAX_BODY_BYTES (default `DEFAULT_MAX_BODY_BYTES`, 16 MiB). A declared
  Content-Length over it is a 413 before a byte is read; a chunked body is counted while it streams and is a
  413 as soon as it passes the limit, so a worker never holds more than the limit of one request body
  (a 300 MiB body used to be parsed in full, and three of them killed a 1 GiB pod).
- Content type: API routes take JSON only. BentoML would parse any other type as JSON anyway (or as a form, or
  refuse pickle with 415), so the service says so up front: 415 naming the type. A request without a
  Content-Type is JSON, as BentoML reads it.

The batch size stays a schema rule (`schemas.MAX_BATCH_ROWS`, a 400 naming `events`). The default limit fits the
largest allowed batch with room to spare: 10,000 rows of the fraud or delivery contract, each with a 200-character
caller id, are about 5 MB of JSON (tests/test_service_limits.py measures it).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any

from loopform.serving.auth import ASGIApp, json_error

ENV_MAX_BODY_BYTES = "LOOPFORM_MAX_BODY_BYTES"
DEFAULT_MAX_BODY_BYTES = 16 * 2**20
JSON_TYPES = ("application/json",)


def max_body_bytes(environ: Mapping[str, str] | None = None) -> int:
    """The body limit the environment sets (LOOPFORM_MAX_BODY_BYTES), else the default."""
    environ = os.environ if environ is None else environ
    text = environ.get(ENV_MAX_BODY_BYTES, "").strip()
    if not text:
        return DEFAULT_MAX_BODY_BYTES
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{ENV_MAX_BODY_BYTES}={text!r} must be a positive number of bytes")
    return int(text)


class BodyLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes (declared or streamed), 415 for non-JSON bodies on
    `json_paths`."""

    def __init__(self, app: ASGIApp, *, json_paths: Collection[str], limit: int | None = None) -> None:
        self.app = app
        self.json_paths = frozenset(json_paths)
        self.limit = max_body_bytes() if limit is None else limit

    async def __call__(self, scope: dict[str, Any], receive: ASGIApp, send: ASGIApp) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = content_type = None
        chunked = False
        for key, value in scope["headers"]:
            if key == b"content-length":
                length = value
            elif key == b"content-type":
                content_type = value
            elif key == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        if length is not None and length.isdigit() and int(length) > self.limit:  # h11 refuses a malformed one
            await self._too_large(send, f"Content-Length {length.decode(errors='replace')!r}")
            return
        if content_type is not None and scope["path"] in self.json_paths:
            media = content_type.split(b";", 1)[0].strip().lower().decode(errors="replace")
            if media not in JSON_TYPES:
                await json_error(
                    send,
                    415,
                    {"error": f"unsupported content type {media!r}: send application/json", "field": "content-type"},
                )
                return
        if length is not None or not chunked:  # h11 reads exactly Content-Length bytes: nothing more can arrive
            await self.app(scope, receive, send)
            return
        # A chunked body: read it here, counting, and hand it on only when it fits. Buffering is bounded by the
        # limit, and the app's own read of a JSON body would hold it all anyway.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(send, f"a chunked body of more than {self.limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send: ASGIApp, what: str) -> None:
        await json_error(
            send,
            413,
            {
                "error": f"request body too large: {what}; the limit is {self.limit} bytes ({ENV_MAX_BODY_BYTES})",
                "limit": self.limit,
            },
        )
