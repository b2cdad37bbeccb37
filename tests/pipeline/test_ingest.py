"""Ingest domain functions against the run's real Postgres (no broker involved)."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from notifier.pipeline.ingest import IngestMessage, ingest_batch
from notifier.storage.db import session_scope
from tests.workers import count_rows


def _message(payload: object, message_id: str | None = None) -> IngestMessage:
    return IngestMessage(message_id or str(uuid.uuid4()), payload)


def _note(**fields: object) -> dict[str, object]:
    return {"recipient": "user-1", "type": "task_deadline", "title": "Due soon"} | fields


def _ingest(*messages: IngestMessage):
    with session_scope() as session:
        return ingest_batch(session, list(messages))


def test_batch_is_written_in_one_transaction():
    """A batch of many messages lands as rows of a single transaction (one bulk write)."""
    messages = [_message([_note(title=f"n{i}-{j}") for j in range(50)]) for i in range(10)]
    result = _ingest(*messages)
    assert len(result.stored) == 500
    assert count_rows("SELECT count(DISTINCT xmin::text) FROM notifications") == 1


def test_data_survives_copy_exactly():
    """data with quotes, backslashes, tabs, newlines and non-ASCII is stored as sent."""
    data = {"text": 'a "quoted"\tline\nnext \\ back', "name": "Zoë ✓", "n": [1, 2.5, None]}
    result = _ingest(_message(_note(data=data)))
    with session_scope() as session:
        stored = session.execute(
            text("SELECT data FROM notifications WHERE id = :id"), {"id": result.stored[0]}
        ).scalar_one()
    assert stored == data


def test_every_column_survives_the_binary_copy():
    """The COPY goes in Postgres' binary format: each column of each kind of row (waiting
    in a window, held by send_at with channels and a key, suppressed with a reason) reads
    back as sent."""
    from datetime import UTC, datetime

    with session_scope() as session:
        session.execute(text(
            "INSERT INTO recipients (id, preferences)"
            " VALUES ('quiet', '{\"opt_out\": {\"task_deadline\": [\"*\"]}}')"
        ))
    sent = datetime(2026, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
    waiting = _note(id=str(uuid.uuid4()), title="Zoë ✓ \"q\"\t\\", body="line\nnext",
                    data={"k": "v ✓"})
    held = _note(id=str(uuid.uuid4()), channels=["email", "webhook"], idempotency_key="k-1",
                 send_at="2031-01-01T08:00:00+00:00")
    quiet = _note(id=str(uuid.uuid4()), recipient="quiet")
    message = IngestMessage(str(uuid.uuid4()), [waiting, held, quiet], enqueued_at=sent)
    with session_scope() as session:
        ingest_batch(session, [message])
        rows = {str(r.id): r for r in session.execute(text(
            "SELECT id, recipient_id, type, priority, channels, title, body, data,"
            " idempotency_key, send_at, status, enqueued_at, status_reason, window_id"
            " FROM notifications"
        ))}
        window = session.execute(text("SELECT id FROM aggregation_windows")).scalar_one()
    row = rows[waiting["id"]]
    assert (row.recipient_id, row.type, row.priority, row.channels, row.title, row.body,
            row.data, row.idempotency_key, row.send_at, row.status, row.enqueued_at,
            row.status_reason, row.window_id) == (
        "user-1", "task_deadline", "normal", None, waiting["title"], "line\nnext",
        {"k": "v ✓"}, None, None, "pending", sent, None, window)
    row = rows[held["id"]]
    assert (row.channels, row.idempotency_key, row.send_at, row.status, row.window_id) == (
        ["email", "webhook"], "k-1", datetime(2031, 1, 1, 8, tzinfo=UTC), "dispatched", None)
    row = rows[quiet["id"]]
    assert (row.status, row.status_reason) == (
        "suppressed", "opted out of task_deadline on inapp")


def test_bad_items_are_dead_lettered_and_good_ones_land():
    """An invalid item becomes a dead letter naming the field; the rest of the batch lands."""
    good = _note()
    bad = _note(priority="urgent")
    result = _ingest(_message([good, bad, _note(title="other")], "m-1"))
    assert (len(result.stored), result.rejected) == (2, 1)
    with session_scope() as session:
        row = session.execute(
            text("SELECT stage, reason, payload, dedup_key FROM dead_letters")
        ).one()
    assert row.stage == "ingest"
    assert row.reason == "priority: must be one of critical, high, normal, low (got 'urgent')"
    assert row.payload == bad
    assert row.dedup_key == "ingest:m-1:1"


def test_redelivered_message_changes_nothing():
    """The same message ingested twice (a worker died before its ack) adds no rows."""
    message = _message([_note(id=str(uuid.uuid4())), _note(type="BAD")], "m-2")
    _ingest(message)
    again = _ingest(message)
    assert again.stored == []
    assert count_rows() == 1
    assert count_rows("SELECT count(*) FROM dead_letters") == 1


def test_redelivered_message_without_ids_changes_nothing():
    """Notifications sent without ids get the same ids when their message comes again."""
    message = _message([_note(), _note(title="second")], "m-no-ids")
    first = _ingest(message)
    again = _ingest(message)
    assert len(first.stored) == 2 and again.stored == []
    assert count_rows() == 2


def test_same_id_twice_is_a_no_op():
    """A notification id seen before is not stored again, within a batch or across batches."""
    note = _note(id=str(uuid.uuid4()))
    first = _ingest(_message([note, note]))
    second = _ingest(_message(note))
    assert (len(first.stored), first.repeated_ids, second.stored) == (1, 1, [])
    assert count_rows() == 1


def test_idempotency_key_repeats_are_dropped_and_counted():
    """A repeated idempotency key is dropped, counted, and answered with the first id."""
    from notifier.records import lookup

    first = _ingest(_message(_note(idempotency_key="order-42")))
    repeated = _note(idempotency_key="order-42")
    repeat = _ingest(_message([repeated, repeated | {"title": "again"}]))
    assert repeat.duplicates == 2 and repeat.stored == []
    assert lookup("order-42") == str(first.stored[0])
    assert count_rows("SELECT duplicates FROM idempotency_keys WHERE key = 'order-42'") == 2


def test_idempotency_key_is_accepted_again_after_the_window():
    """Once the dedup window has passed, the same key makes a new notification."""
    _ingest(_message(_note(idempotency_key="weekly")))
    with session_scope() as session:
        session.execute(text("UPDATE idempotency_keys SET expires_at = now() - interval '1 s'"))
    later = _ingest(_message(_note(idempotency_key="weekly")))
    assert len(later.stored) == 1
    assert count_rows() == 2


def test_inline_recipient_is_upserted():
    """A recipient object creates the recipient, and a later one updates its fields."""
    _ingest(_message(_note(recipient={"id": "ada", "email": "ada@example.org"})))
    _ingest(_message(_note(recipient={"id": "ada", "name": "Ada", "timezone": "Europe/Berlin",
                                      "addresses": {"webhook": "https://hooks.example.org/a"}})))
    with session_scope() as session:
        row = session.execute(text("SELECT * FROM recipients WHERE id = 'ada'")).one()
    assert (row.email, row.name, row.timezone) == ("ada@example.org", "Ada", "Europe/Berlin")
    assert row.addresses == {"webhook": "https://hooks.example.org/a"}


def test_critical_notifications_get_delivery_rows_at_ingest():
    """Critical notifications skip aggregation: one pending delivery per channel at once."""
    with session_scope() as session:
        session.execute(text(
            "INSERT INTO recipients (id, preferences) VALUES ('ops', '{\"channels\": [\"slack\"]}')"
        ))
    result = _ingest(_message([
        _note(priority="critical", channels=["email", "webhook"]),
        _note(priority="critical", recipient="ops"),
        _note(priority="normal"),
    ]))
    assert len(result.delivery_ids) == 3
    with session_scope() as session:
        rows = session.execute(text(
            "SELECT d.channel, n.status FROM deliveries d JOIN notifications n"
            " ON n.id = d.notification_id ORDER BY d.channel"
        )).all()
    assert [tuple(r) for r in rows] == [
        ("email", "dispatched"), ("slack", "dispatched"), ("webhook", "dispatched")
    ]
    assert count_rows("SELECT count(*) FROM notifications WHERE status = 'pending'") == 1


def test_message_of_the_wrong_shape_is_dead_lettered_whole():
    """A message that is not a notification or a list of them is rejected with the reason."""
    _ingest(IngestMessage("m-3", {"args": [1, 2], "kwargs": {}}, error="message: wrong shape"))
    sql = "SELECT count(*) FROM dead_letters WHERE dedup_key = 'ingest:m-3:message'"
    assert count_rows(sql) == 1


# --- hostile input (issue 10) ------------------------------------------------------------


def test_dead_letter_keeps_a_bounded_prefix_with_size_and_hash():
    """A huge bad item is parked as a prefix of its JSON, its full size and SHA-256."""
    import hashlib
    import json

    from notifier.settings import get_settings

    bad = _note(priority="urgent", data={"pad": "x" * 200_000})
    _ingest(_message(bad, "m-big"))
    with session_scope() as session:
        row = session.execute(text(
            "SELECT payload, payload_bytes, payload_sha256, payload_truncated,"
            " length(payload::text) AS stored FROM dead_letters")).one()
    full = json.dumps(bad, ensure_ascii=False, separators=(",", ":")).encode()
    assert row.payload_truncated and row.payload_bytes == len(full)
    assert row.payload_sha256 == hashlib.sha256(full).hexdigest()
    assert full.decode().startswith(row.payload[:1000])
    assert row.stored < get_settings().dead_letter_payload_bytes + 100


def test_a_truncated_dead_letter_is_not_replayed():
    """Replay refuses a dead letter that kept only a prefix, saying why; a whole one goes."""
    from notifier.pipeline.dead_letters import replay_dead_letters
    from notifier.settings import get_settings

    _ingest(_message(_note(priority="urgent", data={"pad": "x" * 200_000}), "m-cut"),
            _message(_note(priority="urgent"), "m-whole"))
    with session_scope() as session:
        ids = list(session.scalars(text("SELECT id FROM dead_letters ORDER BY dedup_key")))
        replay = replay_dead_letters(session, ids, get_settings())
    assert replay.replayed == 1 and len(replay.ingest_payloads) == 1
    assert len(replay.refused) == 1 and "only a prefix" in replay.refused[0]
    assert count_rows("SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL") == 1


def test_any_task_id_gives_a_key_that_fits():
    """Ids too long or not printable are hashed in dedup keys; others are kept as is."""
    from notifier.pipeline.ingest import dedup_key, message_id_of

    assert dedup_key(message_id_of("abc-123"), 2) == "ingest:abc-123:2"
    for raw in ["t" * 300, "t" * 200, "a\x00b", "\ud800", 42, None, ["x"], {"a": 1}]:
        key = dedup_key(message_id_of(raw), "message")
        assert len(key) <= 255 and key.isprintable(), raw
    _ingest(_message([_note(), _note(type="BAD")], message_id_of("\ud800" * 300)))
    assert count_rows("SELECT count(*) FROM dead_letters") == 1


def test_enqueued_at_header_of_any_type_is_none_or_a_time():
    from notifier.worker.tasks import enqueued_at_of

    for stamp in [1e20, -1, float("nan"), float("inf"), "1", [1], None, True, 2**70]:
        assert enqueued_at_of(stamp) is None, stamp
    assert enqueued_at_of(1_700_000_000).year == 2023


def test_postgres_away_is_told_from_a_refused_message():
    """Connection, schema and resource errors requeue the batch; content ones do not."""
    import psycopg
    from psycopg import errors

    from notifier.worker.tasks import database_unavailable

    assert database_unavailable(psycopg.OperationalError("connection refused"))
    assert database_unavailable(errors.UndefinedTable("no table"))
    assert database_unavailable(errors.AdminShutdown("shutting down"))
    assert database_unavailable(errors.DeadlockDetected("deadlock"))
    assert not database_unavailable(errors.StringDataRightTruncation("too long"))
    assert not database_unavailable(errors.ProgramLimitExceeded("index row too big"))
    assert not database_unavailable(errors.RaiseException("trigger says no"))
    assert not database_unavailable(KeyError("bug"))
