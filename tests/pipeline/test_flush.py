"""The flush: due windows become one digest per channel (a lone member goes as
itself), with every item, read against the recipient's preferences of the moment.

Notifications go through the real ingest and flush on the run's Postgres, with a clock
the tests control (see ``tests.pipeline.helpers``).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from datetime import datetime, timedelta

from sqlalchemy import text

from notifier.pipeline.delivery import deliver_batch
from notifier.settings import get_settings
from notifier.storage.db import session_scope
from notifier.storage.state import state_redis
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
)


def test_an_opt_out_made_while_waiting_suppresses_at_the_flush():
    """Preferences are read again when the window closes: a type opted out of meanwhile
    is suppressed then, with a reason, and makes no digest."""
    notes = [note("reminder", "changes-mind") for _ in range(2)]
    ingest(notes, now=T0)
    prefs("changes-mind", opt_out={"reminder": ["*"]})
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


def test_a_lone_member_with_a_callback_url_keeps_it_on_its_delivery():
    """A notification that waited in its window and goes as itself: its delivery is
    marked for callbacks (``deliveries.callback``), its neighbour's is not."""
    url = "https://callbacks.example.com/in"
    called = note("task_deadline", recipient="cb-1", channels=["inapp"], callback_url=url)
    plain = note("task_deadline", recipient="cb-2", channels=["inapp"])
    ingest([called, plain], now=T0)
    result = flush(T0 + 30 * MINUTE)
    assert (result.windows, result.digests) == (2, 0)
    assert [tuple(r) for r in query(
        "SELECT n.id::text, d.callback, n.callback_url FROM deliveries d"
        " JOIN notifications n ON n.id = d.notification_id ORDER BY d.callback")] == [
        (plain["id"], False, None), (called["id"], True, url)]


def test_a_digest_reports_each_member_that_names_a_callback_url():
    """A digest's delivery is marked for callbacks when one member names a URL; each
    status it reaches then makes one event per such member (none for the other), once."""
    url = "https://callbacks.example.com/in"
    first = note("task_deadline", recipient="cb-3", channels=["inapp"], callback_url=url)
    second = note("task_deadline", recipient="cb-3", channels=["inapp"], callback_url=url)
    plain = note("task_deadline", recipient="cb-3", channels=["inapp"])
    ingest([first, second, plain], now=T0)
    result = flush(T0 + 30 * MINUTE)
    assert (result.windows, result.digests) == (1, 1)
    [(delivery, callback)] = query(
        "SELECT id, callback FROM deliveries WHERE digest_id IS NOT NULL")
    assert callback is True
    with session_scope() as session:
        for reached in ("sent", "sent", "delivered"):
            session.execute(text("UPDATE deliveries SET status = :s WHERE id = :d"),
                            {"s": reached, "d": delivery})
    events = query("SELECT notification_id::text, status, url FROM callbacks"
                   " WHERE delivery_id = :d ORDER BY status, notification_id", d=delivery)
    assert sorted(tuple(e) for e in events) == sorted(
        (n["id"], reached, url) for n in (first, second) for reached in ("delivered", "sent"))
