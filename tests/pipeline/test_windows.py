"""Aggregation windows: opened, filled, closed by time or by count (fixed,
leading, sliding, a recipient's digest slot), one per group.

Notifications go through the real ingest and flush on the run's Postgres, with a clock
the tests control (see ``tests.pipeline.helpers``).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from notifier.pipeline.ingest import IngestMessage, ingest_batch
from notifier.pipeline.rules import BUILTIN_RULES, Rule
from notifier.storage.db import session_scope
from tests.pipeline.helpers import (
    MINUTE,
    T0,
    deliveries_of,
    digests,
    flush,
    ids,
    ingest,
    note,
    prefs,
    query,
    status,
    windows,
    with_rules,
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


def test_a_redelivered_message_batched_with_a_new_one_counts_only_the_new():
    """Ingest first routes and COPYs as if nothing were stored; the redelivered message's
    rows make the COPY fail, and the batch is routed again knowing them: the new
    message's items are stored and counted, the old ones neither stored nor counted
    again (the two in the window plus one would close it: alert's maximum is 3)."""
    old = [note(), note()]
    ingest(old, now=T0, message_id="m-old")
    new = note()
    critical = note(priority="critical")
    messages = [IngestMessage("m-old", list(old)), IngestMessage("m-new", [new, critical])]
    with session_scope() as session:
        result = ingest_batch(session, messages, rules=BUILTIN_RULES, now=T0 + MINUTE)
    assert sorted(result.stored) == sorted(ids([new, critical]))
    assert len(result.delivery_ids) == 1  # the critical one's, once
    full, = windows()
    assert (full.item_count, full.closed, full.due_at) == (3, True, T0 + MINUTE)
    assert status(new) == "pending" and status(critical) == "dispatched"
    assert len(deliveries_of(critical["id"])) == 1


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
    prefs("berlin", timezone="Europe/Berlin", digest_mode="daily", digest_time="08:00")
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


def test_a_daily_digest_holds_more_than_max_count_items_uncapped():
    """A daily-digest recipient gets one digest of all 25 system updates (the rule's
    maximum of 10 closes rule windows, not a recipient's daily digest), none left out."""
    prefs("reader", digest_mode="daily", digest_time="08:00")
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


def test_one_batch_opening_every_kind_of_window_gives_each_group_its_own():
    """One message opens windows of every kind at once (the upsert sends each kind of new
    window once, each group names its kind), for ids and digest keys holding the
    characters an array literal quotes: each group gets its own window, as it would alone."""
    rules = with_rules(LEADING, SLIDING, Rule("task_deadline", timedelta(minutes=30), 10,
                                              digest_key="project"))
    prefs("daily-reader", digest_mode="daily", digest_time="08:00")
    odd, key = 'we"ird\\,{id} NULL', 'p"\\{x},'
    batch = ([note("alert", "user-1")] + [note("alert", odd) for _ in range(2)]
             + [note("build", "user-1") for _ in range(2)] + [note("chat", "user-1")]
             + [note("system_update", "daily-reader")]
             + [note("task_deadline", "user-1", data={"project": key}) for _ in range(2)]
             + [note("alert", "user-2") for _ in range(4)])
    random.Random(7).shuffle(batch)
    ingest(batch, now=T0, rules=rules)
    found = {(w.recipient_id, w.type, w.digest_key, w.closed): (w.mode, w.item_count, w.due_at)
             for w in windows()}
    assert found == {
        ("user-1", "alert", "", False): ("fixed", 1, T0 + 5 * MINUTE),
        (odd, "alert", "", False): ("fixed", 2, T0 + 5 * MINUTE),
        ("user-1", "build", "", False): ("leading", 1, T0 + 10 * MINUTE),
        ("user-1", "chat", "", False): ("sliding", 1, T0 + 10 * MINUTE),
        ("daily-reader", "system_update", "", False): (
            "digest", 1, datetime(2031, 1, 15, 8, 0, tzinfo=UTC)),
        ("user-1", "task_deadline", key, False): ("fixed", 2, T0 + 30 * MINUTE),
        ("user-2", "alert", "", True): ("fixed", 3, T0),  # full: due at once
        ("user-2", "alert", "", False): ("fixed", 1, T0 + 5 * MINUTE),
    }
    assert query("SELECT count(*) FROM notifications WHERE status = 'pending'"
                 " AND window_id IS NOT NULL")[0][0] == len(batch) - 1  # one build leads
