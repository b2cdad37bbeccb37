"""Status callbacks out, on real parts: the run's Postgres, a real worker, a real SMTP
server (aiosmtpd), the real HTTP API, and a real callback receiver that verifies every
signature and counts what it accepted per (delivery, status).

Beat does not run in the tests: the test runs beat's callback sweep itself
(``notifier.sweep_callbacks``, in this process), which publishes the tasks the worker
sends.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from notifier import client
from notifier.channels.base import endpoint_of
from notifier.pipeline.callbacks import send_callbacks, sweep_due_callbacks
from notifier.pipeline.cancel import cancel_by
from notifier.settings import get_settings
from notifier.storage.callback_secrets import signing_secrets
from notifier.storage.db import raw_cursor, session_scope
from notifier.storage.models import FINISHED_DELIVERY_STATUSES
from notifier.storage.state import state_redis
from tests.api.server import ApiServer
from tests.callback_receiver import CallbackReceiver
from tests.http_server import HttpServer
from tests.smtp_server import SmtpServer
from tests.workers import ROOT, WorkerProcess, wait_for

NOTIFIER = str(Path(sys.executable).with_name("notifier"))


def _secret_of(url: str) -> Callable[[], str]:
    origin = str(endpoint_of(url))

    def read() -> str:
        with session_scope() as session:
            return signing_secrets(session, [origin])[origin].current

    return read


def _sweep_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Beat's callback sweep, every 0.2 s, until ``condition``."""
    from notifier.worker.tasks import sweep_callbacks

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            states = _rows("SELECT status, state, attempts, last_error FROM callbacks")
            raise TimeoutError(f"waited {timeout}s for {what}; callbacks: {states}")
        sweep_callbacks()
        time.sleep(0.2)


def _rows(sql: str, **params: Any) -> list[Any]:
    with session_scope() as session:
        return list(session.execute(text(sql), params).all())


def _delivery(note: str) -> Any:
    rows = _rows("SELECT id, status FROM deliveries WHERE notification_id = :n", n=note)
    return rows[0] if rows else None


def _ended(note: str) -> bool:
    row = _delivery(note)
    return row is not None and row.status in FINISHED_DELIVERY_STATUSES


