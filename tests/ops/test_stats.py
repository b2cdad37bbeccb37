"""`notifier stats`: figures over a window, computed on rows with known timestamps."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from notifier.ops.stats import TABLES, collect_stats
from notifier.storage.db import session_scope
from tests.ops.test_cli import run

UNTIL = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
SINCE = UNTIL - HOUR


def at(seconds_before_until: float) -> datetime:
    return UNTIL - timedelta(seconds=seconds_before_until)


def execute(sql: str, **params: object) -> None:
    with session_scope() as session:
        session.execute(text(sql), params)


def notification(
    created_at: datetime, priority: str = "normal", status: str = "delivered",
    enqueued_before: float | None = None,
) -> uuid.UUID:
    """A notification stored at ``created_at``, enqueued ``enqueued_before`` s earlier."""
    note_id = uuid.uuid4()
    enqueued = created_at - timedelta(seconds=enqueued_before) if enqueued_before else None
    execute("INSERT INTO recipients (id) VALUES ('u') ON CONFLICT DO NOTHING")
    execute(
        "INSERT INTO notifications (id, recipient_id, type, priority, title, status,"
        " created_at, enqueued_at) VALUES (:id, 'u', 'report', :priority, 't', :status,"
        " :created_at, :enqueued_at)",
        id=note_id, priority=priority, status=status, created_at=created_at,
        enqueued_at=enqueued,
    )
    return note_id


def delivery(
    channel: str, status: str, *, updated_at: datetime, latency: float | None = None,
    priority: str = "normal", attempts: int = 1, digest_members: int = 0,
    provider: str | None = None,
) -> None:
    """A delivery last updated at ``updated_at``; if sent, created ``latency`` s before.

    Its notification (or digest) was stored a day earlier, outside every window here.
    """
    digest_id = note_id = None
    if digest_members:
        digest_id = uuid.uuid4()
        members = [notification(at(86400)) for _ in range(digest_members)]
        execute(
            "INSERT INTO digests (id, recipient_id, type, channel, title, body, item_count,"
            " notification_ids, window_start, window_end) VALUES (:id, 'u', 'report', :channel,"
            " 't', 'b', :count, :ids, now(), now())",
            id=digest_id, channel=channel, count=digest_members, ids=members,
        )
    else:
        note_id = notification(at(86400))
    sent_at = updated_at if status == "sent" else None
    created_at = updated_at - timedelta(seconds=latency or 0)
    execute(
        "INSERT INTO deliveries (id, notification_id, digest_id, recipient_id, channel,"
        " priority, status, attempts, created_at, updated_at, sent_at, provider) VALUES (:id,"
        " :note, :digest, 'u', :channel, :priority, :status, :attempts, :created_at,"
        " :updated_at, :sent_at, :provider)",
        id=uuid.uuid4(), note=note_id, digest=digest_id, channel=channel, priority=priority,
        status=status, attempts=attempts, created_at=created_at, updated_at=updated_at,
        sent_at=sent_at, provider=provider,
    )


def dead_letter(stage: str, created_at: datetime) -> None:
    execute(
        "INSERT INTO dead_letters (dedup_key, stage, reason, payload, created_at)"
        " VALUES (:key, :stage, 'bad', '{}', :created_at)",
        key=str(uuid.uuid4()), stage=stage, created_at=created_at,
    )


def stats_of(until: datetime = UNTIL, window: timedelta = HOUR):
    with session_scope() as session:
        return collect_stats(session, window, until)


def test_ingest_figures_count_the_window_by_priority_with_latency():
    """Stored in [since, until): counted by priority; ingest latency percentiles over the
    ones the producer stamped; rejections at ingest from the dead letters."""
    for n, priority in enumerate(["critical"] * 4 + ["normal"] * 3 + ["low"]):
        notification(at(100 + n * 60), priority, enqueued_before=0.1 * (n + 1))
    notification(at(3600), "high", status="suppressed")  # exactly at since: counted
    notification(at(0), "high")  # at until: not counted
    notification(at(3601), "high")  # before since: not counted
    dead_letter("ingest", at(10))
    dead_letter("ingest", at(20))
    dead_letter("ingest", at(4000))
    dead_letter("deliver", at(30))

    ingest = stats_of().ingest
    assert ingest.total == 9
    assert ingest.by_priority == {"critical": 4, "high": 1, "normal": 3, "low": 1}
    assert list(ingest.by_priority) == ["critical", "high", "normal", "low"]
    assert ingest.per_second == pytest.approx(9 / 3600)
    assert (ingest.suppressed, ingest.rejected) == (1, 2)
    # Latencies 0.1 ... 0.8 s, interpolated: p50 between the 4th and 5th.
    assert ingest.latency.count == 8
    assert ingest.latency.p50 == pytest.approx(0.45)
    assert ingest.latency.p95 == pytest.approx(0.765)
    assert ingest.latency.p99 == pytest.approx(0.793)


def test_delivery_figures_by_channel_and_priority():
    """Sent in the window by sent_at, dead by the time they died, retrying: unsent with a
    failed attempt; latency created → sent; digests count once for their members."""
    # email: sent after 1, 2 and 3 s (the last after a retry), one dead, one retrying.
    delivery("email", "sent", updated_at=at(600), latency=1)
    delivery("email", "sent", updated_at=at(500), latency=2)
    delivery("email", "sent", updated_at=at(400), latency=3, attempts=2)
    delivery("email", "dead", updated_at=at(300), attempts=8)
    delivery("email", "queued", updated_at=at(200), attempts=1)  # a short retry waiting
    delivery("email", "queued", updated_at=at(200), attempts=0)  # never tried: not counted
    delivery("email", "scheduled", updated_at=at(200), attempts=0)  # held: not counted
    delivery("email", "sent", updated_at=at(4000), latency=9)  # before the window
    # inapp: a digest of 4 (high) and a single notification (critical).
    delivery("inapp", "sent", updated_at=at(100), latency=0.5, priority="high",
             digest_members=4)
    delivery("inapp", "sent", updated_at=at(50), latency=0.25, priority="critical")
    delivery("webhook", "dead", updated_at=at(7200))  # before the window

    stats = stats_of()
    email, inapp = stats.by_channel["email"], stats.by_channel["inapp"]
    assert list(stats.by_channel) == ["email", "inapp"]
    assert (email.sent, email.sent_after_retry, email.retrying, email.dead) == (3, 1, 1, 1)
    assert (email.delivered_rate, email.error_rate) == (pytest.approx(0.6), pytest.approx(0.4))
    assert email.per_second == pytest.approx(3 / 3600)
    assert (email.latency.p50, email.latency.p95, email.latency.p99) == (
        pytest.approx(2.0), pytest.approx(2.9), pytest.approx(2.98))
    assert (inapp.sent, inapp.dead, inapp.digests, inapp.notifications) == (2, 0, 1, 5)
    assert inapp.latency.p50 == pytest.approx(0.375)

    total = stats.deliveries
    assert (total.sent, total.sent_after_retry, total.retrying, total.dead) == (5, 1, 1, 1)
    assert total.error_rate == pytest.approx(2 / 7)
    # Latencies 0.25, 0.5, 1, 2, 3 s.
    assert (total.latency.count, total.latency.p50, total.latency.p95, total.latency.p99) == (
        5, pytest.approx(1.0), pytest.approx(2.8), pytest.approx(2.96))

    assert list(stats.by_priority) == ["critical", "high", "normal"]
    assert stats.by_priority["critical"].latency.p99 == pytest.approx(0.25)
    assert (stats.by_priority["normal"].sent, stats.by_priority["normal"].dead) == (3, 1)

    batching = stats.batching
    assert (batching.messages, batching.notifications) == (5, 8)
    assert (batching.digests, batching.digest_members) == (1, 4)
    assert batching.per_message == pytest.approx(1.6)
    assert batching.digest_size == 4


def test_sent_deliveries_by_the_provider_that_sent_them():
    delivery("email", "sent", updated_at=at(600), latency=1, provider="0:smtp.primary.example")
    delivery("email", "sent", updated_at=at(500), latency=3, provider="1:backup.example:587")
    delivery("email", "sent", updated_at=at(400), latency=5, provider="1:backup.example:587")
    delivery("email", "retrying", updated_at=at(300), attempts=1)  # names no provider
    delivery("inapp", "sent", updated_at=at(200), latency=0.1, provider="0:inapp")

    stats = stats_of()

    assert list(stats.by_provider) == [
        "email 0:smtp.primary.example", "email 1:backup.example:587", "inapp 0:inapp"]
    backup = stats.by_provider["email 1:backup.example:587"]
    assert (backup.sent, backup.retrying, backup.latency.p50) == (2, 0, pytest.approx(4.0))
    assert stats.by_channel["email"].sent == 3 and stats.by_channel["email"].retrying == 1
    assert stats.as_dict()["by_provider"]["inapp 0:inapp"]["sent"] == 1


def test_an_empty_window():
    delivery("email", "sent", updated_at=at(4000), latency=1)
    stats = stats_of()
    assert stats.ingest.total == 0 and stats.ingest.latency.p50 is None
    assert stats.deliveries.sent == 0 and stats.deliveries.error_rate is None
    assert stats.by_channel == {} and stats.by_priority == {}
    assert stats.batching.per_message is None
    assert stats.as_dict()["deliveries"]["latency"] == {
        "count": 0, "p50": None, "p95": None, "p99": None}


def test_cli_table_and_json():
    """`notifier stats --since 15m`: a table; --json: the same figures for machines."""
    now = datetime.now(UTC)
    for n, priority in enumerate(["critical", "normal", "normal"]):
        notification(now - timedelta(minutes=5 + n), priority, enqueued_before=0.01)
    notification(now - timedelta(minutes=20), "low")  # outside 15 minutes
    delivery("inapp", "sent", updated_at=now - timedelta(minutes=3), latency=0.2,
             digest_members=3)
    delivery("email", "sent", updated_at=now - timedelta(minutes=2), latency=1.5)
    delivery("email", "dead", updated_at=now - timedelta(minutes=1))

    result = run("stats", "--since", "15m")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("last 15m: ") and lines[0].endswith(" UTC")
    assert "ingested       3 (0.00/s)   critical 1, normal 2" in lines
    assert "               suppressed 0, rejected at ingest 0" in lines
    header = next(line for line in lines if line.startswith("deliveries"))
    assert header.split() == ["deliveries", "sent", "retried", "retrying", "dead", "sent/s",
                              "delivered", "errors", "p50", "p95", "p99"]
    email = next(line for line in lines if line.startswith("email"))
    assert email.split()[:9] == ["email", "1", "0", "0", "1", "0.00", "50.0", "%", "50.0"]
    assert email.split()[10:12] == ["1.50", "s"]
    assert ("batching       4 notifications in 2 messages: 2.00 per message;"
            " 1 digest of 3.0 on average") in lines

    figures = json.loads(run("stats", "--since", "15m", "--json").stdout)
    assert figures["seconds"] == 900
    assert figures["ingest"]["by_priority"] == {"critical": 1, "normal": 2}
    assert figures["by_channel"]["email"]["error_rate"] == 0.5
    assert figures["batching"]["per_message"] == 2.0


def test_cli_bad_window_is_one_line():
    result = run("stats", "--since", "yesterday")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        'error: --since: expected a duration like "5m" or "1h30m", got "yesterday"')


def test_table_sizes_rows_and_bytes_of_every_table():
    """Rows as Postgres estimates them (exact right after ANALYZE), bytes with indexes."""
    for minutes in range(7):
        notification(datetime.now(UTC) - timedelta(minutes=minutes))
    execute("ANALYZE notifications")
    execute("ANALYZE dead_letters")

    tables = stats_of().tables

    assert list(tables) == list(TABLES)
    assert tables["notifications"].rows == 7
    assert tables["dead_letters"].rows == 0
    assert all(size.bytes > 0 for size in tables.values())  # every table has an index
    assert tables["notifications"].bytes >= tables["dead_letters"].bytes


def test_cli_shows_table_sizes_in_text_and_json():
    notification(datetime.now(UTC))
    execute("ANALYZE notifications")

    result = run("stats", "--since", "15m")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("tables")))
    assert lines[start].split() == ["tables", "rows", "(est.)", "size"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[start + 1:]
            if not line.startswith("(?:")}
    assert list(rows) == list(TABLES)
    assert rows["notifications"][0] == "1"
    assert rows["notifications"][2] in ("kB", "MB")

    figures = json.loads(run("stats", "--since", "15m", "--json").stdout)
    assert list(figures["tables"]) == list(TABLES)
    assert figures["tables"]["notifications"]["rows"] == 1
    assert figures["tables"]["notifications"]["bytes"] > 0
