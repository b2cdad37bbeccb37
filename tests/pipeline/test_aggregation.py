"""Aggregation windows and digests against the run's real Postgres, with a clock the tests
control: ``ingest_batch(..., now=...)`` opens and extends windows and
``flush_due_windows(..., now=...)`` closes them, so no test sleeps for a window.

The helpers at the top are shared with ``test_aggregation_flush.py`` and ``test_cancel.py``.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import text

from notifier.ids import uuid7
from notifier.pipeline.aggregation import FlushResult, flush_due_windows
from notifier.pipeline.delivery import deliver_batch, sweep_due_deliveries
from notifier.pipeline.ingest import IngestMessage, IngestResult, ingest_batch
from notifier.pipeline.preferences import set_preferences
from notifier.pipeline.rules import BUILTIN_RULES, Rule, Rules, load_rules
from notifier.settings import get_settings
from notifier.storage.db import session_scope
from notifier.storage.state import state_redis

#: A Tuesday at noon UTC, later than the database's clock: a delivery held until some
#: time after it is still held when the sweeper (which uses Postgres' now()) looks.
T0 = datetime(2031, 1, 14, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


# --- Shared helpers -------------------------------------------------------------------


_last_id = 0


def new_id() -> str:
    """A UUIDv7, each one greater than the last: members of one batch sort as made."""
    global _last_id
    _last_id = max(uuid7().int, _last_id + 1)
    return str(uuid.UUID(int=_last_id))


def note(type: str = "alert", recipient: Any = "user-1", **fields: Any) -> dict[str, Any]:
    """A notification with an id of its own (so the test knows it) and a unique title."""
    note_id = new_id()
    return {"id": note_id, "recipient": recipient, "type": type,
            "title": f"{type} {note_id[-6:]}"} | fields


def ingest(
    notes: list[dict[str, Any]], *, now: datetime, rules: Rules | None = None,
    message_id: str | None = None,
) -> IngestResult:
    """One broker message carrying ``notes``, ingested at ``now``."""
    message = IngestMessage(message_id or str(uuid.uuid4()), list(notes))
    with session_scope() as session:
        return ingest_batch(session, [message], rules=rules or BUILTIN_RULES, now=now)


def raw_cursor(session: Any) -> Any:
    return session.connection().connection.driver_connection.cursor()


def flush(now: datetime, rules: Rules = BUILTIN_RULES, limit: int | None = None) -> FlushResult:
    with session_scope() as session:
        return flush_due_windows(raw_cursor(session), rules, get_settings(), now, limit)


def query(sql: str, **params: Any) -> list[Any]:
    with session_scope() as session:
        return list(session.execute(text(sql), params).all())


def status(note_or_id: Any) -> str:
    note_id = note_or_id["id"] if isinstance(note_or_id, dict) else str(note_or_id)
    [(value,)] = query("SELECT status FROM notifications WHERE id = :id", id=note_id)
    return value


def digests() -> list[Any]:
    return query("SELECT * FROM digests ORDER BY window_start, created_at, item_count DESC")


def windows() -> list[Any]:
    return query("SELECT * FROM aggregation_windows ORDER BY opened_at, id")


def ids(notes: list[dict[str, Any]]) -> list[uuid.UUID]:
    return [uuid.UUID(n["id"]) for n in notes]


def with_rules(*extra: Rule) -> Rules:
    """The built-in rules plus (or replaced by) ``extra``."""
    return Rules([*(r for r in BUILTIN_RULES if r.type != "*"), *extra], BUILTIN_RULES.default)


def deliveries_of(note_or_digest_id: Any) -> list[Any]:
    return query(
        "SELECT * FROM deliveries WHERE notification_id = :id OR digest_id = :id ORDER BY channel",
        id=str(note_or_digest_id),
    )


# --- Fixed windows: time- and count-triggered flushes ----------------------------------


def test_fixed_window_is_flushed_when_its_time_is_up():
    """alert: 5 minutes, fixed. Items within the window wait; at its end, one digest."""
    first, second = note(), note()
    ingest([first], now=T0)
    ingest([second], now=T0 + MINUTE)
    [window] = windows()
    assert (window.mode, window.due_at, window.item_count) == ("fixed", T0 + 5 * MINUTE, 2)

    early = flush(T0 + 5 * MINUTE - timedelta(seconds=1))
    assert early.windows == 0
    assert status(first) == status(second) == "pending"

    result = flush(T0 + 5 * MINUTE)
    assert (result.windows, result.digests, result.notifications) == (1, 1, 2)
    [digest] = digests()
    assert digest.title == "2 alerts"
    assert digest.notification_ids == ids([first, second])
    assert status(first) == status(second) == "digested"
    [delivery] = deliveries_of(digest.id)
    assert (delivery.channel, delivery.status) == ("inapp", "queued")
    assert [t.delivery_ids for t in result.tasks] == [[str(delivery.id)]]
    assert windows() == []


def test_a_group_reaching_its_max_count_is_flushed_at_once():
    """alert: at most 3. Seven at once: two full windows due now, the seventh waits."""
    notes = [note() for _ in range(7)]
    ingest(notes, now=T0)
    result = flush(T0)
    assert (result.windows, result.digests, result.notifications) == (2, 2, 6)
    assert [d.item_count for d in digests()] == [3, 3]
    assert [d.title for d in digests()] == ["3 alerts", "3 alerts"]
    assert sorted(i for d in digests() for i in d.notification_ids) == sorted(ids(notes[:6]))
    assert status(notes[6]) == "pending"
    [open_window] = windows()
    assert (open_window.item_count, open_window.due_at, open_window.closed) == (
        1, T0 + 5 * MINUTE, False)

    # The seventh goes when its window ends, alone: as itself, not a digest of one.
    assert flush(T0 + 4 * MINUTE).windows == 0
    last = flush(T0 + 5 * MINUTE)
    assert (last.windows, last.digests, last.notifications) == (1, 0, 1)
    assert status(notes[6]) == "dispatched"
    [delivery] = deliveries_of(notes[6]["id"])
    assert (delivery.channel, delivery.status) == ("inapp", "queued")


def test_max_count_across_batches_closes_the_window_early():
    """The third alert, in a later batch, closes the window long before its five minutes."""
    notes = [note() for _ in range(4)]
    ingest(notes[:2], now=T0)
    ingest(notes[2:3], now=T0 + MINUTE)
    [window] = windows()
    assert window.closed and window.due_at == T0 + MINUTE
    ingest(notes[3:], now=T0 + MINUTE)  # the next item opens the next window
    result = flush(T0 + MINUTE)
    assert (result.windows, result.digests) == (1, 1)
    assert digests()[0].notification_ids == ids(notes[:3])
    [window] = windows()
    assert (window.item_count, window.opened_at) == (1, T0 + MINUTE)
    assert status(notes[3]) == "pending"


def test_an_item_after_the_due_time_opens_a_new_window_even_before_the_flush():
    """A window is over at its due time, whether or not beat has flushed it yet."""
    early = [note(), note()]
    late = note()
    ingest(early, now=T0)
    ingest([late], now=T0 + 6 * MINUTE)  # the first window ended at T0 + 5 min
    assert [w.item_count for w in windows()] == [2, 1]
    result = flush(T0 + 6 * MINUTE)
    assert (result.windows, result.digests) == (1, 1)
    assert digests()[0].notification_ids == ids(early)
    assert status(late) == "pending"
    [window] = windows()
    assert window.due_at == T0 + 11 * MINUTE


def test_a_redelivered_message_does_not_count_twice_in_a_window():
    """A worker killed before its ack gets the message again: it adds nothing to a window,
    so it cannot close one by count."""
    notes = [note(), note()]
    ingest(notes, now=T0, message_id="m-1")
    again = ingest(notes, now=T0, message_id="m-1")
    assert again.stored == []
    [window] = windows()
    assert (window.item_count, window.closed) == (2, False)
    assert flush(T0 + MINUTE).windows == 0
    assert status(notes[0]) == status(notes[1]) == "pending"


# --- Leading and sliding windows ------------------------------------------------------

LEADING = Rule("build", timedelta(minutes=10), 5, mode="leading",
               title_template="{{ count }} builds")
SLIDING = Rule("chat", timedelta(minutes=10), 100, mode="sliding",
               max_wait=timedelta(minutes=30), title_template="{{ count }} messages")


def test_leading_sends_the_first_at_once_and_batches_the_rest():
    rules = with_rules(LEADING)
    first = note("build")
    result = ingest([first], now=T0, rules=rules)
    assert status(first) == "dispatched"
    [delivery] = deliveries_of(first["id"])
    assert delivery.status == "pending" and result.delivery_ids == [delivery.id]

    rest = [note("build") for _ in range(3)]
    for minute, item in enumerate(rest, start=1):
        assert ingest([item], now=T0 + minute * MINUTE, rules=rules).delivery_ids == []
    assert {status(n) for n in rest} == {"pending"}
    assert flush(T0 + 10 * MINUTE - timedelta(seconds=1), rules).windows == 0

    flushed = flush(T0 + 10 * MINUTE, rules)
    assert (flushed.windows, flushed.digests, flushed.notifications) == (1, 1, 3)
    [digest] = digests()
    assert (digest.title, digest.notification_ids) == ("3 builds", ids(rest))

    # Quiet again: the next one is immediate once more, and opens the next window.
    after = note("build")
    assert len(ingest([after], now=T0 + 11 * MINUTE, rules=rules).delivery_ids) == 1
    assert status(after) == "dispatched"
    follower = note("build")
    ingest([follower], now=T0 + 12 * MINUTE, rules=rules)
    assert status(follower) == "pending"
    # Long after that window's end (and before any flush), the next is immediate again.
    much_later = note("build")
    assert len(ingest([much_later], now=T0 + 40 * MINUTE, rules=rules).delivery_ids) == 1
    final = flush(T0 + 40 * MINUTE, rules)
    assert (final.windows, final.digests, final.notifications) == (1, 0, 1)
    assert status(follower) == "dispatched"  # alone in its window: sent as itself
    assert len(digests()) == 1


def test_leading_burst_is_flushed_at_max_count():
    """After the leading item, max_count more fill the window and it goes at once."""
    rules = with_rules(LEADING)
    burst = [note("build") for _ in range(6)]
    result = ingest(burst, now=T0, rules=rules)
    assert len(result.delivery_ids) == 1 and status(burst[0]) == "dispatched"
    flushed = flush(T0, rules)
    assert (flushed.windows, flushed.digests, flushed.notifications) == (1, 1, 5)
    assert digests()[0].notification_ids == ids(burst[1:])
    assert {status(n) for n in burst[1:]} == {"digested"}


def test_leading_long_burst_leads_once_per_period():
    """A burst longer than max_count: one lead item, then full digests; what follows in
    the same period waits for its end instead of leading again."""
    rules = with_rules(LEADING)
    burst = [note("build") for _ in range(12)]
    assert len(ingest(burst, now=T0, rules=rules).delivery_ids) == 1
    flushed = flush(T0, rules)
    assert (flushed.windows, flushed.digests, flushed.notifications) == (2, 2, 10)
    assert [d.notification_ids for d in digests()] == [ids(burst[1:6]), ids(burst[6:11])]
    later = note("build")
    assert ingest([later], now=T0 + MINUTE, rules=rules).delivery_ids == []
    assert flush(T0 + 10 * MINUTE - timedelta(seconds=1), rules).windows == 0
    end = flush(T0 + 10 * MINUTE, rules)
    assert (end.windows, end.digests, end.notifications) == (1, 1, 2)
    assert digests()[-1].notification_ids == ids([burst[11], later])
    quiet_again = note("build")
    assert len(ingest([quiet_again], now=T0 + 11 * MINUTE, rules=rules).delivery_ids) == 1


def test_sliding_window_extends_with_each_item_up_to_max_wait():
    rules = with_rules(SLIDING)
    notes = [note("chat") for _ in range(4)]
    expected_due = [10, 18, 26, 30]  # each item + 10 min, capped at first + 30 min
    for item, minute, due in zip(notes, [0, 8, 16, 24], expected_due, strict=True):
        assert flush(T0 + minute * MINUTE, rules).windows == 0  # never closed in between
        ingest([item], now=T0 + minute * MINUTE, rules=rules)
        [window] = windows()
        assert window.due_at == T0 + due * MINUTE
        assert window.latest_due_at == T0 + 30 * MINUTE
    assert flush(T0 + 30 * MINUTE - timedelta(seconds=1), rules).windows == 0
    result = flush(T0 + 30 * MINUTE, rules)
    assert (result.digests, result.notifications) == (1, 4)
    [digest] = digests()
    assert (digest.title, digest.notification_ids) == ("4 messages", ids(notes))
    assert digest.window_start == T0 and digest.window_end == T0 + 30 * MINUTE


def test_sliding_window_closes_after_a_quiet_gap():
    """No item for a whole window: it closes then, long before max_wait."""
    rules = with_rules(Rule("chat", timedelta(minutes=10), 100, mode="sliding"))
    notes = [note("chat"), note("chat")]
    ingest(notes[:1], now=T0, rules=rules)
    ingest(notes[1:], now=T0 + 5 * MINUTE, rules=rules)
    [window] = windows()
    assert window.latest_due_at == T0 + 40 * MINUTE  # default cap: 4 windows
    assert flush(T0 + 15 * MINUTE - timedelta(seconds=1), rules).windows == 0
    assert flush(T0 + 15 * MINUTE, rules).digests == 1


# --- Preferences: suppression, quiet hours, digest mode ----------------------------------


def _prefs(recipient: str, **changes: Any) -> None:
    with session_scope() as session:
        set_preferences(session, recipient, changes)


def test_opted_out_and_low_priority_are_suppressed_with_a_reason():
    """Recorded with the reason, never delivered; an opt-out of one channel only drops it."""
    _prefs("picky", channels=["inapp", "email"], email="picky@example.org",
           min_priority="normal", opt_out={"reminder": ["*"], "announcement": ["email"]})
    reminder = note("reminder", "picky")
    reminder_on_webhook = note("reminder", "picky", channels=["webhook"])
    low = note("alert", "picky", priority="low")
    announcement_by_email = note("announcement", "picky", channels=["email"])
    critical_low_type = note("alert", "picky", priority="critical")
    announcements = [note("announcement", "picky") for _ in range(2)]
    everything = [reminder, reminder_on_webhook, low, announcement_by_email,
                  critical_low_type, *announcements]
    result = ingest(everything, now=T0)

    assert len(result.stored) == len(everything) and result.suppressed == 4
    reasons = dict(query(
        "SELECT id::text, status_reason FROM notifications WHERE status = 'suppressed'"
    ))
    assert reasons == {
        reminder["id"]: "opted out of reminder on inapp, email",
        reminder_on_webhook["id"]: "opted out of reminder on webhook",
        low["id"]: "priority low is below the recipient's minimum normal",
        announcement_by_email["id"]: "opted out of announcement on email",
    }
    # Critical is never below the minimum: delivered at once on both channels.
    assert [d.channel for d in deliveries_of(critical_low_type["id"])] == ["email", "inapp"]
    # The two announcements wait; their digest goes to in-app only (e-mail opted out).
    [window] = windows()
    assert (window.type, window.item_count) == ("announcement", 2)
    flush(T0 + timedelta(hours=24))
    [digest] = digests()
    assert digest.notification_ids == ids(announcements)
    assert [d.channel for d in deliveries_of(digest.id)] == ["inapp"]
    suppressed = [reminder, reminder_on_webhook, low, announcement_by_email]
    assert all(deliveries_of(n["id"]) == [] for n in suppressed)
    assert {status(n) for n in suppressed} == {"suppressed"}


def test_an_opt_out_made_while_waiting_suppresses_at_the_flush():
    """Preferences are read again when the window closes: a type opted out of meanwhile
    is suppressed then, with a reason, and makes no digest."""
    notes = [note("reminder", "changes-mind") for _ in range(2)]
    ingest(notes, now=T0)
    _prefs("changes-mind", opt_out={"reminder": ["*"]})
    result = flush(T0 + 30 * MINUTE)
    assert (result.windows, result.digests, result.notifications) == (1, 0, 2)
    assert {tuple(r) for r in query("SELECT status, status_reason FROM notifications")} == {
        ("suppressed", "opted out before its digest")}
    assert digests() == [] and query("SELECT count(*) FROM deliveries")[0][0] == 0


def test_one_digest_per_channel_of_the_group():
    """Members asking for different channels: each channel gets the digest of its own."""
    both = [note("task_deadline", channels=["inapp", "webhook"]) for _ in range(2)]
    inapp_only = note("task_deadline", channels=["inapp"])
    ingest([*both, inapp_only], now=T0)
    result = flush(T0 + 30 * MINUTE)
    assert (result.digests, result.notifications) == (2, 3)
    by_channel = {d.channel: d for d in digests()}
    assert by_channel["inapp"].notification_ids == ids([*both, inapp_only])
    assert by_channel["inapp"].title == "3 task deadlines approaching"
    assert by_channel["webhook"].notification_ids == ids(both)
    assert by_channel["webhook"].title == "2 task deadlines approaching"
    for channel, digest in by_channel.items():
        assert [d.channel for d in deliveries_of(digest.id)] == [channel]
    assert {status(n) for n in [*both, inapp_only]} == {"digested"}


NEW_YORK = ZoneInfo("America/New_York")
SECURITY = Rule("security_notice", timedelta(minutes=5), 1, aggregate=False)


def _local(day: int, hour: int, minute: int = 0) -> datetime:
    """A wall-clock time in New York, January 2031 (UTC-5)."""
    return datetime(2031, 1, day, hour, minute, tzinfo=NEW_YORK).astimezone(UTC)


def test_quiet_hours_across_midnight_hold_deliveries_and_critical_passes():
    """22:00-07:00 in the recipient's zone: held until 07:00 local, not dropped."""
    _prefs("owl", timezone="America/New_York",
           quiet_hours=[{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                         "start": "22:00", "end": "07:00"}])
    rules = with_rules(SECURITY)
    night = _local(14, 23, 30)  # Tuesday 23:30 local = Wednesday 04:30 UTC
    morning = _local(15, 7)
    assert morning == datetime(2031, 1, 15, 12, 0, tzinfo=UTC)

    held = note("security_notice", "owl")
    critical = note("alert", "owl", priority="critical")
    batch = [note("alert", "owl"), note("alert", "owl")]
    result = ingest([held, critical, *batch], now=night, rules=rules)

    [held_delivery] = deliveries_of(held["id"])
    assert (held_delivery.status, held_delivery.next_attempt_at) == ("scheduled", morning)
    assert status(held) == "dispatched"
    [critical_delivery] = deliveries_of(critical["id"])
    assert critical_delivery.status == "pending"
    assert result.delivery_ids == [critical_delivery.id]

    # The digest of the two alerts, due at 23:35 local, is held until 07:00 as well.
    flush(night + 5 * MINUTE, rules)
    [digest] = digests()
    [digest_delivery] = deliveries_of(digest.id)
    assert (digest_delivery.status, digest_delivery.next_attempt_at) == ("scheduled", morning)

    # Edges: 21:59 and 07:00 local are not quiet, 22:00 and 06:59 are.
    for moment, expected in [(_local(14, 21, 59), "pending"), (_local(14, 22), "scheduled"),
                             (_local(15, 6, 59), "scheduled"), (morning, "pending")]:
        item = note("security_notice", "owl")
        ingest([item], now=moment, rules=rules)
        assert deliveries_of(item["id"])[0].status == expected, moment

    # The sweeper leaves held deliveries alone until their time, then publishes them.
    scheduled = {str(r.id) for r in query("SELECT id FROM deliveries WHERE status = 'scheduled'")}
    assert len(scheduled) == 4
    with session_scope() as session:
        early = sweep_due_deliveries(raw_cursor(session), get_settings())
    assert not scheduled & {i for task in early for i in task.delivery_ids}
    with session_scope() as session:  # the database's clock reaches 07:00 in New York
        session.execute(text("UPDATE deliveries SET next_attempt_at = now() - interval '1 s'"
                             " WHERE status = 'scheduled'"))
        swept = sweep_due_deliveries(raw_cursor(session), get_settings())
    assert scheduled <= {i for task in swept for i in task.delivery_ids}


