"""A recipient that still has notifications cannot be deleted or renamed (migration 0015).

``notifications.recipient_id`` has no foreign key (its check per inserted row was the
write's largest cost); a trigger on ``recipients`` refuses what the key refused.
"""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from notifier.storage.db import session_scope
from tests.pipeline.helpers import T0, ingest, note, query


def _run(sql: str, **params: str) -> None:
    with session_scope() as session:
        session.execute(text(sql), params)


def test_a_recipient_with_notifications_cannot_be_deleted():
    ingest([note("alert", "kept-recipient")], now=T0)
    with pytest.raises(IntegrityError) as refused:
        _run("DELETE FROM recipients WHERE id = :id", id="kept-recipient")
    assert isinstance(refused.value.orig, psycopg.errors.ForeignKeyViolation)
    assert "'kept-recipient' still has notifications" in str(refused.value.orig)
    assert query("SELECT count(*) FROM recipients WHERE id = 'kept-recipient'")[0][0] == 1


def test_a_recipient_with_notifications_cannot_change_its_id():
    ingest([note("alert", "named-recipient")], now=T0)
    with pytest.raises(IntegrityError):
        _run("UPDATE recipients SET id = 'renamed' WHERE id = :id", id="named-recipient")


def test_a_recipient_without_notifications_is_deleted_and_edited_freely():
    _run("INSERT INTO recipients (id) VALUES ('lonely'), ('editable')")
    ingest([note("alert", "busy")], now=T0)
    _run("UPDATE recipients SET name = 'Ed' WHERE id IN ('editable', 'busy')")
    _run("UPDATE recipients SET id = 'edited' WHERE id = 'editable'")
    _run("DELETE FROM recipients WHERE id = 'lonely'")
    assert query("SELECT id FROM recipients WHERE id IN ('lonely', 'editable', 'edited',"
                 " 'busy') ORDER BY id") == [("busy",), ("edited",)]