def test_every_terminal_status_is_called_back_once_signed(smtp_server: SmtpServer) -> None:
    """Sent then delivered (a receipt through the API), suppressed, dead, cancelled:
    each (delivery, status) reaches the receiver once, signed; a receiver that answers
    500 twice per event gets each once still; the key's default URL is applied."""
    with session_scope() as session:
        session.execute(text(
            "INSERT INTO suppressions (channel, address, reason, source)"
            " VALUES ('email', 'bob@example.com', 'added by an operator', 'manual')"))
    with CallbackReceiver(lambda: "", fail_first=2) as receiver, \
            HttpServer() as refusing:
        receiver.secret = _secret_of(receiver.url())
        refusing.respond_always(400, "no such hook")
        url = receiver.url()
        # Ten 500s from one receiver would open its circuit (5 by default) for a minute.
        worker = WorkerProcess.start(env={"NOTIFIER_CHANNELS__EMAIL": smtp_server.url(),
                                          "NOTIFIER_RETRY_BASE": "0.2",
                                          "NOTIFIER_ENDPOINT_BREAKER_THRESHOLD": "50"})
        api = ApiServer.start()
        try:
            common = {"type": "alert", "priority": "critical", "callback_url": url}
            ann, bob, carl, dora = client.notify_many([
                {**common, "recipient": {"id": "ann", "email": "ann@example.com"},
                 "title": "to ann", "channels": ["email"]},
                {**common, "recipient": {"id": "bob", "email": "bob@example.com"},
                 "title": "to bob", "channels": ["email"]},
                {**common, "recipient": {"id": "carl", "addresses": {
                    "webhook": refusing.url()}}, "title": "to carl", "channels": ["webhook"]},
                {**common, "recipient": {"id": "dora"}, "title": "to dora",
                 "channels": ["inapp"],
                 "send_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()},
            ])
            wait_for(lambda: all(_ended(n) for n in (ann, bob, carl))
                     and _delivery(dora) is not None, 30, "the deliveries to end")
            assert cancel_by(dora, None).cancelled
            ann_delivery = _delivery(ann).id
            events_key = _api_key("events")
            answer = httpx.post(f"{api.url}/v1/events/email", json={
                "delivery_id": str(ann_delivery), "event": "delivered"},
                headers={"Authorization": f"Bearer {events_key}"}, timeout=30)
            assert answer.status_code == 200, answer.text

            expected = {(str(ann_delivery), "sent"), (str(ann_delivery), "delivered"),
                        (str(_delivery(bob).id), "suppressed"),
                        (str(_delivery(carl).id), "dead"),
                        (str(_delivery(dora).id), "cancelled")}
            _sweep_until(lambda: receiver.total() >= len(expected), 60, "every callback")
            time.sleep(1.0)  # nothing more may arrive
            _sweep_until(lambda: True, 1, "one more sweep")

            # The key's default: given to an item that names none, not to one that does.
            own = HttpServer()
            key = _api_key("send", callback_url=url)
            sent = httpx.post(f"{api.url}/v1/notifications", json=[
                {"recipient": "eve", "type": "alert", "title": "default", "channels": ["inapp"]},
                {"recipient": "eve", "type": "alert", "title": "own", "channels": ["inapp"],
                 "callback_url": own.url("/own")}],
                headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert sent.status_code == 202, sent.text
            default_id, own_id = sent.json()["ids"]
            wait_for(lambda: len(_rows("SELECT 1 FROM notifications WHERE id IN (:a, :b)",
                                       a=default_id, b=own_id)) == 2, 30, "eve's notifications")
        finally:
            api.stop()
            worker.stop()
    assert dict(receiver.accepted) == dict.fromkeys(expected, 1)
    assert receiver.forged == []
    assert set(receiver.attempts.values()) == {3}  # 500, 500, then accepted
    sent_event = next(e for e in receiver.events.values() if e["status"] == "sent")
    assert sent_event["notification_id"] == ann and sent_event["channel"] == "email"
    dead = next(e for e in receiver.events.values() if e["status"] == "dead")
    assert "HTTP 400" in dead["detail"]
    assert {row.state for row in _rows("SELECT state FROM callbacks")} == {"sent"}
    stored = dict(_rows("SELECT title, callback_url FROM notifications WHERE recipient_id"
                        " = 'eve'"))
    assert stored == {"default": url, "own": own.url("/own")}


def _api_key(*scopes: str, callback_url: str | None = None) -> str:
    from notifier.storage.api_keys import Scope, create_key

    with session_scope() as session:
        _, key = create_key(session, "test", [Scope(s) for s in scopes], None, callback_url)
    return key


def test_a_receiver_that_never_recovers_parks_the_callback_not_the_notification(
    smtp_server: SmtpServer,
) -> None:
    with CallbackReceiver(lambda: "", always=503) as receiver:
        receiver.secret = _secret_of(receiver.url())
        worker = WorkerProcess.start(env={
            "NOTIFIER_CHANNELS__EMAIL": smtp_server.url(), "NOTIFIER_RETRY_BASE": "0.2",
            "NOTIFIER_CALLBACK_MAX_ATTEMPTS": "3"})
        try:
            note = client.notify({"id": "fay", "email": "fay@example.com"}, "alert", "hello",
                                 priority="critical", channels=["email"],
                                 callback_url=receiver.url())
            wait_for(lambda: _ended(note), 30, "the delivery to end")
            _sweep_until(lambda: bool(_rows("SELECT 1 FROM callbacks WHERE state = 'dead'")),
                         60, "the callback to be parked")
        finally:
            worker.stop()
    [callback] = _rows("SELECT state, attempts, last_error, status FROM callbacks")
    assert callback.state == "dead" and callback.attempts == 3 and callback.status == "sent"
    assert "HTTP 503" in callback.last_error
    assert sum(receiver.attempts.values()) == 3 and receiver.accepted == {}
    assert _delivery(note).status == "sent" and len(smtp_server.messages) == 1
    [(status,)] = _rows("SELECT status FROM notifications WHERE id = :n", n=note)
    assert status == "delivered"


def _finish_delivery(callback_url: str | None, status: str = "sent") -> uuid.UUID:
    """A notification and its delivery written as ingest writes them, then moved to
    ``status`` by a plain UPDATE, as any status writer does."""
    note, delivery = uuid.uuid4(), uuid.uuid4()
    with session_scope() as session:
        session.execute(text(
            "INSERT INTO notifications (id, recipient_id, type, priority, title, status,"
            " callback_url) VALUES (:n, 'gus', 'alert', 'critical', 't', 'dispatched', :u)"),
            {"n": note, "u": callback_url})
        session.execute(text(
            "INSERT INTO deliveries (id, notification_id, recipient_id, channel, priority,"
            " status, callback) VALUES (:d, :n, 'gus', 'webhook', 'critical', 'sending', :c)"),
            {"d": delivery, "n": note, "c": callback_url is not None})
        session.execute(text("UPDATE deliveries SET status = :s WHERE id = :d"),
                        {"s": status, "d": delivery})
    return delivery


def test_an_ssrf_blocked_callback_url_is_parked_unsent() -> None:
    """127.0.0.1 is refused by the egress guard when private targets are not allowed
    (the tests allow them, as for their local servers: here they do not)."""
    guarded = get_settings().model_copy(update={"allow_private_targets": False})
    with HttpServer() as target:
        _finish_delivery(target.url("/cb"))
        with session_scope() as session:
            tasks = sweep_due_callbacks(raw_cursor(session), guarded)
        [task] = tasks
        outcome = send_callbacks(task.callback_ids, guarded, state_redis())
        assert outcome.dead == 1 and outcome.sent == 0
        assert target.requests == []
    [(state, error)] = _rows("SELECT state, last_error FROM callbacks")
    assert state == "dead" and "127.0.0.1" in error and "loopback" in error


def test_one_event_per_delivery_and_status_and_none_without_a_url() -> None:
    delivery = _finish_delivery("https://callbacks.example.com/in", "sent")
    _finish_delivery(None, "sent")
    with session_scope() as session:
        for status in ("delivered", "delivered", "bounced", "complained"):
            session.execute(text("UPDATE deliveries SET status = :s WHERE id = :d"),
                            {"s": status, "d": delivery})
        # Back and forth (a replayed dead letter dying again): still one event each.
        session.execute(text("UPDATE deliveries SET status = 'sent' WHERE id = :d"),
                        {"d": delivery})
    rows = _rows("SELECT delivery_id, status, state FROM callbacks ORDER BY occurred_at")
    assert [(r.delivery_id, r.status) for r in rows] == [
        (delivery, "sent"), (delivery, "delivered"), (delivery, "bounced"),
        (delivery, "complained")]
    assert {r.state for r in rows} == {"pending"}


def test_the_trigger_reports_exactly_the_finished_statuses() -> None:
    """The trigger's list is migration 0016's snapshot; it must be the one constant."""
    [(definition,)] = _rows("SELECT pg_get_triggerdef(oid) FROM pg_trigger"
                            " WHERE tgname = 'callback_event'")
    listed = set(re.findall(r"'([a-z]+)'", definition.split("ARRAY[")[1].split("]")[0]))
    assert listed == set(FINISHED_DELIVERY_STATUSES)


def test_api_keys_create_takes_a_default_callback_url_and_the_secret_command() -> None:
    made = subprocess.run([NOTIFIER, "api-keys", "create", "hooks", "--callback-url",
                           "https://hooks.example.com/status"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    [(url,)] = _rows("SELECT callback_url FROM api_keys WHERE name = 'hooks'")
    assert url == "https://hooks.example.com/status"
    refused = subprocess.run([NOTIFIER, "api-keys", "create", "bad", "--callback-url",
                              "ftp://hooks.example.com/"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and "--callback-url" in refused.stderr
    shown = subprocess.run([NOTIFIER, "callbacks", "secret", "https://hooks.example.com/x"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == _secret_of("https://hooks.example.com/status")()


def test_retention_purges_old_sent_and_parked_callbacks_only() -> None:
    from notifier.pipeline.retention import purge_expired
    from notifier.settings import Settings

    with session_scope() as session:
        for state, days in (("sent", 40), ("dead", 40), ("retrying", 40), ("sent", 1)):
            session.execute(text(
                "INSERT INTO callbacks (id, delivery_id, notification_id, channel, status,"
                " url, state, updated_at) VALUES (gen_random_uuid(), gen_random_uuid(),"
                " gen_random_uuid(), 'email', 'sent', 'https://cb.example.com/', :state,"
                " now() - make_interval(days => :days))"), {"state": state, "days": days})
    purged = purge_expired(Settings(retention_batch_pause=0))
    assert purged.get("callbacks") == 2
    left = sorted((r.state, r.young) for r in _rows(
        "SELECT state, updated_at > now() - interval '2 days' AS young FROM callbacks"))
    assert left == [("retrying", False), ("sent", True)]


def _ingest_statements(monkeypatch: Any, payloads: list[dict[str, Any]]) -> list[str]:
    """The statements one ingest batch sends to Postgres (every ``execute`` and ``copy``
    of its psycopg cursor, recorded on the way through)."""
    import psycopg

    from notifier.pipeline.ingest import IngestMessage, ingest_batch

    seen: list[str] = []
    execute, copy = psycopg.Cursor.execute, psycopg.Cursor.copy

    def spy_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(" ".join(str(query).split()))
        return execute(self, query, *args, **kwargs)

    def spy_copy(self: Any, statement: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(" ".join(str(statement).split()))
        return copy(self, statement, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", spy_execute)
    monkeypatch.setattr(psycopg.Cursor, "copy", spy_copy)
    with session_scope() as session:
        result = ingest_batch(session, [IngestMessage(f"m-{uuid.uuid4()}", payloads)])
    monkeypatch.undo()
    assert len(result.stored) == len(payloads)
    return seen


def test_a_batch_without_callback_urls_pays_nothing_for_them(monkeypatch: Any) -> None:
    """Statements counted, not timed: a batch with no callback URL sends the same
    statements whether or not another batch had one, none of them about callbacks; a
    batch with one adds one UPDATE and the ``callback`` column of its deliveries."""
    def batch(tag: str, url: str | None = None) -> list[dict[str, Any]]:
        return [{"recipient": {"id": f"{tag}-{i}", "email": f"{tag}{i}@example.com"},
                 "type": "alert", "title": "t", "priority": "critical", "channels": ["email"],
                 **({"callback_url": url} if url and i == 0 else {})} for i in range(20)]

    plain = _ingest_statements(monkeypatch, batch("a"))
    with_url = _ingest_statements(monkeypatch, batch("b", "https://cb.example.com/in"))
    plain_again = _ingest_statements(monkeypatch, batch("c"))
    assert not any("callback" in statement for statement in plain)
    assert len(plain_again) == len(plain)
    extra = [s for s in with_url if "callback" in s]
    assert len(with_url) == len(plain) + 1 and len(extra) == 2
    assert extra[0].startswith("UPDATE notifications n SET callback_url")
    assert extra[1].startswith("INSERT INTO deliveries")
    flagged = _rows("SELECT n.recipient_id, d.callback FROM deliveries d"
                    " JOIN notifications n ON n.id = d.notification_id WHERE d.callback")
    assert [r.recipient_id for r in flagged] == ["b-0"]


def test_a_failing_receivers_circuit_holds_its_callbacks_without_counting_attempts() -> None:
    """In process: after the endpoint circuit's threshold of 5xx, the receiver's next
    callbacks are put back (``held``), no attempt counted, none POSTed."""
    settings = get_settings().model_copy(update={"endpoint_breaker_threshold": 2,
                                                 "retry_base": 0.01})
    with HttpServer() as receiver:
        receiver.respond_always(503, "down")
        for _ in range(4):
            _finish_delivery(receiver.url("/cb"))

        def sweep() -> list[str]:
            with session_scope() as session:
                tasks = sweep_due_callbacks(raw_cursor(session), settings)
            return [i for task in tasks for i in task.callback_ids]

        queued = sweep()
        first = send_callbacks(queued[:2], settings, state_redis())
        assert (first.retrying, first.held) == (2, 0) and len(receiver.requests) == 2
        time.sleep(0.05)  # the two retries fall due
        second = send_callbacks(queued[2:] + sweep(), settings, state_redis())
        assert (second.held, second.sent, second.retrying) == (4, 0, 0)
        assert len(receiver.requests) == 2
    attempts = sorted(r.attempts for r in _rows("SELECT attempts FROM callbacks"))
    assert attempts == [0, 0, 1, 1]