BERLIN = ZoneInfo("Europe/Berlin")


def _utc(text_: str) -> datetime:
    return datetime.fromisoformat(text_).replace(tzinfo=UTC)


@pytest.mark.parametrize("days", [
    pytest.param([  # clocks go forward on Sunday 29 March 2026 at 01:00 UTC
        ("2026-03-27 12:00", "2026-03-28 07:00"),  # Saturday 08:00 CET
        ("2026-03-28 12:00", "2026-03-29 06:00"),  # Sunday 08:00 CEST
        ("2026-03-29 12:00", "2026-03-30 06:00"),  # Monday 08:00 CEST
    ], id="spring-forward"),
    pytest.param([  # clocks go back on Sunday 25 October 2026 at 01:00 UTC
        ("2026-10-23 12:00", "2026-10-24 06:00"),  # Saturday 08:00 CEST
        ("2026-10-24 12:00", "2026-10-25 07:00"),  # Sunday 08:00 CET
        ("2026-10-25 12:00", "2026-10-26 07:00"),  # Monday 08:00 CET
    ], id="fall-back"),
])
def test_daily_digest_stays_at_eight_in_berlin_across_dst(days):
    _prefs("berlin", timezone="Europe/Berlin", digest_mode="daily", digest_time="08:00")
    for ingested, due in days:
        now, due_at = _utc(ingested), _utc(due)
        notes = [note("reminder", "berlin"), note("alert", "berlin")]
        notes += [note("reminder", "berlin")]
        ingest(notes, now=now)
        assert {w.due_at for w in windows()} == {due_at}
        assert due_at.astimezone(BERLIN).strftime("%H:%M") == "08:00"
        assert flush(due_at - timedelta(seconds=1)).windows == 0
        result = flush(due_at)
        assert (result.windows, result.digests) == (2, 1)  # the lone alert goes as itself
        assert digests()[-1].window_end == due_at
        assert digests()[-1].notification_ids == ids([notes[0], notes[2]])
        assert windows() == []


