"""The API keeps its OpenAPI contract: requests generated from /openapi.json (valid and
invalid ones) against a running server never get a 500, and every answer is one the
description documents, with its status, content type and schema. Every error is JSON."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.server import ApiServer

pytestmark = pytest.mark.broker  # generated notifications are published


#: The operations of the description (the app's own routes, read at collection).
OPERATIONS = ["GET /v1/notifications/{notification_id}", "POST /v1/notifications",
              "POST /v1/notifications/{notification_id}/cancel",
              "GET /v1/recipients/{recipient_id}/preferences",
              "PUT /v1/recipients/{recipient_id}/preferences", "GET /v1/dead-letters",
              "GET /v1/health", "GET /v1/recipients/{recipient_id}/inbox",
              "GET /v1/recipients/{recipient_id}/inbox/counts",
              "POST /v1/recipients/{recipient_id}/inbox/seen",
              "POST /v1/recipients/{recipient_id}/inbox/read",
              "POST /v1/recipients/{recipient_id}/inbox/archive",
              "POST /v1/recipients/{recipient_id}/tokens",
              "POST /v1/events/{channel}", "POST /v1/events/twilio",
              "POST /v1/events/mailgun", "GET /v1/suppressions", "POST /v1/suppressions",
              "DELETE /v1/suppressions"]
#: Operations left out: an event stream stays open by design, so a generated request
#: would wait forever; its errors and its events are tested in test_inbox_stream.py.
STREAMS = ["GET /v1/recipients/{recipient_id}/inbox/stream"]


@pytest.fixture(scope="module")
def api_schema(api_server: ApiServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{api_server.url}/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("label", OPERATIONS)
def test_generated_requests_get_documented_answers_and_no_500(
    api_schema: schemathesis.BaseSchema, api_server: ApiServer, make_key: Callable[..., str],
    label: str, mode: GenerationMode,
) -> None:
    """(schemathesis' pytest integration does not run on pytest 9: its strategies are
    driven by hypothesis here.)"""
    operations = {f"{op.method.upper()} {op.path}": op
                  for op in (found.ok() for found in api_schema.get_all_operations())}
    assert set(operations) == set(OPERATIONS) | set(STREAMS)
    if label == "GET /v1/health" and mode == GenerationMode.NEGATIVE:
        pytest.skip("no parameter and no body: nothing to make invalid")
    headers = {"Authorization": f"Bearer {make_key('admin')}"}

    @given(case=operations[label].as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def call(case: schemathesis.Case) -> None:
        case.call_and_validate(
            base_url=api_server.url, headers=headers,
            checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                    response_schema_conformance],
        )

    call()


EXAMPLES = 50


def test_the_description_is_served(api_server: ApiServer) -> None:
    described = httpx.get(f"{api_server.url}/openapi.json").json()
    assert {"/v1/notifications", "/v1/notifications/{notification_id}",
            "/v1/notifications/{notification_id}/cancel",
            "/v1/recipients/{recipient_id}/preferences", "/v1/dead-letters",
            } <= set(described["paths"])
    body = described["paths"]["/v1/notifications"]["post"]["requestBody"]
    assert "NotificationIn" in str(body)
    assert described["components"]["schemas"]["NotificationIn"]["additionalProperties"] \
        is False


@pytest.mark.parametrize(("method", "path", "status", "error"), [
    ("GET", "/nowhere", 404, "not found"),
    ("GET", "/v1/notifications", 405, "method not allowed"),
    ("DELETE", "/v1/dead-letters", 405, "method not allowed"),
    ("GET", "/v1/notifications/not-a-uuid", 422, "invalid request"),
])
def test_errors_are_json_never_html(
    api: httpx.Client, method: str, path: str, status: int, error: str,
) -> None:
    answer = api.request(method, path)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"] == error and isinstance(answer.json()["detail"], list)


def test_a_service_that_does_not_answer_is_503_not_a_traceback(
    database: str, make_key: Callable[..., str],
) -> None:
    """A server whose broker is gone: the send is refused with a JSON 503."""
    server = ApiServer.start(env={"NOTIFIER_BROKER_URL": "redis://127.0.0.1:1/0",
                                  "NOTIFIER_BROKER_CONFIRM_TIMEOUT": "1"})
    try:
        answer = httpx.post(f"{server.url}/v1/notifications", timeout=60,
                            headers={"Authorization": f"Bearer {make_key('send')}"},
                            json={"recipient": "u", "type": "t", "title": "x"})
    finally:
        server.stop()
    assert answer.status_code == 503, answer.text
    assert set(answer.json()) == {"error", "detail"} and "Traceback" not in answer.text
