"""Fuzz every operation of the gateway's OpenAPI schema over a real uvicorn: never a 5xx, no hang.

Valid and invalid (negative) cases alike. Two runs: one with a valid key (requests reach
validation, sessions and the backend) and one
without (everything must be a clean 401). The fake backend keeps each call cheap; examples are
bounded so the whole module runs in well under a minute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis

# Loaded at collection, not inside the test: schemathesis is a pytest plugin, so its modules are
# assertion-rewritten (ast.parse) on first import, and on CPython 3.11 a ResourceWarning raised by
# the garbage collector during that parse turns into "AST constructor recursion depth mismatch".
import schemathesis.specs.openapi.schemas
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from expert_gateway.app import create_app
from expert_gateway.keys import KeyStore

from .conftest import FakeBackend, gateway_settings, serve

FUZZ_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    keys_file = tmp_path_factory.mktemp("fuzz") / "keys.json"
    _, secret = KeyStore(keys_file).add("fuzz", requests_per_minute=1_000_000)
    app = create_app(gateway_settings(keys_file, server={"max_body_bytes": 65536, "api_docs": True}),
                     backend=FakeBackend())
    with serve(app) as url:
        yield url, secret


def _fuzz(url: str, headers: dict[str, str], check: Callable[[schemathesis.Case, Any], None]) -> int:
    """Run bounded Hypothesis examples of every operation; returns how many operations ran."""
    # schemathesis' pytest plugin does not support pytest 9 yet: drive its strategies directly.
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        strategy = (operation.as_strategy(GenerationMode.POSITIVE)
                    | operation.as_strategy(GenerationMode.NEGATIVE))

        @FUZZ_SETTINGS
        @given(case=strategy)
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=url, headers=headers, timeout=30)
            assert response.status_code < 500, (case.method, case.path, response.text)
            check(case, response)

        run()
        operations += 1
    return operations


def test_no_server_errors_with_a_valid_key(fuzz_target: tuple[str, str]) -> None:
    url, secret = fuzz_target

    def errors_are_json(case: schemathesis.Case, response: Any) -> None:
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}

    assert _fuzz(url, {"Authorization": f"Bearer {secret}"}, errors_are_json) == 5


def test_no_server_errors_without_a_key(fuzz_target: tuple[str, str]) -> None:
    url, _ = fuzz_target

    def refused(case: schemathesis.Case, response: Any) -> None:
        if case.path.startswith("/v1/"):
            assert response.status_code == 401

    assert _fuzz(url, {}, refused) == 5