# --- Groups and digest content ---------------------------------------------------------


def test_digest_key_splits_groups_one_digest_per_project():
    rules = with_rules(Rule("task_deadline", timedelta(minutes=30), 10, digest_key="project",
                            title_template="{{ count }} deadlines in {{ first.data.project }}"))
    by_project = {
        "apollo": [note("task_deadline", data={"project": "apollo", "task": i}) for i in range(3)],
        "gemini": [note("task_deadline", data={"project": "gemini", "task": i}) for i in range(2)],
        "7": [note("task_deadline", data={"project": 7}) for _ in range(2)],
    }
    alone = note("task_deadline", data={"project": "mercury"})
    no_project = note("task_deadline", data={"other": 1})
    everything = [n for group in by_project.values() for n in group] + [alone, no_project]
    random.Random(5).shuffle(everything)
    ingest(everything, now=T0, rules=rules)
    assert len(windows()) == 5
    result = flush(T0 + 30 * MINUTE, rules)
    assert (result.windows, result.digests, result.notifications) == (5, 3, 9)
    found = {d.digest_key: d for d in digests()}
    assert set(found) == set(by_project)
    for project, members in by_project.items():
        assert sorted(found[project].notification_ids) == sorted(ids(members))
    assert found["apollo"].title == "3 deadlines in apollo"
    assert found["7"].title == "2 deadlines in 7"
    assert status(alone) == status(no_project) == "dispatched"


