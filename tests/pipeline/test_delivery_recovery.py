"""Delivery through real worker processes (with beat's sweeper) when things break.

A worker killed mid-batch, a broker that lost every message, an SMTP server that is
down: each ends with every delivery sent, recorded as sent, and received exactly once
(the server counts Message-IDs, which carry the delivery id).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import redis

from notifier.client import notify
from tests.conftest import STATE_REDIS_URL
from tests.smtp_server import SmtpServer
from tests.workers import ROOT, WorkerProcess, count_rows, wait_for, wait_for_count

SENT = "SELECT count(*) FROM deliveries WHERE status = 'sent'"



def start_worker(
    smtp: SmtpServer, *queues: str, beat: bool = True, concurrency: int = 2
) -> WorkerProcess:
    """A worker sending e-mail to ``smtp``; with ``beat``, it also runs the sweeper."""
    args = ["-Q", ",".join(queues)] if queues else []
    if beat:
        args += ["-B", "--schedule", tempfile.mktemp(prefix="beat-")]
    return WorkerProcess.start(*args, env={"NOTIFIER_CHANNELS__EMAIL": smtp.url()},
                               concurrency=concurrency)


def send_critical(count: int) -> list[str]:
    return [
        notify(recipient={"id": f"user-{i}", "email": f"user-{i}@example.com"}, type="alert",
               priority="critical", title=f"Alert {i}", channels=["email"])
        for i in range(count)
    ]


def assert_each_sent_once(smtp: SmtpServer, count: int) -> None:
    received = Counter(smtp.message_ids())
    assert len(received) == count, f"{len(received)} distinct deliveries received"
    assert max(received.values()) == 1, f"sent twice: {received.most_common(3)}"
    assert count_rows(SENT) == count


def test_a_worker_killed_mid_batch_leaves_every_delivery_sent_once(smtp_server):
    smtp_server.delay = 0.15
    # One sender, so that the kill lands while the server holds the next message: the
    # server has not taken it and the worker has not recorded it. (With two senders the
    # kill can also fall between another message's "250" and its record: then that one is
    # sent again with the same Message-ID, which the design allows and a receiver dedups.)
    worker = start_worker(smtp_server, concurrency=1)
    try:
        send_critical(30)
        smtp_server.wait_for(5, timeout=30)
        smtp_server.hold()  # the next message: sent, not yet accepted
        in_hand = smtp_server.wait_for_held(1, timeout=30)
        worker.kill()
        smtp_server.wait_until_not_held(in_hand, timeout=10)
        smtp_server.release()
        sent_before = len(smtp_server.message_ids())
        assert sent_before < 30
        smtp_server.delay = 0.0
        worker = start_worker(smtp_server)
        wait_for_count(SENT, 30, timeout=60)
    finally:
        worker.stop()
    assert_each_sent_once(smtp_server, 30)


def test_a_flushed_broker_is_recovered_by_the_sweeper(smtp_server, broker):
    ingest_only = start_worker(smtp_server, "notifier.critical", beat=False)
    try:
        send_critical(20)
        wait_for_count("SELECT count(*) FROM deliveries WHERE status = 'queued'", 20, timeout=30)
    finally:
        ingest_only.stop()
    broker.lose_everything()  # a broker restarted that keeps nothing on disk

    worker = start_worker(smtp_server)
    try:
        wait_for_count(SENT, 20, timeout=60)
    finally:
        worker.stop()
    assert_each_sent_once(smtp_server, 20)


def test_the_circuit_opens_while_smtp_is_down_and_everything_is_sent_once_after(smtp_server):
    smtp_server.stop()
    worker = start_worker(smtp_server)
    try:
        send_critical(12)
        state = redis.Redis.from_url(STATE_REDIS_URL)
        wait_for(lambda: state.hget("notifier.breaker.{email}", "state") == b"open", 30,
                 "the e-mail circuit to open")
        status = _cli("status")
        assert "email OPEN" in status.stdout
        assert count_rows(SENT) == 0
        smtp_server.start()
        wait_for_count(SENT, 12, timeout=60)
        wait_for(lambda: state.hget("notifier.breaker.{email}", "state") == b"closed", 10,
                 "the e-mail circuit to close")
    finally:
        worker.stop()
    assert_each_sent_once(smtp_server, 12)


def test_a_backup_provider_takes_over_in_the_same_attempt_and_gives_traffic_back(smtp_server):
    """E-mail through two providers: the primary is stopped mid-run, the backup sends
    what the primary refused within the same attempt (each row: one attempt, the
    backup's name); with the primary back, its half-open probe succeeds and traffic
    returns to it. Nothing is sent twice across the two servers."""
    primary = smtp_server
    names = [f"0:127.0.0.1:{primary.port}"]
    with SmtpServer() as backup:
        names.append(f"1:127.0.0.1:{backup.port}")
        env = {"NOTIFIER_CHANNELS__EMAIL": json.dumps([primary.url(), backup.url()])}
        args = ["-B", "--schedule", tempfile.mktemp(prefix="beat-")]
        worker = WorkerProcess.start(*args, env=env)
        try:
            send_critical(10)
            wait_for_count(SENT, 10, timeout=60)
            assert _providers() == {(names[0], 1): 10}

            primary.stop()
            send_critical(10)
            wait_for_count(SENT, 20, timeout=60)
            assert _providers() == {(names[0], 1): 10, (names[1], 1): 10}
            state = redis.Redis.from_url(STATE_REDIS_URL)
            assert state.hget(f"notifier.breaker.{{email/{names[0]}}}", "state") in (
                b"open", b"half_open")
            status = _cli("status", env=env).stdout
            assert f"email providers: {names[0]} " in status and f"{names[1]} closed" in status

            primary.start()
            sent = 20
            while len(primary.message_ids()) == 10:  # a trickle, until a probe finds it back
                send_critical(1)
                sent += 1
                wait_for_count(SENT, sent, timeout=30)
                assert sent < 60, "traffic never returned to the primary"
            returned = len(primary.message_ids())
            send_critical(10)
            wait_for_count(SENT, sent + 10, timeout=60)
            assert len(primary.message_ids()) == returned + 10
        finally:
            worker.stop()
        received = Counter(primary.message_ids() + backup.message_ids())
        assert len(received) == sent + 10 and max(received.values()) == 1
    assert count_rows("SELECT count(*) FROM deliveries WHERE attempts <> 1") == 0


def _providers() -> Counter[tuple[str, int]]:
    from notifier.storage.db import session_scope

    with session_scope() as session:
        found = session.connection().exec_driver_sql(
            "SELECT provider, attempts FROM deliveries WHERE status = 'sent'").all()
    return Counter((provider, attempts) for provider, attempts in found)


def test_replaying_dead_letters_delivers_them(smtp_server):
    smtp_server.fail_always(code=550, text="mailbox unavailable")
    worker = start_worker(smtp_server, beat=False)
    try:
        send_critical(3)
        wait_for_count("SELECT count(*) FROM dead_letters WHERE stage = 'deliver'", 3)
        listing = _cli("dead-letters", "list", "--channel", "email")
        assert listing.stdout.count("mailbox unavailable") == 3

        smtp_server.reset()
        replay = _cli("dead-letters", "replay", "--stage", "deliver", "--yes")
        assert "replayed 3 dead letters" in replay.stdout
        wait_for_count(SENT, 3)
        again = _cli("dead-letters", "replay", "--yes")
        assert "no dead letters to replay" in again.stdout
    finally:
        worker.stop()
    assert_each_sent_once(smtp_server, 3)
    assert count_rows("SELECT count(*) FROM dead_letters WHERE replayed_at IS NOT NULL") == 3
    assert count_rows("SELECT count(*) FROM notifications WHERE status = 'delivered'") == 3


def _cli(
    *args: str, input: str | None = None, env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("notifier")), *args], cwd=ROOT, capture_output=True,
        text=True, input=input, timeout=60, env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return result
