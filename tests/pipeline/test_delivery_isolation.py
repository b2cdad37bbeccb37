"""A recipient's problem is the recipient's (issue 10, finding 4).

Real parts throughout: ``deliver_batch`` against aiosmtpd and local HTTP servers, with
Postgres for the rows and Redis for the circuits. Deliveries are written straight into
Postgres (recipient, notification, delivery), so that addresses ingest might refuse one
day still reach the channels the way old rows or replays would.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import text

from notifier import channels as channel_registry
from notifier.channels import close_channels, get_channel
from notifier.channels.base import AddressError, OutgoingMessage, endpoint_of
from notifier.channels.email import EmailChannel, _recipient
from notifier.pipeline.delivery import (
    MAX_RAISES_IN_A_ROW,
    circuit_breaker,
    deliver_batch,
    endpoint_breakers,
)
from notifier.settings import get_settings
from notifier.storage.db import session_scope
from notifier.storage.state import state_redis
from tests.http_server import HttpServer, http_server_fixture  # noqa: F401
from tests.smtp_server import SmtpServer
from tests.workers import count_rows


@pytest.fixture(autouse=True)
def _fresh_channels():
    close_channels()
    yield
    close_channels()


def settings_with(**overrides: Any):
    channels = {**get_settings().channels, **overrides.pop("channels", {})}
    return get_settings().model_copy(update={"channels": channels, **overrides})


def seed(channel: str, recipients: list[dict[str, Any]]) -> list[str]:
    """One queued delivery per recipient (``email``, ``phone``, ``addresses``),
    in the given order; returns the delivery ids (ordered as claims order them)."""
    ids = []
    with session_scope() as session:
        connection = session.connection()
        for recipient in recipients:
            recipient_id = f"r-{uuid.uuid4().hex[:10]}"
            notification_id, delivery_id = uuid.uuid4(), _ordered_uuid(len(ids))
            connection.exec_driver_sql(
                "INSERT INTO recipients (id, email, phone, addresses)"
                " VALUES (%s, %s, %s, %s::jsonb)",
                (recipient_id, recipient.get("email"), recipient.get("phone"),
                 _json(recipient.get("addresses", {}))),
            )
            connection.exec_driver_sql(
                "INSERT INTO notifications (id, recipient_id, type, priority, title, body,"
                " status) VALUES (%s, %s, 'alert', 'critical', 'Alert', 'body', 'dispatched')",
                (notification_id, recipient_id),
            )
            connection.exec_driver_sql(
                "INSERT INTO deliveries (id, notification_id, recipient_id, channel, priority,"
                " status, next_attempt_at) VALUES (%s, %s, %s, %s, 'critical', 'queued', now())",
                (delivery_id, notification_id, recipient_id, channel),
            )
            ids.append(str(delivery_id))
    return ids


_RUN = uuid.uuid4().int >> 64


def _ordered_uuid(index: int) -> uuid.UUID:
    """Ids that sort in insertion order (claims take a batch ordered by id)."""
    return uuid.UUID(int=(int(time.time() * 1000) << 80) | (_RUN << 16) | index)


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def rows(ids: list[str]) -> list[dict[str, Any]]:
    with session_scope() as session:
        result = session.connection().exec_driver_sql(
            "SELECT id::text, status, attempts, last_error FROM deliveries"
            " WHERE id = ANY(%s::uuid[])", (ids,),
        ).all()
    by_id = {row.id: row._asdict() for row in result}
    return [by_id[i] for i in ids]


def make_due(ids: list[str]) -> None:
    with session_scope() as session:
        session.connection().exec_driver_sql(
            "UPDATE deliveries SET next_attempt_at = now(), status = 'queued'"
            " WHERE id = ANY(%s::uuid[]) AND status <> 'sent'", (ids,),
        )


# --- Malformed addresses fail alone ---------------------------------------------------


def test_five_malformed_webhook_targets_cost_themselves_alone(http_server):
    bad = ["http://example.com:99999/", "[::1", "http://[::1/x", "http://example.com:99999/b",
           "http://[zz]/"]
    good = [http_server.url(f"/hook-{i}") for i in range(5)]
    ids = seed("webhook", [{"addresses": {"webhook": url}} for url in bad + good])
    settings = settings_with(breaker_failure_threshold=5)

    outcome = deliver_batch("webhook", ids, settings, state_redis())

    assert outcome.sent == 5
    assert sorted(r.path for r in http_server.requests) == sorted(f"/hook-{i}" for i in range(5))
    assert all(row["status"] in ("dead", "retrying", "queued") for row in rows(ids[:5]))
    assert circuit_breaker(state_redis(), "webhook", settings).state() == "closed"


def test_non_ascii_local_parts_are_refused_alone_when_the_server_lacks_smtputf8(smtp_server):
    ids = seed("email", [{"email": f"jürgen{i}@example.com"} for i in range(5)]
               + [{"email": f"user{i}@example.com"} for i in range(5)])
    settings = settings_with(channels={"email": smtp_server.url()}, breaker_failure_threshold=5)

    outcome = deliver_batch("email", ids, settings, state_redis())

    assert (outcome.sent, outcome.dead) == (5, 5)
    assert sorted(smtp_server.message_ids()) == sorted(ids[5:])
    assert all("SMTPUTF8" in row["last_error"] for row in rows(ids[:5]))
    assert circuit_breaker(state_redis(), "email", settings).state() == "closed"
    assert smtp_server.connections == 1  # a refused address does not cost the session


def test_an_internationalised_domain_is_sent_in_idna_form(smtp_server):
    [delivery_id] = seed("email", [{"email": "user@bücher.de"}])
    settings = settings_with(channels={"email": smtp_server.url()})

    outcome = deliver_batch("email", [delivery_id], settings, state_redis())

    assert outcome.sent == 1
    [(_, recipients)] = smtp_server.envelopes
    assert recipients == ["user@xn--bcher-kva.de"]
    assert "user@xn--bcher-kva.de" in str(smtp_server.messages[0]["To"])


def test_a_non_ascii_local_part_goes_out_when_the_server_offers_smtputf8():
    with SmtpServer(smtputf8=True) as server:
        [delivery_id] = seed("email", [{"email": "jürgen@bücher.de"}])
        settings = settings_with(channels={"email": server.url()})
        outcome = deliver_batch("email", [delivery_id], settings, state_redis())
        assert outcome.sent == 1
        [(_, recipients)] = server.envelopes
        assert recipients == ["jürgen@xn--bcher-kva.de"]


class _PoisonedEmail(EmailChannel):
    """The real e-mail channel with a fault: composing a message for an address that
    contains ``poison`` raises an exception no channel is written to expect."""

    def _compose(self, message):  # type: ignore[no-untyped-def]
        if "poison" in (message.address or ""):
            raise RuntimeError("boom")
        return super()._compose(message)


def _use_poisoned_email(url: str) -> None:
    channel = _PoisonedEmail(url)
    provider = channel_registry.Provider(0, channel_registry.provider_name(0, url), channel)
    channel_registry._instances[(os.getpid(), "email")] = [provider]


def test_an_exception_of_any_class_costs_its_message_alone(smtp_server):
    ids = seed("email", [{"email": "a@example.com"}, {"email": "poison1@example.com"},
                         {"email": "b@example.com"}, {"email": "poison2@example.com"},
                         {"email": "c@example.com"}])
    settings = settings_with(channels={"email": smtp_server.url()}, breaker_failure_threshold=2)
    _use_poisoned_email(smtp_server.url())

    outcome = deliver_batch("email", ids, settings, state_redis())

    assert outcome.sent == 3 and outcome.retrying == 2
    assert sorted(smtp_server.message_ids()) == sorted([ids[0], ids[2], ids[4]])
    poisoned = rows([ids[1], ids[3]])
    assert all("RuntimeError" in row["last_error"] and row["attempts"] == 1 for row in poisoned)
    assert circuit_breaker(state_redis(), "email", settings).state() == "closed"


def test_a_channel_that_raises_on_every_message_ends_the_batch_quickly(smtp_server):
    ids = seed("email", [{"email": f"poison{i}@example.com"} for i in range(15)])
    settings = settings_with(channels={"email": smtp_server.url()})
    _use_poisoned_email(smtp_server.url())

    outcome = deliver_batch("email", ids, settings, state_redis())

    assert (outcome.retrying, outcome.rescheduled) == (MAX_RAISES_IN_A_ROW, 5)
    assert count_rows("SELECT count(*) FROM deliveries WHERE attempts > 0") == outcome.retrying
    assert circuit_breaker(state_redis(), "email", settings).state() == "closed"


# --- Recipient-controlled endpoints ----------------------------------------------------


@pytest.mark.parametrize("channel", ["webhook", "slack"])
def test_an_endpoint_answering_503_is_held_on_its_own_schedule(channel):
    with HttpServer() as failing, HttpServer() as healthy:
        failing.respond_always(503, "down")
        # A webhook endpoint is a host (any path on it); a Slack endpoint is one hook.
        hook = (lambda i: f"/h{i}") if channel == "webhook" else (lambda i: "/services/T/B/X")
        bad = seed(channel, [{"addresses": {channel: failing.url(hook(i))}} for i in range(6)])
        good = seed(channel, [{"addresses": {channel: healthy.url(f"/h{i}")}} for i in range(4)])
        settings = settings_with(breaker_failure_threshold=5, endpoint_breaker_threshold=5,
                                 endpoint_breaker_open_seconds=60)

        outcome = deliver_batch(channel, bad + good, settings, state_redis())

        assert outcome.sent == 4 and len(healthy.requests) == 4
        assert circuit_breaker(state_redis(), channel, settings).state() == "closed"
        endpoint = get_channel(channel, settings).endpoint(_message(failing.url(hook(0))))
        assert endpoint is not None and endpoint.startswith(failing.base_url)
        breakers = endpoint_breakers(state_redis(), channel, settings)
        assert breakers.states([endpoint]) == ["open"]

        # The next round: the failing endpoint is held, untried, no attempt counted;
        # another recipient on the same channel goes out at once.
        make_due(bad)
        tried_before = len(failing.requests)
        attempts_before = [row["attempts"] for row in rows(bad)]
        more = seed(channel, [{"addresses": {channel: healthy.url("/later")}}])
        outcome = deliver_batch(channel, bad + more, settings, state_redis())
        assert outcome.sent == 1 and outcome.rescheduled == 6
        assert len(failing.requests) == tried_before
        assert [row["attempts"] for row in rows(bad)] == attempts_before
        assert all("endpoint" in row["last_error"] for row in rows(bad))


def test_endpoint_circuits_expire_from_redis(http_server):
    http_server.respond_always(503, "down")
    ids = seed("webhook", [{"addresses": {"webhook": http_server.url()}} for _ in range(5)])
    settings = settings_with(endpoint_breaker_threshold=5, endpoint_breaker_open_seconds=1,
                             endpoint_breaker_window=1)
    deliver_batch("webhook", ids, settings, state_redis())
    keys = list(state_redis().scan_iter("notifier.endpoint.*"))
    assert keys
    assert all(state_redis().pttl(key) > 0 for key in keys)


def test_each_slack_hook_is_an_endpoint_of_its_own(http_server):
    """Every recipient's hook lives on one host (hooks.slack.com): one hook that keeps
    failing (a workspace's rate limit) must not hold the others."""
    http_server.respond(429, "rate_limited", {"Retry-After": "1"}, times=5)
    busy = seed("slack", [{"addresses": {"slack": http_server.url("/services/T/B/busy")}}
                          for _ in range(5)])
    others = seed("slack", [{"addresses": {"slack": http_server.url(f"/services/T/B/{i}")}}
                            for i in range(3)])
    settings = settings_with(endpoint_breaker_threshold=5)
    deliver_batch("slack", busy, settings, state_redis())

    outcome = deliver_batch("slack", others, settings, state_redis())

    assert outcome.sent == 3
    slack = get_channel("slack", settings)
    states = endpoint_breakers(state_redis(), "slack", settings).states(
        [slack.endpoint(_message(http_server.url(p)))  # type: ignore[misc]
         for p in ("/services/T/B/busy", "/services/T/B/0")])
    assert states == ["open", "closed"]
    assert all("busy" not in row["last_error"] for row in rows(busy))  # the path is secret


def _message(address: str) -> OutgoingMessage:
    return OutgoingMessage(delivery_id=uuid.uuid4(), recipient_id="r", address=address,
                           type="alert", priority="critical", title="t", body="b")


def _origin(base_url: str) -> str:
    endpoint = endpoint_of(base_url + "/")
    assert endpoint is not None
    return endpoint


def test_a_held_endpoint_is_probed_once_then_closes():
    with HttpServer() as server:
        server.respond(503, "down", times=5)
        ids = seed("webhook", [{"addresses": {"webhook": server.url(f"/h{i}")}}
                               for i in range(5)])
        settings = settings_with(endpoint_breaker_threshold=5, endpoint_breaker_open_seconds=0.5)
        deliver_batch("webhook", ids, settings, state_redis())
        breakers = endpoint_breakers(state_redis(), "webhook", settings)
        assert breakers.states([_origin(server.base_url)]) == ["open"]

        time.sleep(0.6)
        make_due(ids)
        outcome = deliver_batch("webhook", ids, settings, state_redis())
        assert (outcome.sent, outcome.rescheduled) == (1, 4)  # one probe, the rest wait
        assert breakers.states([_origin(server.base_url)]) == ["closed"]

        make_due(ids)
        outcome = deliver_batch("webhook", ids, settings, state_redis())
        assert outcome.sent == 4


@given(st.text(max_size=300) | st.from_regex(r"https?://[^/]{0,40}(:[0-9]{0,7})?/.{0,20}"))
@hypothesis_settings(max_examples=300, deadline=None)
def test_naming_an_endpoint_or_checking_an_address_never_raises_otherwise(text):
    endpoint = endpoint_of(text)
    assert endpoint is None or endpoint.startswith(("http://", "https://"))
    with contextlib.suppress(AddressError):  # anything else escaping is the failure
        _recipient(text, text)


def test_a_real_worker_sends_the_good_webhooks_next_to_malformed_ones(http_server):
    """End to end: notifications through the broker, a real worker, the real channel."""
    from notifier.client import notify
    from tests.workers import WorkerProcess, wait_for_count

    bad = ["http://example.com:99999/", "[::1", "http://[::1/x", "http://example.com:99999/b",
           "http://[zz]/"]
    # Ingest refuses such addresses now; these stand for rows stored before it did (or
    # written by hand), which delivery must still survive.
    urls = bad + [http_server.url(f"/hook-{i}") for i in range(5)]
    with session_scope() as session:
        for i, url in enumerate(urls):
            session.execute(
                text("INSERT INTO recipients (id, addresses) VALUES (:id, CAST(:a AS jsonb))"),
                {"id": f"user-{i}", "a": json.dumps({"webhook": url})},
            )
    worker = WorkerProcess.start()
    try:
        for i in range(len(urls)):
            notify(recipient=f"user-{i}", type="alert", priority="critical",
                   title=f"Alert {i}", channels=["webhook"])
        wait_for_count("SELECT count(*) FROM deliveries WHERE status = 'sent'", 5, timeout=30)
    finally:
        worker.stop()
    assert sorted(r.path for r in http_server.requests) == sorted(f"/hook-{i}" for i in range(5))
    assert circuit_breaker(state_redis(), "webhook", get_settings()).state() == "closed"