def test_digest_lists_every_item_and_keeps_ids_and_data():
    bodies = ["first body", "", "third body\nwith two lines"]
    notes = [
        note("task_deadline", recipient={"id": "ada", "name": "Ada"}, title=title, body=body,
             data={"task": i, "nested": {"tags": ["x", i]}})
        for i, (title, body) in enumerate(zip(
            ["Report due", "Review <b>PR</b>", "Plan Q3"], bodies, strict=True))
    ]
    ingest(notes, now=T0)
    flush(T0 + 30 * MINUTE)
    [digest] = digests()
    assert digest.title == "3 task deadlines approaching"
    assert digest.item_count == 3 and digest.notification_ids == ids(notes)
    assert [item["id"] for item in digest.items] == [n["id"] for n in notes]
    assert [item["data"] for item in digest.items] == [n["data"] for n in notes]
    assert [item["title"] for item in digest.items] == [n["title"] for n in notes]
    assert [item["body"] for item in digest.items] == bodies
    for n in notes:
        assert n["title"] in digest.body
    assert "  with two lines" in digest.body  # bodies indented under their item
    assert "Review &lt;b&gt;PR&lt;/b&gt;" in digest.html and "<b>PR" not in digest.html
    assert (digest.window_start, digest.window_end) == (T0, T0 + 30 * MINUTE)
    assert digest.recipient_id == "ada" and digest.type == "task_deadline"

    # Delivered through the in-app channel: one inbox message naming every member.
    [delivery] = deliveries_of(digest.id)
    outcome = deliver_batch("inapp", [str(delivery.id)], get_settings(), state_redis())
    assert outcome.sent == 1
    [inbox] = query("SELECT * FROM inbox_messages")
    assert (inbox.title, inbox.digest_id) == (digest.title, digest.id)
    assert inbox.data["notification_ids"] == [n["id"] for n in notes]
    assert inbox.data["item_count"] == 3


