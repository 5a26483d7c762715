"""GET /openapi.json: an OpenAPI 3.1 document made from the API's own types.

`api.OPERATIONS` lists every route with the msgspec types it decodes and
answers with; `document` turns that table into OpenAPI, with the schemas
from `msgspec.json.schema_components`, so the description cannot drift from
what the server does. Two translations, each because JSON Schema says a
thing differently from msgspec, not to describe anything by hand:

- patterns: msgspec matches with Python's `re` (`\\A...\\Z`); JSON Schema
  uses ECMA-262, where the same anchors are `^...$`.
- query parameters: a query Struct's fields become `in: query` parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import msgspec

from .auth import Need

__all__ = ["Answer", "Operation", "document", "openapi_path"]

_REF = "#/components/schemas/{name}"
_RULE_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


class Answer(msgspec.Struct, frozen=True):
    """One documented response: status, what it means, and its body's type."""

    status: int
    description: str
    body: Any = None  # a type; None: no body
    media_type: str | tuple[str, ...] = "application/json"  # several: chosen by Accept
    headers: tuple[str, ...] = ()  # names in HEADERS


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    """One route: how it is reached, who may call it, what it takes and answers."""

    method: Literal["GET", "POST"]
    rule: str  # the Quart rule, e.g. "/batches/<batch_id>"
    name: str  # the Quart endpoint and the operationId
    need: Need
    summary: str
    description: str = ""
    query: Any = None  # a Struct whose fields are the query parameters
    body: tuple[tuple[str, Any], ...] = ()  # (media type, type); a str type is raw text
    body_required: bool = True
    answers: tuple[Answer, ...] = ()


HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-Id": {
        "description": "The request's id: the client's X-Request-Id (sanitised) or a new one."
        " Log lines about the request carry it.",
        "required": True,
        "schema": {"type": "string", "maxLength": 128},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "WWW-Authenticate": {
        "description": "The Bearer challenge.",
        "required": True,
        "schema": {"type": "string"},
    },
}


def openapi_path(rule: str) -> str:
    """The OpenAPI path of a Quart rule: `/batches/<batch_id>` -> `/batches/{batch_id}`."""
    return _RULE_PARAM.sub(r"{\1}", rule)


def _schema_hook(kind: type) -> dict[str, Any]:
    if kind is object:
        return {"description": "any JSON value"}
    raise NotImplementedError


def _translate(node: Any) -> Any:
    """JSON Schema spellings of what msgspec says in Python terms (see the module doc)."""
    if isinstance(node, list):
        return [_translate(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _translate(value) for key, value in node.items()}
    pattern = out.get("pattern")
    if isinstance(pattern, str):
        if pattern.startswith("\\A"):
            pattern = "^" + pattern[2:]
        if pattern.endswith("\\Z"):
            pattern = pattern[:-2] + "$"
        out["pattern"] = pattern
    return out


def _types(operations: Iterable[Operation]) -> list[Any]:
    found: list[Any] = []
    for op in operations:
        if op.query is not None:
            found.append(op.query)
        found.extend(kind for _, kind in op.body if kind is not str)
        found.extend(a.body for a in op.answers if a.body not in (None, str))
    return list(dict.fromkeys(found))


def document(
    operations: Sequence[Operation], *, title: str, version: str, description: str
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `operations`."""
    kinds = _types(operations)
    schemas, components = msgspec.json.schema_components(
        kinds, schema_hook=_schema_hook, ref_template=_REF
    )
    schema_of = dict(zip(kinds, schemas, strict=True))
    # Query Structs become parameters, not components.
    inlined = {
        query: components.pop(schema_of[query]["$ref"].rpartition("/")[2])
        for query in dict.fromkeys(op.query for op in operations if op.query is not None)
    }

    def schema(kind: Any) -> dict[str, Any]:
        return {"type": "string"} if kind is str else dict(schema_of[kind])

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        path = openapi_path(op.rule)
        parameters: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _RULE_PARAM.findall(op.rule)
        ]
        if op.query is not None:
            struct = inlined[op.query]
            required = set(struct.get("required", ()))
            parameters.extend(
                {"name": name, "in": "query", "required": name in required, "schema": prop}
                for name, prop in struct["properties"].items()
            )
        parameters.append(
            {
                "name": "X-Request-Id",
                "in": "header",
                "required": False,
                "description": "An id for this request, echoed back and logged.",
                "schema": {"type": "string"},
            }
        )
        role = (
            "none (public)"
            if op.need == "public"
            else ("admin" if op.need == "admin" else f"{op.need} or admin")
        )
        entry: dict[str, Any] = {
            "operationId": op.name,
            "summary": op.summary,
            "description": (op.description + "\n\n" if op.description else "")
            + f"Key role: {role}.",
            "parameters": parameters,
            "responses": {
                str(a.status): _response(a, schema) for a in sorted(op.answers, key=_status)
            },
        }
        if op.need == "public":
            entry["security"] = []
        if op.body:
            entry["requestBody"] = {
                "required": op.body_required,
                "content": {media: {"schema": schema(kind)} for media, kind in op.body},
            }
        paths.setdefault(path, {})[op.method.lower()] = entry
    translated: dict[str, Any] = _translate(
        {
            "openapi": "3.1.0",
            "info": {"title": title, "version": version, "description": description},
            "paths": paths,
            "components": {
                "schemas": components,
                "securitySchemes": {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "An API key from the config file's [[api_keys]]."
                        " Without configured keys (open mode, loopback only) none is needed.",
                    }
                },
            },
            "security": [{"bearer": []}],
        }
    )
    return translated


def _status(answer: Answer) -> int:
    return answer.status


def _response(answer: Answer, schema: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": answer.description,
        "headers": {name: HEADERS[name] for name in ("X-Request-Id", *answer.headers)},
    }
    if answer.body is not None:
        given = answer.media_type
        out["content"] = {
            media: {"schema": schema(answer.body)}
            for media in ((given,) if isinstance(given, str) else given)
        }
    return out
