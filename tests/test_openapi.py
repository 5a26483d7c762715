"""GET /openapi.json: a valid OpenAPI 3.1 document, generated from the server's own types.

The run of schemathesis against a real server from this document is in
tests/e2e_schemathesis/.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from ingestor.model import BatchView, ErrorBody, IngestReport, PulseIn
from ingestor.openapi import openapi_path
from ingestor.reads import AggregateParams
from ingestor.routes import OPERATIONS


@pytest.fixture
async def doc(client: Client) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.content_type == "application/json"
    body: dict[str, Any] = await response.get_json()
    return body


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


async def test_top_level_keys(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1.")
    assert {"title", "version"} <= doc["info"].keys()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        **doc["components"]["securitySchemes"]["bearer"],
        "type": "http",
        "scheme": "bearer",
    }
    assert doc["security"] == [{"bearer": []}]


async def test_the_document_validates_against_the_openapi_31_schema(
    doc: dict[str, Any],
) -> None:
    definitions = pytest.importorskip("schemathesis.specs.openapi.definitions")
    errors = [str(error) for error in definitions.OPENAPI_31_VALIDATOR.iter_errors(doc)]
    assert errors == []


async def test_every_route_of_the_app_is_described(app: Quart, doc: dict[str, Any]) -> None:
    routes = {
        (openapi_path(rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    described = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routes == described
    assert len(routes) == len(OPERATIONS) == 11
    assert ("/batches/{batch_id}/redeliver", "post") in routes


async def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    found = list(refs(doc))
    assert found
    for ref in found:
        assert isinstance(resolve(doc, ref), dict), ref


async def test_patterns_are_ecma_regexes(doc: dict[str, Any]) -> None:
    text = json.dumps(doc)
    assert "\\\\A" not in text
    assert "\\\\Z" not in text
    pulse = doc["components"]["schemas"]["PulseIn"]["properties"]
    assert pulse["tenant_id"]["pattern"] == "^[^\\x00-\\x1f\\x7f-\\x9f]+$"


async def test_schemas_are_those_msgspec_generates(doc: dict[str, Any]) -> None:
    _, generated = msgspec.json.schema_components(
        [IngestReport, BatchView], ref_template="#/components/schemas/{name}"
    )
    for name in ("IngestReport", "IngestItem", "BatchView", "BatchRecord"):
        assert doc["components"]["schemas"][name] == json.loads(
            json.dumps(generated[name]).replace("\\\\A", "^").replace("\\\\Z", "$")
        ), name
    amount = doc["components"]["schemas"]["PulseIn"]["properties"]["used_amount"]
    assert amount["anyOf"] == [
        {"type": "number", "minimum": 0},
        {
            "type": "string",
            "format": "decimal",
            "pattern": "^(?:0|[1-9][0-9]*)(?:\\.[0-9]+)?(?:[eE][+-]?[0-9]+)?$",
        },
    ]
    assert "9 fractional digits" in amount["description"]
    assert set(doc["components"]["schemas"]["PulseIn"]["required"]) == {
        f for f in PulseIn.__struct_fields__ if f not in ("id", "timestamp")
    }


async def test_every_operation_documents_its_errors(doc: dict[str, Any]) -> None:
    error_ref = "#/components/schemas/ErrorBody"
    for path, item in doc["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            responses = op["responses"]
            assert responses["500"]["content"]["application/json"]["schema"] == {
                "$ref": error_ref
            }, where
            assert "X-Request-Id" in responses["500"]["headers"], where
            public = op.get("security") == []
            if not public:
                for status in ("401", "403", "503"):
                    schema = responses[status]["content"]["application/json"]["schema"]
                    assert schema == {"$ref": error_ref}, (where, status)
                assert "WWW-Authenticate" in responses["401"]["headers"]
                assert "Retry-After" in responses["503"]["headers"]
            assert op["operationId"]
            assert "Key role:" in op["description"]
    assert set(resolve(doc, error_ref)["properties"]) == set(ErrorBody.__struct_fields__)


async def test_query_parameters_come_from_the_query_structs(doc: dict[str, Any]) -> None:
    params = {p["name"]: p for p in doc["paths"]["/aggregates"]["get"]["parameters"]}
    encoded = {
        AggregateParams.__struct_encode_fields__[i]
        for i in range(len(AggregateParams.__struct_fields__))
    }
    assert set(params) == encoded | {"X-Request-Id"}
    assert {"from", "to"} <= set(params)
    assert params["status"]["schema"]["enum"] == ["all", "committed", "open"]
    assert params["limit"]["schema"]["maximum"] == 10_000
    assert all(p["in"] == "query" for name, p in params.items() if name != "X-Request-Id")
    pulses = {p["name"]: p for p in doc["paths"]["/pulses"]["get"]["parameters"]}
    assert pulses["tenant_id"]["required"]
    assert pulses["date"]["required"]
    assert not pulses["cursor"]["required"]
    batch = doc["paths"]["/batches/{batch_id}"]["get"]["parameters"][0]
    assert (batch["name"], batch["in"], batch["required"]) == ("batch_id", "path", True)


async def test_request_bodies(doc: dict[str, Any]) -> None:
    body = doc["paths"]["/pulses"]["post"]["requestBody"]
    assert body["required"] is True
    assert set(body["content"]) == {"application/json", "application/x-ndjson"}
    commit = doc["paths"]["/aggregates/commit"]["post"]["requestBody"]
    assert commit["required"] is False


async def test_public_operations_need_no_key(doc: dict[str, Any]) -> None:
    public = {
        path
        for path, item in doc["paths"].items()
        if item["get" if "get" in item else "post"].get("security") == []
    }
    assert public == {"/healthz", "/readyz", "/metrics", "/openapi.json"}