def test_a_daily_digest_holds_more_than_max_count_items_uncapped():
    """A daily-digest recipient gets one digest of all 25 system updates (the rule's
    maximum of 10 closes rule windows, not a recipient's daily digest), none left out."""
    _prefs("reader", digest_mode="daily", digest_time="08:00")
    notes = [note("system_update", "reader", title=f"Build {i} finished") for i in range(25)]
    ingest(notes[:10], now=T0)
    ingest(notes[10:], now=T0 + MINUTE)
    [window] = windows()
    assert (window.mode, window.item_count, window.max_count) == ("digest", 25, 0)
    assert window.due_at == datetime(2031, 1, 15, 8, 0, tzinfo=UTC)
    result = flush(window.due_at)
    assert (result.digests, result.notifications) == (1, 25)
    [digest] = digests()
    assert digest.title == "25 system updates"
    assert digest.item_count == 25 and len(digest.items) == 25
    assert digest.notification_ids == ids(notes)
    for i in range(25):
        assert f"- Build {i} finished\n" in digest.body + "\n"
        assert f"<strong>Build {i} finished</strong>" in digest.html


RULES_TOML = """
[default]
window = "1m"
max_count = 4

[types.alert]
max_count = 2
title = "{{ count }} alerts for {{ recipient_name }}"

[types.build]
mode = "leading"
window = "10m"

[types.audit]
aggregate = false

[types.deploy]
window = "20m"
digest_key = "service"
"""


