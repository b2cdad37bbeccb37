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
from hypothesis import given, settings
from hypothesis import strategies as st

from notifier.channels.base import (
    AddressError,
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
from notifier.storage.db import session_scope
from tests.http_server import HttpServer, Request, http_server_fixture  # noqa: F401
from tests.ops.test_cli import run

SECRET = "s3cr3t-hmac-key"


@pytest.fixture(autouse=True)
def recipients() -> None:
    """The receivers: a secret is made only for a recipient that exists."""
    with session_scope() as session:
        session.connection().exec_driver_sql(
            "INSERT INTO recipients (id) VALUES ('user-1'), ('user-2')"
        )


def shown_secret(recipient: str) -> str:
    """The secret as `notifier webhooks secret show` prints it."""
    result = run("webhooks", "secret", "show", recipient)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def verifies(secret: str | list[str], request: Request) -> bool:
    return verify_signature(
        secret, request.headers["X-Notifier-Timestamp"], request.headers["Idempotency-Key"],
        request.body, request.headers["X-Notifier-Signature"],
    )


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


def test_headers_carry_idempotency_key_timestamp_and_signature(http_server: HttpServer) -> None:
    sent = message(http_server.url())

    send(channel(), sent)

    [request] = http_server.wait_for(1)
    assert request.headers["Idempotency-Key"] == str(sent.delivery_id)
    assert abs(int(request.headers["X-Notifier-Timestamp"]) - time.time()) < 5
    [signature] = request.headers["X-Notifier-Signature"].split(",")  # signed by default
    assert signature.startswith("v1=") and len(signature) == 3 + 64


def test_receiver_verifies_with_the_secret_the_command_shows(http_server: HttpServer) -> None:
    """The default `webhook://` signs with the receiver's own secret, made on first use;
    `notifier webhooks secret show` prints that secret and it verifies the request."""
    send(channel(), message(http_server.url()))

    [request] = http_server.wait_for(1)
    secret = shown_secret("user-1")
    assert secret.startswith("whsec_") and len(secret) > 40
    assert verifies(secret, request)
    timestamp, key = request.headers["X-Notifier-Timestamp"], request.headers["Idempotency-Key"]
    header = request.headers["X-Notifier-Signature"]
    assert not verify_signature("wrong-secret", timestamp, key, request.body, header)
    assert not verify_signature(secret, timestamp, key, request.body + b" ", header)
    assert not verify_signature(secret, int(timestamp) + 1, key, request.body, header)
    assert not verify_signature(secret, timestamp, str(uuid.uuid4()), request.body, header)


def test_secret_shown_first_is_the_one_used_later(http_server: HttpServer) -> None:
    """A receiver can be given its secret before the first message is sent."""
    secret = shown_secret("user-2")

    send(channel(), message(http_server.url(), recipient_id="user-2"))

    [request] = http_server.wait_for(1)
    assert verifies(secret, request)
    assert shown_secret("user-2") == secret


def test_receivers_have_different_secrets(http_server: HttpServer) -> None:
    """One receiver's secret does not verify requests meant for another: a receiver
    cannot forge requests to the others."""
    send(channel(), message(http_server.url("/one"), recipient_id="user-1"),
         message(http_server.url("/two"), recipient_id="user-2"))

    one, two = sorted(http_server.wait_for(2), key=lambda r: r.path)
    first, second = shown_secret("user-1"), shown_secret("user-2")
    assert first != second
    assert verifies(first, one) and verifies(second, two)
    assert not verifies(first, two) and not verifies(second, one)


def test_rotation_signs_with_both_secrets_during_the_overlap(http_server: HttpServer) -> None:
    send(channel(), message(http_server.url()))
    old = shown_secret("user-1")
    rotated = run("webhooks", "secret", "rotate", "user-1", "--overlap", "24h")
    assert rotated.returncode == 0, rotated.stderr
    assert "the previous one also signs until" in rotated.stdout
    assert old not in rotated.stdout
    new = shown_secret("user-1")
    assert new != old and new not in rotated.stdout + rotated.stderr  # only `show` prints it

    send(channel(), message(http_server.url()))
    during = http_server.wait_for(2)[1]
    assert len(during.headers["X-Notifier-Signature"].split(",")) == 2
    assert verifies(old, during) and verifies(new, during)

    with session_scope() as session:  # the overlap ends (as 24 hours passing would)
        session.connection().exec_driver_sql(
            "UPDATE webhook_secrets SET previous_valid_until = now() - interval '1 second'"
        )
    send(channel(), message(http_server.url()))
    after = http_server.wait_for(3)[2]
    assert len(after.headers["X-Notifier-Signature"].split(",")) == 1
    assert verifies(new, after) and not verifies(old, after)


def test_rotation_without_overlap_stops_the_old_secret_at_once(http_server: HttpServer) -> None:
    old = shown_secret("user-1")
    rotated = run("webhooks", "secret", "rotate", "user-1", "--overlap", "0")
    assert "the previous one no longer signs" in rotated.stdout

    send(channel(), message(http_server.url()))

    [request] = http_server.wait_for(1)
    assert verifies(shown_secret("user-1"), request) and not verifies(old, request)


def test_secret_commands_refuse_unknown_recipients_and_bad_overlaps() -> None:
    for args in (("show", "nobody"), ("rotate", "nobody")):
        result = run("webhooks", "secret", *args)
        assert result.returncode == 2
        assert result.stderr.startswith("error: no recipient 'nobody'")
    bad = run("webhooks", "secret", "rotate", "user-1", "--overlap", "soon")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --overlap: ")
    with session_scope() as session:
        made = session.connection().exec_driver_sql("SELECT count(*) FROM webhook_secrets")
        assert made.scalar() == 0


def test_message_for_a_recipient_that_no_longer_exists_fails_alone(
    http_server: HttpServer,
) -> None:
    gone, kept = message(http_server.url(), recipient_id="gone"), message(http_server.url())

    results = send(channel(), gone, kept)

    assert isinstance(results[0].error, PermanentError)
    assert "no signing secret" in str(results[0].error)
    assert results[1].sent and len(http_server.wait_for(1)) == 1


def test_verify_signature_refuses_stale_timestamps() -> None:
    body, key = b'{"id":"x"}', str(uuid.uuid4())
    header = sign(SECRET, 1_000_000, key, body)

    assert verify_signature(SECRET, 1_000_000, key, body, header, now=1_000_299)
    assert not verify_signature(SECRET, 1_000_000, key, body, header, now=1_000_301)
    assert verify_signature(SECRET, 1_000_000, key, body, header, tolerance=None)
    assert verify_signature(SECRET, "1000000", key, body, header, tolerance=None)
    assert not verify_signature(SECRET, "soon", key, body, header)
    assert not verify_signature(SECRET, 1_000_000, key, body, None, tolerance=None)


def test_verify_signature_accepts_any_of_several_signatures_and_secrets() -> None:
    body, key = b"{}", "k-1"
    both = f"{sign('new', 7, key, body)},{sign('old', 7, key, body)}"

    assert verify_signature("old", 7, key, body, both, tolerance=None)
    assert verify_signature("new", 7, key, body, both, tolerance=None)
    assert verify_signature(["other", "old"], 7, key, body, both, tolerance=None)
    assert not verify_signature("other", 7, key, body, both, tolerance=None)
    assert not verify_signature("new", 7, key, body, "sha256=" + both[3:], tolerance=None)


def test_verify_signature_answers_false_on_malformed_input() -> None:
    body, key = b"{}", "k-1"
    good = sign(SECRET, 7, key, body)
    for args in [
        (SECRET, 7, key, body, "v1=é" + good[4:]),  # non-ASCII header
        (SECRET, 7, key, body, good.encode() + b"\xff"),
        (SECRET, 7, key, body, ""),
        (SECRET, 7, key, body, "v1=" + "0" * 100_000),
        (SECRET, 7, key, body, ["v1=x"]),
        (SECRET, -7, key, body, good),
        (SECRET, True, key, body, good),
        (SECRET, "7.0", key, body, good),
        (SECRET, "\u0667", key, body, good),  # a digit, but not an ASCII one
        (SECRET, 10**400, key, body, good),
        (SECRET, 7, "k.1", body, good),
        (SECRET, 7, None, body, good),
        (SECRET, 7, key, None, good),
        (SECRET, 7, key, 42, good),
        ("", 7, key, body, good),
        (None, 7, key, body, good),
        ([], 7, key, body, good),
    ]:
        assert verify_signature(*args, tolerance=None) is False, args
    assert verify_signature(SECRET, 7, key, body, good, now=float("nan")) is False
    assert verify_signature(SECRET, 7, key, body, good, tolerance=float("inf"), now=8) is False
    assert verify_signature(SECRET, 7, key, "\ud800", good, tolerance=None) is False


ANYTHING = (st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary()
            | st.lists(st.text(max_size=5), max_size=3))


@settings(max_examples=300, deadline=None)
@given(ANYTHING, ANYTHING, ANYTHING, ANYTHING, ANYTHING, ANYTHING, ANYTHING)
def test_verify_signature_is_total(secret, timestamp, key, body, header, tolerance, now) -> None:
    assert verify_signature(secret, timestamp, key, body, header, tolerance, now) in (True, False)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1), st.integers(0, 2**40), st.from_regex(r"\A[A-Za-z0-9-]{1,40}\Z"),
       st.binary(), st.text())
