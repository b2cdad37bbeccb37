"""The live inbox feed of one API process: new inbox messages, pushed to its subscribers.

The in-app channel announces every message it commits with ``pg_notify``
(``notifier.channels.inapp``): every process listening gets it, so any number of API
processes behind a load balancer each hold one :class:`InboxFeed`, one ``LISTEN``
connection to Postgres, and fan out to their own subscribers (a browser's SSE stream
each). A second connection reads the announced rows (once per batch of announcements,
only for recipients this process serves) and the catch-ups.

**Bounded.** A subscriber has a queue of ``queue_size`` messages. One that does not keep
up is never waited for: when its queue is full it is emptied and told to resync, and
:meth:`InboxFeed.stream` then reads what it missed from Postgres, from its last
position, page by page. Memory stays bounded whatever a subscriber does; others never
notice.

**Nothing lost.** Postgres keeps no announcement for a connection that is not listening,
so after the ``LISTEN`` connection drops, the feed reconnects (every
``reconnect_delay`` seconds until it can) and tells every subscriber to resync. A
stream started from a cursor (a browser's ``Last-Event-ID``) subscribes first, then
reads the rows after the cursor, then takes live messages, dropping any at or before
the last position it gave: a message committed while the catch-up ran arrives twice and
is given once; one committed after it is newer than everything the catch-up read,
because ``created_at`` grows in commit order per recipient (``notifier.channels.inapp``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql

from notifier.channels.inapp import INBOX_CHANNEL, parse_announcement
from notifier.pipeline.inbox import (
    AFTER_SQL,
    BY_IDS_SQL,
    HEAD_SQL,
    MAX_PAGE_SIZE,
    START,
    InboxItem,
    Position,
    check_recipient,
    decode_cursor,
    item_from_row,
)
from notifier.settings import Settings, get_settings
from notifier.storage.db import describe_db_error, libpq_url

log = logging.getLogger(__name__)

#: Announcements read but not yet dispatched, at most; beyond it (the query connection
#: far behind) they are dropped and every subscriber resyncs from Postgres instead.
MAX_PENDING = 10_000
#: Announcements read in one query.
_DISPATCH_BATCH = 500


class FeedUnavailable(Exception):
    """Postgres cannot be reached for a catch-up: the stream ends; its client reconnects
    with its last event id and loses nothing."""


class FeedFull(Exception):
    """The feed already serves ``max_subscribers`` streams."""


class _Signal(enum.Enum):
    RESYNC = "resync"
    CLOSED = "closed"


@dataclass(frozen=True)
class InboxEvent:
    """What a stream yields: a message; ``ready`` once caught up (live from here on);
    ``ping`` after ``idle`` seconds without either. ``cursor`` is the stream's position
    (the SSE event id): where a reconnecting client resumes."""

    kind: Literal["message", "ready", "ping"]
    cursor: str
    item: InboxItem | None = None


class Subscription:
    """One subscriber's bounded queue of live messages for one recipient."""

    def __init__(self, recipient_id: str, size: int):
        self.recipient_id = recipient_id
        #: Times its queue overflowed and it was told to resync.
        self.overflows = 0
        self._queue: asyncio.Queue[InboxItem | _Signal] = asyncio.Queue(size)

    def offer(self, item: InboxItem) -> None:
        """Queue a message without ever waiting: a full queue becomes one resync."""
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflows += 1
            self.signal(_Signal.RESYNC)

    def signal(self, signal: _Signal) -> None:
        """Replace whatever waits with ``signal``: after it, only Postgres is complete."""
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(signal)

    async def get(self, timeout: float | None) -> InboxItem | _Signal | None:
        """The next message or signal; None after ``timeout`` seconds without one."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    def __len__(self) -> int:
        return self._queue.qsize()


class InboxFeed:
    """One process's ``LISTEN`` on the in-app channel's announcements, fanned out.

    ``conninfo`` is a libpq URL (``notifier.storage.db.libpq_url``) reaching Postgres
    itself: ``LISTEN`` needs a session of its own, which a pooler in transaction mode
    does not keep. Use ``async with InboxFeed(...)`` (or :meth:`start` and
    :meth:`close`) inside the process's event loop.
    """

    def __init__(
        self, conninfo: str, *, queue_size: int = 100, max_subscribers: int = 10_000,
        reconnect_delay: float = 1.0, check_interval: float = 5.0,
        channel: str = INBOX_CHANNEL, name: str | None = None,
    ):
        self._conninfo = conninfo
        #: In its connections' application_name (``pg_stat_activity``): the process id.
        self.name = name or str(os.getpid())
        self._queue_size = queue_size
        self._max_subscribers = max_subscribers
        self._reconnect_delay = reconnect_delay
        self._check_interval = check_interval
        self._channel = channel
        self._subscribers: dict[str, set[Subscription]] = {}
        self._count = 0
        self._pending: asyncio.Queue[tuple[Any, str]] = asyncio.Queue(MAX_PENDING)
        self._query_lock = asyncio.Lock()
        self._query_conn: psycopg.AsyncConnection[Any] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: Set while the LISTEN connection is up.
        self.listening = asyncio.Event()
        #: Times the LISTEN connection was lost (and every subscriber resynced).
        self.drops = 0

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **options: Any) -> InboxFeed:
        """The feed as configured: ``NOTIFIER_INBOX_LISTEN_URL`` (else the database URL),
        ``NOTIFIER_INBOX_FEED_QUEUE_SIZE``."""
        settings = settings or get_settings()
        url = settings.inbox_listen_url or settings.database_url
        return cls(libpq_url(url), queue_size=settings.inbox_feed_queue_size, **options)

    async def __aenter__(self) -> InboxFeed:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start listening (in the background: a Postgres down now is retried); once."""
        if self._tasks:
            return
        self._tasks = [asyncio.create_task(self._listen(), name="inbox-feed-listen"),
                       asyncio.create_task(self._dispatch(), name="inbox-feed-dispatch")]

    async def close(self) -> None:
        """Stop listening; every stream ends."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.listening.clear()
        if self._query_conn is not None:
            await self._query_conn.close()
            self._query_conn = None
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                subscription.signal(_Signal.CLOSED)

    @property
    def subscribers(self) -> int:
        return self._count

    def subscribe(self, recipient_id: str) -> Subscription:
        """A new subscription to the recipient's live messages (:meth:`unsubscribe` it)."""
        check_recipient(recipient_id)
        if self._count >= self._max_subscribers:
            raise FeedFull(f"the inbox feed already serves {self._max_subscribers} streams")
        subscription = Subscription(recipient_id, self._queue_size)
        self._subscribers.setdefault(recipient_id, set()).add(subscription)
        self._count += 1
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.recipient_id)
        if subscribers is None or subscription not in subscribers:
            return
        subscribers.discard(subscription)
        self._count -= 1
        if not subscribers:
            del self._subscribers[subscription.recipient_id]

    async def stream(
        self, recipient_id: str, after: str | None = None, *, idle: float | None = None,
    ) -> AsyncIterator[InboxEvent]:
        """The recipient's messages after the cursor ``after`` (a ``Last-Event-ID``),
        then live ones, in order, each once; from now on when ``after`` is None. Raises
        ValueError naming ``cursor`` for a bad one (before anything else),
        :class:`FeedUnavailable` when Postgres cannot be read, :class:`FeedFull`."""
        check_recipient(recipient_id)
        position = decode_cursor(after) if after is not None else None
        subscription = self.subscribe(recipient_id)  # listen first, then read
        try:
            if position is None:
                head = await self._query(HEAD_SQL, {"recipient": recipient_id})
                position = Position(*head[0]) if head else START
            else:
                async for item in self._catch_up(recipient_id, position):
                    position = item.position
                    yield InboxEvent("message", item.cursor, item)
            yield InboxEvent("ready", position.encode())
            while True:
                got = await subscription.get(idle)
                if got is None:
                    yield InboxEvent("ping", position.encode())
                elif got is _Signal.CLOSED:
                    return
                elif got is _Signal.RESYNC:
                    async for item in self._catch_up(recipient_id, position):
                        position = item.position
                        yield InboxEvent("message", item.cursor, item)
                elif isinstance(got, InboxItem) and got.position > position:
                    position = got.position
                    yield InboxEvent("message", got.cursor, got)
        finally:
            self.unsubscribe(subscription)

    async def _catch_up(self, recipient_id: str, position: Position) -> AsyncIterator[InboxItem]:
        """Every message after ``position``, oldest first, a page per query."""
        while True:
            rows = await self._query(AFTER_SQL, {
                "recipient": recipient_id, "after_at": position.created_at,
                "after_id": position.id, "limit": MAX_PAGE_SIZE,
            })
            for row in rows:
                item = item_from_row(row)
                position = item.position
                yield item
            if len(rows) < MAX_PAGE_SIZE:
                return

    def _resync_all(self) -> None:
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                subscription.signal(_Signal.RESYNC)

    async def _listen(self) -> None:
        """Keep one LISTEN connection up; after each (re)connect everyone resyncs."""
        while True:
            try:
                async with await self._connect("listen") as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    self.listening.set()
                    self._resync_all()  # whatever was committed while nobody listened
                    while True:
                        async for note in conn.notifies(timeout=self._check_interval):
                            self._announced(note.payload)
                        await conn.execute("SELECT 1")  # a dead connection shows here
            except Exception as exc:  # whatever broke it, the feed must come back
                if self.listening.is_set():
                    self.drops += 1
                    log.warning("inbox feed: LISTEN connection lost (%s); reconnecting",
                                describe_db_error(exc))
                self.listening.clear()
                await asyncio.sleep(self._reconnect_delay)

    def _announced(self, payload: str) -> None:
        announced = parse_announcement(payload)
        if announced is None or announced[1] not in self._subscribers:
            return
        try:
            self._pending.put_nowait(announced)
        except asyncio.QueueFull:
            log.warning("inbox feed: %d announcements waiting; every stream resyncs",
                        MAX_PENDING)
            while not self._pending.empty():
                self._pending.get_nowait()
            self._resync_all()

    async def _dispatch(self) -> None:
        """Read the announced rows (a batch per query) and hand each to its subscribers."""
        while True:
            batch = [await self._pending.get()]
            while not self._pending.empty() and len(batch) < _DISPATCH_BATCH:
                batch.append(self._pending.get_nowait())
            wanted = [message_id for message_id, recipient in batch
                      if recipient in self._subscribers]
            if not wanted:
                continue
            try:
                rows = await self._query(BY_IDS_SQL, {"ids": wanted})
            except Exception as exc:  # never let one bad read stop the fan-out for good
                if not isinstance(exc, FeedUnavailable):
                    log.exception("inbox feed: reading announced messages failed")
                self._resync_recipients({recipient for _, recipient in batch})
                continue
            for row in rows:
                item = item_from_row(row)
                for subscription in list(self._subscribers.get(item.recipient_id, ())):
                    subscription.offer(item)

    def _resync_recipients(self, recipients: set[str]) -> None:
        for recipient in recipients:
            for subscription in self._subscribers.get(recipient, ()):
                subscription.signal(_Signal.RESYNC)

    async def _query(self, statement: str, params: dict[str, Any]) -> Sequence[Any]:
        """Rows of one (read-only) statement on the feed's query connection: a connection
        found dead is replaced and the statement tried once more on the new one."""
        async with self._query_lock:
            for attempt in (1, 2):
                fresh = self._query_conn is None or self._query_conn.closed
                try:
                    if self._query_conn is None or self._query_conn.closed:
                        self._query_conn = await self._connect("query")
                    cursor = await self._query_conn.execute(statement, params)
                    return await cursor.fetchall()
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    if self._query_conn is not None:
                        await self._query_conn.close()
                        self._query_conn = None
                    if fresh or attempt == 2:
                        raise FeedUnavailable(
                            f"inbox feed: cannot read Postgres: {describe_db_error(exc)}"
                        ) from None
        raise AssertionError("unreachable")

    async def _connect(self, role: str) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, connect_timeout=5, prepare_threshold=None,
            application_name=f"notifier-inbox-feed-{role}-{self.name}"[:63],
            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
        )
