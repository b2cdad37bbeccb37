"""The Slack channel against a real local HTTP server that answers like Slack."""

from __future__ import annotations

import uuid
from typing import Any

from notifier.channels.base import (
    AddressError,
    OutgoingMessage,
    PermanentError,
    RetryableError,
)
from notifier.channels.slack import SlackChannel, escape, slack_text
from tests.http_server import HttpServer, http_server_fixture  # noqa: F401

HOOK_PATH = "/services/T000/B000/XXXXSLACKSECRET"


def message(address: str | None, **overrides: Any) -> OutgoingMessage:
    fields: dict[str, Any] = {
        "delivery_id": uuid.uuid4(),
        "recipient_id": "user-1",
        "address": address,
        "type": "deploy.done",
        "priority": "normal",
        "title": "Deploy <prod> done",
        "body": "R&D says: <!channel> look at <http://x|this>",
    }
    return OutgoingMessage(**{**fields, **overrides})


def slack(options: str = "allow_private=yes") -> SlackChannel:
    return SlackChannel(f"slack://?{options}")


def test_posts_escaped_text(http_server: HttpServer) -> None:
    http_server.respond_always(200, "ok")

    [result] = slack().send_batch([message(http_server.url(HOOK_PATH))])

    assert result.sent
    [request] = http_server.wait_for(1)
    assert request.path == HOOK_PATH
    assert request.headers["Content-Type"] == "application/json"
    assert request.json == {
        "text": "*Deploy &lt;prod&gt; done*\n"
        "R&amp;D says: &lt;!channel&gt; look at &lt;http://x|this&gt;"
    }


def test_text_without_title_or_body() -> None:
    assert slack_text("", "just <body>") == "just &lt;body&gt;"
    assert slack_text("Only title", "") == "*Only title*"
    assert escape("a & b > c") == "a &amp; b &gt; c"


def test_batch_over_one_connection(http_server: HttpServer) -> None:
    results = list(slack().send_batch([message(http_server.url(HOOK_PATH)) for _ in range(3)]))

    assert all(r.sent for r in results)
    assert http_server.connections == 1


def test_slack_error_codes_are_permanent_and_kept(http_server: HttpServer) -> None:
    http_server.respond(404, "no_service")
    http_server.respond(403, "invalid_token")
    target = http_server.url(HOOK_PATH)

    first, second = slack().send_batch([message(target), message(target)])

    assert isinstance(first.error, PermanentError)
    assert isinstance(second.error, PermanentError)
    assert str(first.error) == (
        f"HTTP 404 from {http_server.base_url}/services/T000/B000/***: no_service"
    )
    assert str(second.error).endswith(": invalid_token")
    assert all("XXXXSLACKSECRET" not in str(r.error) for r in (first, second))


def test_rate_limit_and_server_errors_are_retryable(http_server: HttpServer) -> None:
    http_server.respond(429, "rate_limited", {"Retry-After": "30"})
    http_server.respond(503, "<html>" + "x" * 200 + "</html>")
    target = http_server.url(HOOK_PATH)

    limited, failed = slack().send_batch([message(target), message(target)])

    assert isinstance(limited.error, RetryableError)
    assert limited.error.retry_after == 30
    # A recipient names the hook (Slack's or a server of their own): its failures count
    # on that endpoint's circuit (notifier.delivery), never the channel's.
    assert not limited.error.provider_failure
    assert isinstance(failed.error, RetryableError)
    assert "html" not in str(failed.error)  # long bodies are no reason worth storing


def test_loopback_refused_unless_allowed(http_server: HttpServer) -> None:
    [result] = slack("allow_private=no").send_batch([message(http_server.url(HOOK_PATH))])

    assert isinstance(result.error, PermanentError)
    assert str(result.error).startswith("slack target 127.0.0.1 is a loopback address")
    assert http_server.connections == 0


def test_missing_address() -> None:
    [result] = slack().send_batch([message(None)])

    assert isinstance(result.error, AddressError)