def test_only_the_signature_verifies(secret, timestamp, key, body, forged) -> None:
    header = sign(secret, timestamp, key, body)
    assert verify_signature(secret, timestamp, key, body, header, tolerance=None)
    assert verify_signature(secret, str(timestamp), key, body, f"v1=0,{header}", tolerance=None)
    if forged != header:
        assert not verify_signature(secret, timestamp, key, body, forged, tolerance=None)


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


def test_missing_address_is_the_recipients_problem() -> None:
    [result] = send(channel(), message(None))

    assert isinstance(result.error, AddressError)
    assert not result.error.provider_failure


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


def test_tokens_in_the_target_never_shown(http_server: HttpServer) -> None:
    webhook = channel()
    http_server.respond(404)
    http_server.respond(500)
    target = http_server.url("/services/T000/B000/PATHSECRETXYZ")

    results = send(webhook, message(target), message(target))

    shown = [repr(webhook), webhook.masked_url, *(str(r.error) for r in results)]
    assert all("PATHSECRETXYZ" not in text for text in shown)
    assert str(results[0].error).endswith("/services/T000/B000/***")


def test_the_shared_secret_option_is_refused() -> None:
    """One secret for every receiver let any receiver forge requests to the others."""
    for url in (f"webhook://?secret={SECRET}", "webhook://?timeout=5&SECRET=", "webhook://?secret"):
        with pytest.raises(ConfigurationError) as refused:
            WebhookChannel(url)
        assert str(refused.value).startswith("webhook: option secret: no longer used:")
        assert SECRET not in str(refused.value)


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


def test_a_worker_signs_with_the_receivers_own_secret(http_server: HttpServer, worker) -> None:
    """End to end: a notification through a real worker reaches the receiver signed,
    and the receiver verifies it with the secret `notifier webhooks secret show` prints."""
    from notifier.client import notify

    notify(recipient={"id": "hooked", "addresses": {"webhook": http_server.url("/in")}},
           type="alert", title="Disk full", priority="critical", channels=["webhook"])

    [request] = http_server.wait_for(1, timeout=30)
    assert request.json["recipient"] == "hooked"
    assert verifies(shown_secret("hooked"), request)
    assert not verifies(shown_secret("user-1"), request)
