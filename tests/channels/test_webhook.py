"""The webhook channel and the shared HTTP pieces, against a real local HTTP server."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from notifier.channels.base import (
    ConfigurationError,
    OutgoingMessage,
    PermanentError,
    RetryableError,
    SendResult,
)
from notifier.channels.http import (
    check_target,
    close_client,
    get_client,
    mask_target,
    parse_retry_after,
)
from notifier.channels.webhook import WebhookChannel, sign, verify_signature
from notifier.settings import get_settings
from tests.http_server import HttpServer, http_server_fixture  # noqa: F401

SECRET = "s3cr3t-hmac-key"


def message(address: str | None, **overrides: Any) -> OutgoingMessage:
    fields: dict[str, Any] = {
        "delivery_id": uuid.uuid4(),
        "recipient_id": "user-1",
        "address": address,
        "type": "order.shipped",
        "priority": "high",
        "title": "Your order shipped",
        "body": "It arrives Tuesday.",
        "data": {"order": 42, "items": ["a", "b"]},
        "notification_id": uuid.uuid4(),
    }
    return OutgoingMessage(**{**fields, **overrides})


def send(channel: WebhookChannel, *messages: OutgoingMessage) -> list[SendResult]:
    results = list(channel.send_batch(messages))
    assert [r.delivery_id for r in results] == [m.delivery_id for m in messages]
    return results


def channel(options: str = "allow_private=yes") -> WebhookChannel:
    return WebhookChannel(f"webhook://?{options}")


# --- What is sent ---------------------------------------------------------------------


def test_posts_the_message_as_json(http_server: HttpServer) -> None:
    sent = message(http_server.url("/hook"))
    before = time.time()

    [result] = send(channel(), sent)

    assert result.sent
    [request] = http_server.wait_for(1)
    assert (request.method, request.path) == ("POST", "/hook")
    assert request.headers["Content-Type"] == "application/json"
    body = request.json
    assert body == {
        "id": str(sent.delivery_id),
        "notification_id": str(sent.notification_id),
        "digest_id": None,
        "recipient": "user-1",
        "type": "order.shipped",
        "priority": "high",
        "title": "Your order shipped",
        "body": "It arrives Tuesday.",
        "data": {"order": 42, "items": ["a", "b"]},
        "sent_at": body["sent_at"],
    }
    sent_at = datetime.fromisoformat(body["sent_at"])
    assert sent_at.tzinfo is not None
    assert abs(sent_at.timestamp() - before) < 5


def test_headers_carry_idempotency_key_and_timestamp(http_server: HttpServer) -> None:
    sent = message(http_server.url())

    send(channel(), sent)

    [request] = http_server.wait_for(1)
    assert request.headers["Idempotency-Key"] == str(sent.delivery_id)
    assert abs(int(request.headers["X-Notifier-Timestamp"]) - time.time()) < 5
    assert request.headers["X-Notifier-Signature"] is None  # no secret, no signature


def test_signature_verifies_with_the_secret_only(http_server: HttpServer) -> None:
    send(channel(f"secret={SECRET}&allow_private=yes"), message(http_server.url()))

    [request] = http_server.wait_for(1)
    timestamp = request.headers["X-Notifier-Timestamp"]
    header = request.headers["X-Notifier-Signature"]
    assert header.startswith("sha256=")
    assert verify_signature(SECRET, timestamp, request.body, header)
    assert not verify_signature("wrong-secret", timestamp, request.body, header)
    assert not verify_signature(SECRET, timestamp, request.body + b" ", header)
    assert not verify_signature(SECRET, int(timestamp) + 1, request.body, header)


def test_verify_signature_refuses_stale_timestamps() -> None:
    body = b'{"id":"x"}'
    header = sign(SECRET, 1_000_000, body)

    assert verify_signature(SECRET, 1_000_000, body, header, now=1_000_299)
    assert not verify_signature(SECRET, 1_000_000, body, header, now=1_000_301)
    assert verify_signature(SECRET, 1_000_000, body, header, tolerance=None)
    assert not verify_signature(SECRET, "soon", body, header)
    assert not verify_signature(SECRET, 1_000_000, body, None, tolerance=None)


def test_batch_reuses_one_pooled_connection(http_server: HttpServer) -> None:
    messages = [message(http_server.url(f"/hook/{i}")) for i in range(5)]

    results = send(channel(), *messages)

    assert all(r.sent for r in results)
    assert len(http_server.wait_for(5)) == 5
    assert http_server.connections == 1
    send(channel(), message(http_server.url()))  # the next batch too: the pool lives on
    assert http_server.connections == 1


def test_client_is_made_again_after_fork() -> None:
    parent = get_client()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it got a client of its own, and leave
        os.write(write, b"new" if get_client() is not parent else b"same")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 8) == b"new"
    assert get_client() is parent
    os.close(read)
    os.close(write)


def test_client_is_made_again_after_close() -> None:
    first = get_client()
    close_client()
    assert first.is_closed
    assert get_client() is not first


# --- Outcomes -------------------------------------------------------------------------


def test_server_error_is_retryable(http_server: HttpServer) -> None:
    http_server.respond(500, "boom")

    [result] = send(channel(), message(http_server.url()))

    assert isinstance(result.error, RetryableError)
    assert str(result.error) == f"HTTP 500 from {http_server.url()}"
    assert result.error.retry_after is None
    assert not result.error.provider_failure  # the recipient's endpoint, not the channel


def test_429_is_retryable_after_retry_after_seconds(http_server: HttpServer) -> None:
    http_server.respond(429, headers={"Retry-After": "7"})

    [result] = send(channel(), message(http_server.url()))

    assert isinstance(result.error, RetryableError)
    assert result.error.retry_after == 7


def test_retry_after_as_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    request = httpx.Request("POST", "http://example.com/")

    def after(value: str) -> float | None:
        return parse_retry_after(httpx.Response(503, headers={"Retry-After": value},
                                                request=request))

    assert 115 < (after(when) or 0) <= 120
    assert after("Wed, 21 Oct 2015 07:28:00 GMT") == 0
    assert after("soon") is None


def test_408_is_retryable_404_is_permanent(http_server: HttpServer) -> None:
    http_server.respond(408)
    http_server.respond(404, "not here")

    first, second = send(channel(), message(http_server.url()), message(http_server.url()))

    assert isinstance(first.error, RetryableError)
    assert isinstance(second.error, PermanentError)
    assert str(second.error) == f"HTTP 404 from {http_server.url()}"


def test_redirect_is_not_followed(http_server: HttpServer) -> None:
    http_server.respond(302, headers={"Location": "http://10.0.0.1/"})

    [result] = send(channel(), message(http_server.url()))

    assert isinstance(result.error, PermanentError)
    assert len(http_server.requests) == 1


def test_timeout_is_retryable(http_server: HttpServer) -> None:
    http_server.delay = 2

    started = time.monotonic()
    [result] = send(channel("timeout=0.3&allow_private=yes"), message(http_server.url()))

    assert time.monotonic() - started < 1.5
    assert isinstance(result.error, RetryableError)
    assert "within 0.3s" in str(result.error)


def test_refused_connection_is_retryable() -> None:
    with HttpServer() as server:
        url = server.url()
    [result] = send(channel(), message(url))

    assert isinstance(result.error, RetryableError)
    assert str(result.error).startswith(f"cannot connect to {url}")


def test_one_failure_does_not_stop_the_others(http_server: HttpServer) -> None:
    http_server.respond(200)
    http_server.respond(404)
    http_server.respond(500)

    results = send(channel(), *(message(http_server.url()) for _ in range(4)))

    assert [type(r.error) for r in results] == [
        type(None), PermanentError, RetryableError, type(None)
    ]
    assert len(http_server.requests) == 4


def test_unreachable_host_is_not_tried_again_in_the_batch(http_server: HttpServer) -> None:
    http_server.delay = 2
    with HttpServer() as other:
        fast = other.url()
        slow = http_server.url()
        started = time.monotonic()
        results = send(
            channel("timeout=0.3&allow_private=yes"),
            message(slow), message(fast), message(slow), message(slow),
        )
        elapsed = time.monotonic() - started

    assert elapsed < 1.5  # one timeout, not three
    assert [r.sent for r in results] == [False, True, False, False]
    assert all(isinstance(r.error, RetryableError) for r in results if r.error)
    assert str(results[2].error).startswith("not tried: no answer from")
    assert len(http_server.requests) == 1
    assert len(other.requests) == 1


def test_missing_address_is_a_configuration_error() -> None:
    [result] = send(channel(), message(None))

    assert isinstance(result.error, ConfigurationError)


# --- Targets --------------------------------------------------------------------------


@pytest.fixture
def private_targets(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[bool], None]]:
    """Sets ``NOTIFIER_ALLOW_PRIVATE_TARGETS`` for the test (the suite's default allows)."""

    def allow(value: bool) -> None:
        monkeypatch.setenv("NOTIFIER_ALLOW_PRIVATE_TARGETS", "1" if value else "0")
        get_settings.cache_clear()

    yield allow
    monkeypatch.undo()
    get_settings.cache_clear()


def test_loopback_target_refused_by_default(
    http_server: HttpServer, private_targets: Callable[[bool], None]
) -> None:
    private_targets(False)
    for options in ("allow_private=no", ""):
        [result] = send(channel(options), message(http_server.url()))

        assert isinstance(result.error, PermanentError)
        assert str(result.error) == (
            "webhook target 127.0.0.1 is a loopback address;"
            " set NOTIFIER_ALLOW_PRIVATE_TARGETS=1 to allow it"
        )
    assert http_server.connections == 0


def test_setting_allows_private_targets_option_overrides(
    http_server: HttpServer, private_targets: Callable[[bool], None]
) -> None:
    private_targets(True)
    [allowed] = send(channel(""), message(http_server.url()))
    [refused] = send(channel("allow_private=no"), message(http_server.url()))

    assert allowed.sent
    assert isinstance(refused.error, PermanentError)
    private_targets(False)
    [allowed] = send(channel("allow_private=yes"), message(http_server.url()))
    assert allowed.sent


def test_hostname_resolving_to_loopback_refused(http_server: HttpServer) -> None:
    [result] = send(channel("allow_private=no"), message(f"http://localhost:{http_server.port}/"))

    assert isinstance(result.error, PermanentError)
    assert "localhost (" in str(result.error)
    assert "loopback" in str(result.error)
    assert http_server.connections == 0


def test_private_literal_refused_without_connecting() -> None:
    started = time.monotonic()
    [result] = send(channel("allow_private=no&timeout=5"), message("http://10.0.0.1:9/hook"))

    assert time.monotonic() - started < 0.5  # a connection attempt would hang till timeout
    assert isinstance(result.error, PermanentError)
    assert "10.0.0.1 is a private address" in str(result.error)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://0.0.0.0/", "an unspecified"),
        ("http://169.254.169.254/latest/meta-data", "a link-local"),
        ("http://224.0.0.1/", "a multicast"),
        ("http://192.168.1.1/", "a private"),
        ("http://[::1]:8080/", "a loopback"),
        ("http://[::ffff:127.0.0.1]/", "an IPv4-mapped loopback"),
        ("http://[fc00::1]/", "a private"),
        ("http://100.64.0.1/", "a shared (CGNAT)"),
        ("http://240.0.0.1/", "a reserved"),
    ],
)
def test_check_target_refuses_non_public_addresses(url: str, kind: str) -> None:
    with pytest.raises(PermanentError, match=re.escape(f"is {kind} address")):
        check_target(url, allow_private=False)
    check_target(url, allow_private=True)


