"""schemathesis against a real server, from the server's own /openapi.json.

Every operation gets positive cases (valid by the document) and negative
cases (invalid on purpose), sent over HTTP with an admin key. The run must
find no server error and no answer that contradicts the document: status
code, content type, required headers and body schema are all checked.

Bounded: at most MAX_EXAMPLES cases per operation and mode, no shrinking
(a failure is reported as found, with its curl command).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from tests.support.server import ServerProcess

from .conftest import KEY, StartServer

schemathesis = pytest.importorskip("schemathesis")

MAX_EXAMPLES = 30


def run_schemathesis(base_url: str) -> tuple[list[str], int]:
    """Problems found (empty if none) and the number of cases sent. Blocks."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    # NDJSON is lines of text: send a generated string as it is.
    schemathesis.serializer.alias("application/x-ndjson", "text/plain")
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    problems: list[str] = []
    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def exchange(case: Any) -> None:
                nonlocal sent
                sent += 1
                case.call_and_validate(
                    base_url=base_url,
                    headers={"Authorization": f"Bearer {KEY}"},
                    checks=checks,
                    timeout=10,
                )

            try:
                exchange()
            except Unsatisfiable:
                # Nothing to make invalid (e.g. GET /healthz takes no input).
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup
                problems.append(f"{operation.label} ({mode.value}):\n{exc}")
    return problems, sent


async def seed(server: ServerProcess) -> None:
    """Some usage and a committed day, so the listings have rows to show."""
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as http:
        pulses = [
            {"tenant_id": f"t{i}", "product_sku": "sku", "use_unit": "call", "used_amount": "1.5"}
            for i in range(20)
        ]
        assert (await http.post("/pulses", json=pulses)).status_code == 202
        day = (await http.get("/aggregates")).json()["aggregates"][0]["date"]
        assert (await http.post("/aggregates/commit", json={"date": day})).status_code == 200


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    start_server: StartServer,
) -> None:
    server = await start_server()
    await seed(server)
    problems, sent = await trio.to_thread.run_sync(run_schemathesis, server.url)
    assert problems == [], "\n\n".join(problems)
    assert sent >= 11 * MAX_EXAMPLES  # every operation was exercised
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"{server.url}/readyz")).status_code == 200
