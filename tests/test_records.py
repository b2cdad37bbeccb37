"""The database-facing API (``notifier.records``) on real Postgres, and its old spelling
``notifier.client.<name>``."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from notifier import client, records
from notifier.channels.base import OutgoingMessage
from notifier.channels.inapp import InAppChannel
from notifier.pipeline.ingest import IngestMessage, ingest_batch
from notifier.schemas import NotificationError
from notifier.storage.db import session_scope


def _ingest(**fields: object) -> str:
    note_id = str(uuid.uuid4())
    note = {"id": note_id, "recipient": "cli-user", "type": "reminder", "title": "Hi"} | fields
    with session_scope() as session:
        ingest_batch(session, [IngestMessage(str(uuid.uuid4()), note)])
    return note_id


def _status(note_id: str) -> str:
    with session_scope() as session:
        return session.execute(text("SELECT status FROM notifications WHERE id = :id"),
                               {"id": note_id}).scalar_one()


def _deliver_to_inbox(recipient: str, count: int) -> list[str]:
    """``count`` in-app messages sent to ``recipient`` by the real in-app channel; their ids."""
    messages = [OutgoingMessage(uuid.uuid4(), recipient, None, "alert", "high", f"Title {i}",
                                "body") for i in range(count)]
    assert all(result.sent for result in InAppChannel("inapp://").send_batch(messages))
    return [str(message.delivery_id) for message in messages]


def test_preferences_api():
    """set_preferences stores and answers what is stored; get_preferences reads it back."""
    stored = records.set_preferences("dora", email="dora@example.org", min_priority="high",
                                     quiet_hours=[{"days": ["sat", "sun"], "start": "00:00",
                                                   "end": "24:00"}])
    assert stored["min_priority"] == "high"
    assert records.get_preferences("dora")["email"] == "dora@example.org"
    assert records.get_preferences("no-such-recipient") is None


def test_preferences_round_trip():
    """What set_preferences returns is what get_preferences reads, defaults filled in; a
    bad value raises NotificationError naming the field."""
    result = records.set_preferences(
        "u4", timezone="America/New_York", quiet_hours=[
            {"days": ["mon", "tue"], "start": "22:00", "end": "07:00"}
        ], opt_out={"marketing": ["*"]},
    )
    assert result == records.get_preferences("u4")
    assert result["timezone"] == "America/New_York"
    assert result["quiet_hours"] == [{"days": ["mon", "tue"], "start": "22:00", "end": "07:00"}]
    assert result["opt_out"] == {"marketing": ["*"]}
    assert result["digest_mode"] == "immediate"
    assert records.get_preferences("nobody") is None
    with pytest.raises(NotificationError, match="min_priority"):
        records.set_preferences("u4", min_priority="urgent")


def test_cancel():
    """A pending notification is cancelled once; a second cancel finds nothing to take back."""
    note_id = _ingest()
    assert records.cancel(note_id) is True
    assert records.cancel(note_id) is False
    assert _status(note_id) == "cancelled"


def test_cancel_by_idempotency_key_and_bad_input():
    """cancel takes an idempotency key instead of an id, and refuses neither or both."""
    note_id = _ingest(idempotency_key="invoice-7")
    assert records.cancel(idempotency_key="invoice-7") is True
    assert _status(note_id) == "cancelled"
    assert records.cancel(idempotency_key="never-used") is False
    for bad in ({}, {"notification_id": note_id, "idempotency_key": "invoice-7"}):
        with pytest.raises(NotificationError, match="give a notification id or an idempotency"):
            records.cancel(**bad)


def test_lookup_answers_the_id_stored_under_a_key():
    """lookup finds the notification stored under an idempotency key, None for an unknown key."""
    note_id = _ingest(idempotency_key="order-42")
    assert records.lookup("order-42") == note_id
    assert records.lookup("order-43") is None


def test_inbox_lists_newest_first_and_mark_read_marks_only_the_recipients():
    """inbox lists unread messages newest first; mark_read marks the given ids (or all) of
    that recipient only, and read ones still show with unread_only=False."""
    ids = _deliver_to_inbox("reader", 3)
    other = _deliver_to_inbox("someone-else", 1)
    listed = records.inbox("reader")
    assert sorted(item["id"] for item in listed) == sorted(ids)
    assert [item["created_at"] for item in listed] == sorted(
        (item["created_at"] for item in listed), reverse=True)
    assert {item["title"] for item in listed} == {"Title 0", "Title 1", "Title 2"}
    assert all(item["read_at"] is None for item in listed)

    assert records.mark_read("reader", [ids[0], other[0]]) == 1
    assert ids[0] not in {item["id"] for item in records.inbox("reader")}
    assert records.inbox("someone-else")[0]["read_at"] is None
    assert records.mark_read("reader") == 2
    assert records.inbox("reader") == []
    everything = records.inbox("reader", unread_only=False, limit=2)
    assert len(everything) == 2 and all(item["read_at"] is not None for item in everything)


def test_the_old_spelling_in_client_is_the_same_function():
    """``notifier.client.lookup`` and the rest still work, as aliases of notifier.records;
    an unknown name still raises AttributeError."""
    for name in ("lookup", "inbox", "mark_read", "set_preferences", "get_preferences",
                 "cancel"):
        assert getattr(client, name) is getattr(records, name)
    from notifier.client import lookup

    assert lookup is records.lookup
    with pytest.raises(AttributeError, match="no_such_thing"):
        client.no_such_thing  # noqa: B018