def test_check_target_refuses_other_schemes() -> None:
    for url in ("ftp://example.com/x", "file:///etc/passwd", "not a url"):
        with pytest.raises(PermanentError, match="not an http"):
            check_target(url, allow_private=True)


def test_check_target_allows_public_literals() -> None:
    check_target("https://8.8.8.8/hook", allow_private=False)
    check_target("https://[2001:4860:4860::8888]/hook", allow_private=False)


# --- Secrets --------------------------------------------------------------------------


def test_secret_never_shown(http_server: HttpServer) -> None:
    webhook = channel(f"secret={SECRET}&allow_private=yes")
    http_server.respond(404)
    http_server.respond(500)
    target = http_server.url("/services/T000/B000/PATHSECRETXYZ")

    results = send(webhook, message(target), message(target))

    shown = [repr(webhook), webhook.masked_url, *(str(r.error) for r in results)]
    assert all(SECRET not in text and "PATHSECRETXYZ" not in text for text in shown)
    assert str(results[0].error).endswith("/services/T000/B000/***")


def test_mask_target() -> None:
    assert (mask_target("https://hooks.slack.com/services/T000/B000/XXXXSECRET")
            == "https://hooks.slack.com/services/T000/B000/***")
    assert mask_target("https://example.com/hooks/in") == "https://example.com/hooks/in"
    assert (mask_target("https://u:pw@example.com/h/abcdefghijklmnopqrstuvwxyz?token=t&a=1")
            == "https://u:***@example.com/h/***?token=***&a=1")
    assert mask_target("https://example.com/h?sig=" + "x" * 40) == "https://example.com/h?sig=***"


def test_options_are_checked() -> None:
    for options in ("timeout=soon", "timeout=0", "allow_private=maybe"):
        with pytest.raises(ConfigurationError):
            WebhookChannel(f"webhook://?{options}")
    with pytest.raises(ConfigurationError):
        WebhookChannel("slack://")


def test_body_is_compact_sorted_json(http_server: HttpServer) -> None:
    send(channel(), message(http_server.url(), title="Déjà vu"))

    [request] = http_server.wait_for(1)
    assert request.body == json.dumps(
        request.json, separators=(",", ":"), sort_keys=True, ensure_ascii=False
    ).encode()
