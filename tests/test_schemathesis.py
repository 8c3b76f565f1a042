"""Property-based requests against the server's own OpenAPI schema (Schemathesis), with the
API key, on every endpoint: no 5xx, and responses conform to what the schema declares.
Generation is bounded by a short context (--max-model-len 48) so random max_tokens stay cheap."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.server_utils import ServerProcess

KEY = "schema-key-1234"


@pytest.fixture(scope="module")
def api_schema():
    srv = ServerProcess("--max-model-len", "48", "--max-num-seqs", "8", api_key=KEY)
    try:
        yield schemathesis.openapi.from_url(srv.url + "/openapi.json", headers=srv.headers)
    finally:
        srv.stop()


def test_api_never_5xx_and_conforms(api_schema):
    """Each operation of the schema, 25 generated requests (Hypothesis shrinks a failure to a
    minimal request). Driven directly rather than by Schemathesis's pytest plugin, whose lazy
    fixture loading does not work with pytest 9."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/responses/{response_id}",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/tokenize",
        "/detokenize",
        "/health",
    }
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case):
            case.call_and_validate(
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=120,
                checks=[not_a_server_error, response_schema_conformance, content_type_conformance],
            )

        check()