def test_rules_from_a_toml_file_override_the_builtin_ones(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(RULES_TOML)
    rules = load_rules(path)
    ada = {"id": "ada", "name": "Ada"}
    alerts = [note("alert", ada) for _ in range(2)]
    build, audit = note("build", ada), note("audit", ada)
    misc = [note("misc", ada) for _ in range(2)]
    deploys = [note("deploy", ada, data={"service": s}) for s in ("api", "api", "web")]
    result = ingest([*alerts, build, audit, *misc, *deploys], now=T0, rules=rules)

    assert len(result.delivery_ids) == 2  # leading build and never-aggregated audit
    assert status(build) == status(audit) == "dispatched"
    opened = {(w.type, w.digest_key): w for w in windows()}
    assert set(opened) == {("alert", ""), ("misc", ""), ("deploy", "api"), ("deploy", "web"),
                           ("build", "")}
    assert opened[("alert", "")].closed  # max_count 2 instead of the built-in 3
    assert opened[("misc", "")].due_at == T0 + MINUTE  # [default] window
    assert opened[("misc", "")].max_count == 4
    assert opened[("deploy", "api")].due_at == T0 + 20 * MINUTE

    assert flush(T0, rules).digests == 1
    [digest] = digests()
    assert (digest.title, digest.notification_ids) == ("2 alerts for Ada", ids(alerts))
    assert flush(T0 + MINUTE, rules).digests == 1
    assert digests()[-1].notification_ids == ids(misc)
    assert flush(T0 + 20 * MINUTE, rules).digests == 1  # api (2); web goes alone
    assert digests()[-1].digest_key == "api"
    assert status(deploys[2]) == "dispatched"


# --- Volume: 10,000 notifications end in exactly the expected digests --------------------


def _flush_all(now: datetime) -> tuple[int, int]:
    """(windows, digests) of flushes at ``now`` until none is due."""
    windows_ = digests_ = 0
    while result := flush(now):
        if not result.windows:
            return windows_, digests_
        windows_, digests_ = windows_ + result.windows, digests_ + result.digests
    raise AssertionError("unreachable")


def test_ten_thousand_notifications_end_in_exactly_the_expected_digests():
    types = ["system_update", "approval_request", "alert", "reminder", "announcement"]
    max_count = {"system_update": 10, "approval_request": 5, "alert": 3, "reminder": 10,
                 "announcement": 20}  # written down here, not read from the code
    recipients = [f"r{i:03d}" for i in range(100)]
    rng = random.Random(20261123)
    notes = [note(rng.choice(types), rng.choice(recipients)) for _ in range(10_000)]
    for start in range(0, len(notes), 500):
        result = ingest(notes[start:start + 500], now=T0 + timedelta(seconds=start // 500))
        assert len(result.stored) == 500

    # The expectation, from the rules alone: per (recipient, type), full windows of
    # max_count items, then the rest in one window: a digest if two or more, else alone.
    per_group = Counter((n["recipient"], n["type"]) for n in notes)
    expected_sizes: dict[tuple[str, str], list[int]] = {}
    alone = 0
    for (recipient, type_), count in per_group.items():
        full, rest = divmod(count, max_count[type_])
        expected_sizes[(recipient, type_)] = [max_count[type_]] * full + [rest] * (rest > 1)
        alone += rest == 1
    full_windows = sum(count // max_count[t] for (_, t), count in per_group.items())

    # Count-triggered first: only the full windows are due right after the ingest (in
    # chunks of at most 500 windows, as beat's task loops), then the time-triggered rest.
    assert _flush_all(T0 + MINUTE) == (full_windows, full_windows)
    _flush_all(T0 + timedelta(hours=25))

    sizes: dict[tuple[str, str], list[int]] = defaultdict(list)
    for recipient, type_, size in query("SELECT recipient_id, type, item_count FROM digests"):
        sizes[(recipient, type_)].append(size)
    assert {k: sorted(v) for k, v in sizes.items()} == {
        k: sorted(v) for k, v in expected_sizes.items() if v
    }
    expected_digests = sum(len(v) for v in expected_sizes.values())
    [(digest_count, members, distinct, item_total)] = query(
        "SELECT count(DISTINCT d.id), count(*), count(DISTINCT m), sum(d.item_count)"
        " FILTER (WHERE m = d.notification_ids[1])"
        " FROM digests d CROSS JOIN unnest(d.notification_ids) AS m"
    )
    assert digest_count == expected_digests
    assert members == distinct == item_total  # no member in two digests
    lone = query("SELECT count(*) FROM deliveries WHERE notification_id IS NOT NULL")[0][0]
    assert lone == alone
    assert members + lone == 10_000
    assert dict(query("SELECT status, count(*) FROM notifications GROUP BY status")) == {
        "digested": members, **({"dispatched": alone} if alone else {}),
    }
    assert query("SELECT count(*) FROM notifications n JOIN digests d ON d.id = n.digest_id"
                 " WHERE n.id = ANY(d.notification_ids)")[0][0] == members
    assert windows() == []
    assert query("SELECT count(*) FROM deliveries WHERE digest_id IS NOT NULL")[0][0] == (
        expected_digests)
