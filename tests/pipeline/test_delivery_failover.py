"""Failover between a channel's providers, run in this process against two real SMTP
servers (and two HTTP servers standing in for Twilio), Postgres and Redis.

A provider-side failure (connection refused, a 4xx the server answers for itself) or an
open circuit sends the delivery on to the next provider within the same attempt: one
attempt counted, the row records the provider that sent it. A recipient's refusal
(550) is not the provider's fault and fails over nowhere. The preferred provider gets
its traffic back when its half-open probe succeeds. Real worker processes:
``test_delivery_recovery.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from notifier.channels import provider_name
from notifier.pipeline.delivery import circuit_breaker, circuit_states, deliver_batch
from notifier.records import notification
from notifier.storage.db import session_scope
from notifier.storage.state import state_redis
from tests.http_server import HttpServer, http_server_fixture  # noqa: F401
from tests.pipeline.test_delivery import _fresh_channels, make_deliveries, settings_for
from tests.pipeline.test_delivery_isolation import seed, settings_with
from tests.smtp_server import SmtpServer

__all__ = ["_fresh_channels"]  # the delivery tests' fixture: channels built per test


@pytest.fixture
def backup() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


def two(primary: SmtpServer, backup: SmtpServer, **overrides: Any):
    return settings_for(json.dumps([primary.url(), backup.url()]), **overrides)


def name(index: int, server: SmtpServer | HttpServer) -> str:
    return f"{index}:127.0.0.1:{server.port}"


def rows(ids: list[str]) -> list[dict[str, Any]]:
    with session_scope() as session:
        found = session.connection().exec_driver_sql(
            "SELECT id::text, status, attempts, provider, last_error, notification_id"
            " FROM deliveries WHERE id = ANY(%s::uuid[]) ORDER BY id", (ids,),
        ).all()
    return [row._asdict() for row in found]


def breaker(settings, channel: str):
    return circuit_breaker(state_redis(), channel, settings)


def run(ids: list[str], settings, channel: str = "email"):
    return deliver_batch(channel, ids, settings, state_redis())


def test_a_primary_that_refuses_connections_fails_over_within_the_attempt(smtp_server, backup):
    primary = smtp_server
    settings = two(primary, backup)
    primary.stop()
    ids = make_deliveries(4)

    outcome = run(ids, settings)

    assert outcome.as_dict() == {"sent": 4, "retrying": 0, "dead": 0, "rescheduled": 0,
                                 "suppressed": 0}
    assert sorted(backup.message_ids()) == sorted(ids)
    assert {(r["status"], r["attempts"], r["provider"]) for r in rows(ids)} == {
        ("sent", 1, name(1, backup))}
    assert outcome.failovers == {name(0, primary): 4}
    assert outcome.by_provider == {(name(0, primary), "provider_error"): 4,
                                   (name(1, backup), "sent"): 4}
    # Each provider's circuit counts its own failures; the channel's is not used.
    primary_circuit = breaker(settings, f"email/{name(0, primary)}").describe()
    assert primary_circuit["recent_failures"] == 4
    assert breaker(settings, f"email/{name(1, backup)}").describe()["recent_failures"] == 0
    assert breaker(settings, "email").describe()["recent_failures"] == 0
    # What the API and the database API show.
    shown = notification(rows(ids)[0]["notification_id"])
    assert shown is not None and shown["deliveries"][0]["provider"] == name(1, backup)


def test_a_recipient_refused_by_the_primary_is_not_failed_over(smtp_server, backup):
    primary = smtp_server
    ids = make_deliveries(3)
    primary.refuse_recipient("user-1@example.com", code=550)

    outcome = run(ids, two(primary, backup))

    assert (outcome.sent, outcome.dead, outcome.retrying) == (2, 1, 0)
    assert backup.message_ids() == [] and backup.connections == 0
    assert outcome.failovers == {}
    dead = [r for r in rows(ids) if r["status"] == "dead"]
    assert [(r["attempts"], r["provider"]) for r in dead] == [(1, None)]
    assert "550" in dead[0]["last_error"]
    assert {r["provider"] for r in rows(ids) if r["status"] == "sent"} == {name(0, primary)}


def test_a_provider_side_4xx_fails_over_but_a_recipient_5xx_does_not(smtp_server, backup):
    """451 at DATA (the server's trouble) goes to the backup; the backup's own 550 for a
    recipient is final for that delivery alone."""
    primary = smtp_server
    ids = make_deliveries(2)
    primary.fail_next(2, code=451)
    backup.refuse_recipient("user-0@example.com", code=550)

    outcome = run(ids, two(primary, backup))

    assert (outcome.sent, outcome.dead) == (1, 1)
    assert primary.message_ids() == []
    assert sorted((r["status"], r["attempts"], r["provider"]) for r in rows(ids)) == [
        ("dead", 1, None), ("sent", 1, name(1, backup))]


def test_an_open_circuit_sends_straight_to_the_backup_and_a_probe_brings_traffic_back(
    smtp_server, backup,
):
    primary = smtp_server
    settings = two(primary, backup, breaker_failure_threshold=2, breaker_open_seconds=1.0)
    primary.stop()
    run(make_deliveries(3), settings)  # three refused connections open the primary's circuit
    primary_circuit = breaker(settings, f"email/{name(0, primary)}")
    assert primary_circuit.state() == "open"

    primary.start()  # back, but its circuit is open: not even a connection is tried
    ids = make_deliveries(3)
    outcome = run(ids, settings)
    assert outcome.sent == 3 and outcome.failovers == {}  # passed over, not failed over
    assert primary.connections == 0
    assert {r["provider"] for r in rows(ids)} == {name(1, backup)}
    assert outcome.by_provider == {(name(1, backup), "sent"): 3}  # nothing tried on the primary

    time.sleep(1.2)  # the circuit half-opens: the next batch's first message is the probe
    ids = make_deliveries(4)
    outcome = run(ids, settings)
    assert outcome.sent == 4 and outcome.failovers == {}
    assert sorted(primary.message_ids()) == sorted(ids)
    assert {(r["attempts"], r["provider"]) for r in rows(ids)} == {(1, name(0, primary))}
    assert primary_circuit.state() == "closed"


def test_a_failed_probe_fails_over_and_opens_the_circuit_again(smtp_server, backup):
    primary = smtp_server
    settings = two(primary, backup, breaker_failure_threshold=1, breaker_open_seconds=1.0)
    primary.stop()
    run(make_deliveries(1), settings)
    time.sleep(1.2)
    ids = make_deliveries(3)

    outcome = run(ids, settings)

    assert outcome.sent == 3
    assert {(r["attempts"], r["provider"]) for r in rows(ids)} == {(1, name(1, backup))}
    # The probe was tried on the primary; the two behind it were not (the circuit had
    # opened again), and all three went on to the backup.
    assert outcome.by_provider[(name(0, primary), "provider_error")] == 1
    assert outcome.failovers == {name(0, primary): 3}
    assert breaker(settings, f"email/{name(0, primary)}").state() == "open"


def test_when_every_provider_fails_it_is_one_attempt_with_the_last_error(smtp_server, backup):
    primary = smtp_server
    primary.stop()
    backup.stop()
    ids = make_deliveries(2)

    outcome = run(ids, two(primary, backup, retry_base=60.0))

    assert outcome.retrying == 2 and outcome.sent == 0
    for row in rows(ids):
        assert (row["status"], row["attempts"], row["provider"]) == ("retrying", 1, None)
        assert f"127.0.0.1:{backup.port} unreachable" in row["last_error"]


def test_when_every_circuit_is_open_the_batch_waits_without_an_attempt(smtp_server, backup):
    primary = smtp_server
    settings = two(primary, backup, breaker_failure_threshold=1, breaker_open_seconds=30.0)
    primary.stop()
    backup.stop()
    run(make_deliveries(1), settings)
    ids = make_deliveries(2)

    outcome = run(ids, settings)

    assert outcome.rescheduled == 2
    assert {(r["status"], r["attempts"]) for r in rows(ids)} == {("retrying", 0)}
    assert {r["last_error"] for r in rows(ids)} == {"circuit open for every provider of email"}
    email = circuit_states(settings)["email"]
    assert email["state"] == "open" and set(email["providers"]) == {
        name(0, primary), name(1, backup)}
    assert all(c["state"] == "open" for c in email["providers"].values())


def test_a_single_url_keeps_the_channel_circuit_and_records_its_provider(smtp_server):
    settings = settings_for(smtp_server.url())
    ids = make_deliveries(2)
    run(ids, settings)
    assert {(r["attempts"], r["provider"]) for r in rows(ids)} == {(1, name(0, smtp_server))}
    assert name(0, smtp_server) == provider_name(0, smtp_server.url())

    smtp_server.stop()
    ids = make_deliveries(2)
    outcome = run(ids, settings)
    assert outcome.retrying == 2 and outcome.failovers == {}
    assert breaker(settings, "email").describe()["recent_failures"] == 2
    assert not list(state_redis().scan_iter("notifier.breaker.{email/*"))


def test_an_sms_provider_answering_503_fails_over_to_the_next(http_server):
    backup_server = HttpServer()
    with backup_server:
        primary = f"twilio://AC1:token@127.0.0.1:{http_server.port}?from=%2B15550001111&https=no"
        second = f"twilio://AC2:other@127.0.0.1:{backup_server.port}?from=%2B15550001111&https=no"
        http_server.respond_always(503, "busy")
        backup_server.respond_always(201, '{"sid": "SM1"}')
        ids = seed("sms", [{"phone": "+15550002222"}, {"phone": "+15550003333"}])

        outcome = run(ids, settings_with(channels={"sms": json.dumps([primary, second])}), "sms")

        assert outcome.sent == 2
        assert len(http_server.requests) == 2 and len(backup_server.requests) == 2
        assert {(r["attempts"], r["provider"]) for r in rows(ids)} == {
            (1, name(1, backup_server))}
