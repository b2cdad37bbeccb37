"""The suppression list in the delivery step, with a real worker, a real SMTP server
(aiosmtpd) and the run's Postgres: a hard bounce suppresses the address, the next
notification to it ends ``suppressed`` without an SMTP connection, and ``notifier
suppressions remove`` lets mail flow again. Also: a receipt only moves a delivery
forward, whatever order the provider's events arrive in."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text

from notifier import client
from notifier.pipeline.receipts import Receipt, apply_receipt
from notifier.pipeline.suppressions import normalize
from notifier.settings import get_settings
from notifier.storage.db import session_scope
from tests.smtp_server import SmtpServer
from tests.workers import ROOT, WorkerProcess, wait_for

NOTIFIER = str(Path(sys.executable).with_name("notifier"))
RECIPIENT = {"id": "bounce-1", "email": "Bob.Bounce@Example.COM"}


def _send(title: str) -> str:
    note = client.notify(RECIPIENT, "alert", title, priority="critical", channels=["email"])
    wait_for(lambda: _delivery(note) is not None and _delivery(note)[1] not in (
        "pending", "queued", "sending"), 30, f"the delivery of {title!r} to end")
    return note


def _delivery(note: str) -> Any:
    with session_scope() as session:
        return session.execute(text(
            "SELECT id, status, last_error FROM deliveries WHERE notification_id = :n"
        ), {"n": note}).first()


def _notification(note: str) -> tuple[str, str | None]:
    with session_scope() as session:
        row = session.execute(text(
            "SELECT status, status_reason FROM notifications WHERE id = :n"), {"n": note}).one()
    return row[0], row[1]


def _bounce(delivery_id: uuid.UUID, permanent: bool = True) -> None:
    with session_scope() as session:
        apply_receipt(session, Receipt(delivery_id, "email", "bounced", permanent,
                                       "550 5.1.1 no such user"), get_settings())


def test_a_hard_bounce_stops_mail_until_the_operator_removes_it(
    smtp_server: SmtpServer,
) -> None:
    worker = WorkerProcess.start(env={"NOTIFIER_CHANNELS__EMAIL": smtp_server.url()})
    try:
        first = _send("first")
        delivery_id, status, _ = _delivery(first)
        assert status == "sent" and len(smtp_server.messages) == 1
        _bounce(delivery_id)
        connections = smtp_server.connections

        second = _send("second")
        _, status, reason = _delivery(second)
        assert status == "suppressed"
        assert reason == "suppressed: hard bounce: 550 5.1.1 no such user"
        assert _notification(second) == ("suppressed", reason)  # its only delivery
        assert smtp_server.connections == connections and len(smtp_server.messages) == 1

        listed = subprocess.run([NOTIFIER, "suppressions", "list", "--channel", "email"],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert "bob.bounce@example.com" in listed.stdout and "bounce" in listed.stdout
        removed = subprocess.run(
            [NOTIFIER, "suppressions", "remove", "email", "BOB.bounce@example.com"],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert removed.returncode == 0, removed.stderr
        again = subprocess.run(
            [NOTIFIER, "suppressions", "remove", "email", "bob.bounce@example.com"],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "is not suppressed" in again.stderr

        third = _send("third")
        assert _delivery(third)[1] == "sent" and len(smtp_server.messages) == 2
    finally:
        worker.stop()
    assert "suppressed" in _scrape_deliveries()


def test_a_batch_with_suppressed_and_free_addresses_sends_only_the_free(
    smtp_server: SmtpServer,
) -> None:
    """One batch: many critical notifications in one message, half of them to suppressed
    addresses; those end suppressed, the rest go out."""
    with session_scope() as session:
        for i in range(0, 20, 2):
            session.execute(text(
                "INSERT INTO suppressions (channel, address, reason, source)"
                " VALUES ('email', :a, 'added by an operator', 'manual')"),
                {"a": normalize("email", f"User-{i}@Example.com")})
    worker = WorkerProcess.start(env={"NOTIFIER_CHANNELS__EMAIL": smtp_server.url()})
    try:
        client.notify_many([
            {"recipient": {"id": f"user-{i}", "email": f"user-{i}@example.com"},
             "type": "alert", "title": f"alert {i}", "priority": "critical",
             "channels": ["email"]} for i in range(20)])
        wait_for(lambda: _count("status IN ('sent', 'suppressed')") == 20, 30,
                 "every delivery to end")
    finally:
        worker.stop()
    assert _count("status = 'suppressed'") == 10 and len(smtp_server.messages) == 10
    sent_to = {envelope[1][0] for envelope in smtp_server.envelopes}
    assert sent_to == {f"user-{i}@example.com" for i in range(1, 20, 2)}
    with session_scope() as session:
        ended = dict(session.execute(text(
            "SELECT status, count(*) FROM notifications GROUP BY status")).all())
    assert ended == {"suppressed": 10, "delivered": 10}


def test_a_notification_suppressed_on_one_channel_still_goes_out_on_another(
    smtp_server: SmtpServer,
) -> None:
    """Its e-mail is suppressed, its in-app message goes out: the notification ends
    delivered, whichever delivery ended first."""
    with session_scope() as session:
        session.execute(text(
            "INSERT INTO suppressions (channel, address, reason, source)"
            " VALUES ('email', 'both@example.com', 'added by an operator', 'manual')"))
    worker = WorkerProcess.start(env={"NOTIFIER_CHANNELS__EMAIL": smtp_server.url()})
    try:
        note = client.notify({"id": "both", "email": "both@example.com"}, "alert", "two ways",
                             priority="critical", channels=["email", "inapp"])
        wait_for(lambda: _count(f"notification_id = '{note}' AND status IN"
                                " ('sent', 'suppressed')") == 2, 30, "both deliveries to end")
        wait_for(lambda: _notification(note)[0] != "dispatched", 10, "the notification's end")
    finally:
        worker.stop()
    assert _notification(note)[0] == "delivered" and not smtp_server.messages


def test_receipts_only_move_forward_and_repeat_harmlessly() -> None:
    recipient, note, delivery = "fwd-1", uuid.uuid4(), uuid.uuid4()
    with session_scope() as session:
        session.execute(text("INSERT INTO recipients (id, email) VALUES (:r, 'f@example.com')"),
                        {"r": recipient})
        session.execute(text(
            "INSERT INTO notifications (id, recipient_id, type, priority, title, status)"
            " VALUES (:n, :r, 'alert', 'normal', 't', 'dispatched')"), {"n": note, "r": recipient})
        session.execute(text(
            "INSERT INTO deliveries (id, notification_id, recipient_id, channel, priority,"
            " status) VALUES (:d, :n, :r, 'email', 'normal', 'sending')"),
            {"d": delivery, "n": note, "r": recipient})
    settings = get_settings()

    def receive(event: Any, permanent: bool = False) -> Any:
        with session_scope() as session:
            return apply_receipt(session, Receipt(delivery, "email", event, permanent, "x"),
                                 settings)

    assert receive("delivered").result == "not sent"  # still in a worker's hands
    with session_scope() as session:
        session.execute(text("UPDATE deliveries SET status = 'sent' WHERE id = :d"),
                        {"d": delivery})
    assert receive("complained").status == "complained"
    for event, permanent in (("delivered", False), ("bounced", True), ("failed", True)):
        outcome = receive(event, permanent)
        assert outcome.status == "complained" and outcome.result == "unchanged"
    with session_scope() as session:
        assert session.execute(text("SELECT count(*) FROM suppressions")).scalar_one() == 1


def _count(where: str) -> int:
    with session_scope() as session:
        return int(session.execute(text(f"SELECT count(*) FROM deliveries WHERE {where}")
                                   ).scalar_one())


def _scrape_deliveries() -> str:
    from notifier.worker import metrics

    body, _ = metrics.exposition()
    return "\n".join(line for line in body.decode().splitlines()
                     if line.startswith("notifier_deliveries_total"))


def test_a_notification_with_a_delivery_past_sent_or_suppressed_cannot_be_cancelled() -> None:
    """Cancelling is too late once something of it went out, whatever the provider said
    after (or once the list stopped it): the other channel's queued delivery stays."""
    from notifier.pipeline.cancel import cancel_by

    for gone in ("bounced", "suppressed"):
        note, recipient = uuid.uuid4(), f"cancel-{gone}"
        with session_scope() as session:
            session.execute(text("INSERT INTO recipients (id) VALUES (:r)"), {"r": recipient})
            session.execute(text(
                "INSERT INTO notifications (id, recipient_id, type, priority, title, status)"
                " VALUES (:n, :r, 'alert', 'normal', 't', 'dispatched')"),
                {"n": note, "r": recipient})
            for channel, status in (("email", gone), ("inapp", "queued")):
                session.execute(text(
                    "INSERT INTO deliveries (id, notification_id, recipient_id, channel,"
                    " priority, status) VALUES (:d, :n, :r, :c, 'normal', :s)"),
                    {"d": uuid.uuid4(), "n": note, "r": recipient, "c": channel, "s": status})
        outcome = cancel_by(str(note), None)
        assert (outcome.cancelled, outcome.status) == (False, gone)
        assert _count(f"notification_id = '{note}' AND status = 'queued'") == 1
