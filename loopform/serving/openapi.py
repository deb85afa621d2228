"""The service's OpenAPI document as the service answers: every error status and its body, and the bearer token.

BentoML 1.4 documents 400, 404 and 500 on each API with a body `{error, detail: string}`, while its 400s carry
pydantic's error list in `detail` and its other 4xx a list, and it knows nothing of the 401, 413 and 415 answered
before it (`loopform.serving.auth`, `loopform.serving.limits`). Clients and the fuzzing test
(tests/test_service_fuzz.py, Schemathesis) check answers against this document, so `documented` rewrites it:
one `Error` schema (`error`, and `detail` as a message or a list of `{loc, msg, type}`), used by 400, 401, 404,
413, 415, 500 and 503, and a description of the bearer token on each API. BentoML's document model has no
security schemes (`Components` lacks `securitySchemes`), so the token is described in words.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

ERROR_SCHEMA = "Error"
#: Status -> description of the error answers an API may give.
ERRORS = {
    "400": "Malformed request: `detail` lists each problem with its field (`loc`).",
    "401": "Missing or unknown bearer token (`Authorization: Bearer <token>`).",
    "404": "Unknown entity: the online store holds no features for it (`detail[0].loc` names the field).",
    "413": "Request body over the service's limit (LOOPFORM_MAX_BODY_BYTES; `limit` gives it in bytes).",
    "415": "Content type other than application/json.",
    "500": "Unexpected error (see the server log).",
    "503": "The by-entity API without an online feature store.",
}
AUTH_NOTE = "Needs `Authorization: Bearer <token>`: a caller's token from the service's tokens file."


def error_schema() -> dict[str, Any]:
    """The body of every error answer."""
    problem = {
        "type": "object",
        "required": ["loc", "msg"],
        "properties": {
            "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "msg": {"type": "string"},
            "type": {"type": "string"},
        },
    }
    return {
        "type": "object",
        "title": ERROR_SCHEMA,
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "detail": {"anyOf": [{"type": "string"}, {"type": "array", "items": problem}]},
            "limit": {"type": "integer"},
            "field": {"type": "string"},
        },
    }


def documented(spec: dict[str, Any], protected: Collection[str]) -> dict[str, Any]:
    """`spec` (BentoML's OpenAPI document as a dict) with the error answers and the token of `protected` APIs."""
    spec = copy.deepcopy(spec)
    spec.setdefault("components", {}).setdefault("schemas", {})[ERROR_SCHEMA] = error_schema()
    reference = {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}
    for path in protected:
        for operation in spec["paths"].get(path, {}).values():
            responses = {str(status): answer for status, answer in operation["responses"].items()}
            for status, description in ERRORS.items():
                responses[status] = {"description": description, "content": {"application/json": {"schema": reference}}}
            operation["responses"] = responses
            operation["description"] = f"{operation.get('description') or ''}\n\n{AUTH_NOTE}".strip()
    return spec
