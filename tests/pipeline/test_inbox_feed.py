"""The live inbox feed (``notifier.pipeline.inbox_feed``) on real Postgres: messages
written by the real in-app channel, announced with NOTIFY, fanned out by feeds that each
hold their own LISTEN connection, as separate API processes would."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest

from notifier.pipeline.inbox_feed import InboxEvent, InboxFeed
from notifier.storage.db import libpq_url
from tests.conftest import DATABASE_URL
from tests.pipeline.test_inbox import deliver

CONNINFO = libpq_url(DATABASE_URL)
#: Generous bounds for correctness only (the figures are printed, never asserted).
WAIT = 15.0


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 120))


async def deliver_async(recipient: str, count: int, title: str = "Title") -> list[str]:
    return await asyncio.to_thread(deliver, recipient, count, title)


async def started(*feeds: InboxFeed) -> None:
    await asyncio.wait_for(asyncio.gather(*(f.listening.wait() for f in feeds)), WAIT)


async def next_kind(events: AsyncIterator[InboxEvent], kind: str) -> InboxEvent:
    """The next event of this kind (pings skipped)."""
    while True:
        event = await asyncio.wait_for(anext(events), WAIT)
        if event.kind == kind:
            return event
        assert event.kind == "ping", event


async def messages(events: AsyncIterator[InboxEvent], count: int) -> list[InboxEvent]:
    return [await next_kind(events, "message") for _ in range(count)]


def test_two_feeds_both_get_a_message_the_inapp_channel_wrote():
    """Two feeds (two processes' LISTEN connections) each push the message the in-app
    channel committed to their subscriber; the time it took is printed."""
    async def test() -> None:
        async with InboxFeed.from_settings() as one, InboxFeed(CONNINFO) as two:
            await started(one, two)
            streams = [one.stream("ada"), two.stream("ada")]
            for events in streams:
                await next_kind(events, "ready")
            start = time.perf_counter()
            [sent] = await deliver_async("ada", 1)
            got = await asyncio.gather(*(next_kind(events, "message") for events in streams))
            elapsed = time.perf_counter() - start
            assert [str(event.item.id) for event in got if event.item] == [sent, sent]
            assert got[0].cursor == got[1].cursor == got[0].item.cursor
            print(f"\ndelivered to two feeds in {elapsed * 1000:.1f} ms (send included)")
            for events in streams:
                await events.aclose()
            assert one.subscribers == two.subscribers == 0
    run(test)


def test_a_stream_resumed_from_its_last_event_id_replays_what_it_missed_once_in_order():
    """A client that disconnects and comes back with its last event id gets the messages
    written meanwhile, in order, then live ones: none lost, none twice."""
    async def test() -> None:
        async with InboxFeed(CONNINFO) as feed:
            await started(feed)
            events = feed.stream("bea")
            await next_kind(events, "ready")
            first = await deliver_async("bea", 2, "first")
            got = await messages(events, 2)
            assert {str(e.item.id) for e in got if e.item} == set(first)
            last_event_id = got[-1].cursor
            await events.aclose()  # the browser goes away

            missed = []
            for batch in range(3):
                missed += await deliver_async("bea", 2, f"missed-{batch}")
            resumed = feed.stream("bea", after=last_event_id)
            replayed = await messages(resumed, 6)
            assert await next_kind(resumed, "ready")
            live = await deliver_async("bea", 1, "live")
            after = await messages(resumed, 1)
            ids = [str(e.item.id) for e in replayed + after if e.item]
            assert sorted(ids[:6]) == sorted(missed) and ids[6:] == live
            assert len(set(ids)) == 7
            titles = [e.item.title.split()[0] for e in replayed if e.item]
            assert titles == ["missed-0"] * 2 + ["missed-1"] * 2 + ["missed-2"] * 2
            await resumed.aclose()
    run(test)


def _terminate(application_name: str) -> int:
    with psycopg.connect(CONNINFO, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (application_name,),
        ).fetchone()[0]


def test_after_its_listen_connection_drops_a_feed_reconnects_and_streams_resync():
    """Postgres drops the feed's LISTEN connection; messages committed before it is back
    reach the open stream after the reconnect (a resync from its position), once each."""
    async def test() -> None:
        async with InboxFeed(CONNINFO, reconnect_delay=0.5, check_interval=1,
                             name="drop-test") as feed:
            await started(feed)
            events = feed.stream("cal")
            await next_kind(events, "ready")
            before = await deliver_async("cal", 1, "before")
            assert [str(e.item.id) for e in await messages(events, 1) if e.item] == before
            assert _terminate("notifier-inbox-feed-listen-drop-test") == 1
            _terminate("notifier-inbox-feed-query-drop-test")
            during = await deliver_async("cal", 2, "during")
            await deliver_async("cal", 1, "after")
            got = await messages(events, 3)
            assert {str(e.item.id) for e in got[:2] if e.item} == set(during)
            assert got[2].item and got[2].item.title == "after 0"
            assert feed.drops == 1 and feed.listening.is_set()
            await deliver_async("cal", 1, "later")
            [later] = await messages(events, 1)
            assert later.item and later.item.title == "later 0"
            await events.aclose()
    run(test)


def test_a_subscriber_that_never_reads_stops_no_one_and_later_catches_up():
    """A stream nobody reads holds at most its queue (then a resync marker); another
    stream of the same recipient gets every message meanwhile; the slow one, read at
    last, gives every message once, in order, from Postgres."""
    async def test() -> None:
        async with InboxFeed(CONNINFO, queue_size=3) as feed:
            await started(feed)
            slow, fast = feed.stream("dot"), feed.stream("dot")
            await next_kind(slow, "ready")
            await next_kind(fast, "ready")
            sent = []
            for batch in range(12):
                sent += await deliver_async("dot", 1, f"m{batch:02}")
                [event] = await messages(fast, 1)
                assert event.item and str(event.item.id) == sent[-1]
            [slow_subscription] = [s for s in feed._subscribers["dot"] if len(s) <= 3
                                   and s.overflows]
            assert slow_subscription.overflows >= 1 and len(slow_subscription) <= 3
            caught_up = await messages(slow, 12)
            assert [str(e.item.id) for e in caught_up if e.item] == sent
            await slow.aclose()
            await fast.aclose()
    run(test)


def test_a_thousand_subscribers_of_one_feed_all_get_a_new_message():
    """1,000 streams of one process, on one recipient and on 1,000 recipients, each get
    the new message; the fan-out time is printed."""
    async def test() -> None:
        async with InboxFeed(CONNINFO, max_subscribers=2000) as feed:
            await started(feed)
            for recipients in (["eli"] * 1000, [f"eli-{i}" for i in range(1000)]):
                streams = [feed.stream(r) for r in recipients]
                await asyncio.gather(*(next_kind(s, "ready") for s in streams))
                start = time.perf_counter()
                sent = await asyncio.to_thread(_deliver_to_each, sorted(set(recipients)))
                got = await asyncio.gather(*(next_kind(s, "message") for s in streams))
                elapsed = time.perf_counter() - start
                assert {str(e.item.id) for e in got if e.item} == set(sent)
                assert all(e.item and e.item.recipient_id == r for e, r in zip(got, recipients,
                                                                                strict=True))
                print(f"\n1,000 streams on {len(set(recipients))} recipient(s): all had the"
                      f" message {elapsed * 1000:.0f} ms after the send began")
                await asyncio.gather(*(s.aclose() for s in streams))
            assert feed.subscribers == 0
    run(test)


def _deliver_to_each(recipients: list[str]) -> list[str]:
    """One message to each recipient, in one in-app batch."""
    from notifier.channels.base import OutgoingMessage
    from notifier.channels.inapp import InAppChannel

    batch = [OutgoingMessage(uuid.uuid4(), r, None, "alert", "high", "hello", "")
             for r in recipients]
    assert all(result.sent for result in InAppChannel("inapp://").send_batch(batch))
    return [str(m.delivery_id) for m in batch]


@pytest.mark.parametrize("bad", ["x" * 34, "", "../../etc", "A" * 5000, "é" * 34])
def test_a_hostile_last_event_id_is_refused_before_anything_is_subscribed(bad: Any):
    """A bad cursor is a ValueError naming ``cursor``, and leaves no subscription behind."""
    async def test() -> None:
        feed = InboxFeed(CONNINFO)
        with pytest.raises(ValueError, match=r"^cursor: "):
            await anext(feed.stream("fox", after=bad))
        assert feed.subscribers == 0
    run(test)


def test_concurrent_writers_and_a_client_that_keeps_reconnecting_miss_nothing():
    """Four threads deliver to one recipient at once (batches committing in any order)
    while a client drops its stream every few messages and resumes from its last event
    id: it gets every message once, in stream order."""
    async def test() -> None:
        async with InboxFeed(CONNINFO) as feed:
            await started(feed)
            sent: list[str] = []

            def writer(n: int) -> None:
                for batch in range(15):
                    sent.extend(deliver("zed", 1 + (batch + n) % 3, f"w{n}-{batch}"))

            cursor, received = None, []
            events = feed.stream("zed", idle=0.5)
            await next_kind(events, "ready")
            writers = asyncio.gather(*(asyncio.to_thread(writer, n) for n in range(4)))
            while True:
                event = await asyncio.wait_for(anext(events), WAIT)
                if event.kind == "ping" and writers.done():
                    break  # the writers are done and half a second passed without news
                if event.kind != "message" or event.item is None:
                    continue
                received.append(event.item)
                cursor = event.cursor
                if len(received) % 7 == 0:  # the browser drops; it comes back with its id
                    await events.aclose()
                    events = feed.stream("zed", after=cursor, idle=0.5)
            await writers
            await events.aclose()
            assert len(sent) == 120
            assert sorted(str(item.id) for item in received) == sorted(sent)
            positions = [item.position for item in received]
            assert positions == sorted(positions)
    run(test)
