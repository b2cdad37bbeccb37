"""``GET /v1/recipients/{id}/inbox/stream``: a recipient's new inbox messages, live, as
Server-Sent Events for a browser's ``EventSource``.

The domain is :class:`notifier.pipeline.inbox_feed.InboxFeed`: one ``LISTEN``
connection per API process, started by the first stream and closed with the app, fanned
out to every stream of the process. This module only frames its events:

- ``event: message``, ``id:`` the message's cursor, ``data:`` the item's JSON;
- ``event: ready`` once caught up, ``id:`` the stream's position: a browser that got no
  message yet still has an id to come back with;
- ``: heartbeat`` comments after ``NOTIFIER_API_STREAM_HEARTBEAT`` seconds of silence,
  so proxies keep the connection open; ``retry:`` once, with jitter, so the browsers of a
  restarted process do not all come back in the same millisecond.

A browser resumes with ``Last-Event-ID`` (``EventSource`` sends it on reconnect) or a
first ``cursor``; the feed then replays what it missed, once each, in order. Everything
that can refuse a stream (credentials, a bad cursor, the caps, Postgres unreachable) is
answered as a JSON error *before* the first byte of the stream, because an
``EventSource`` cannot read a body after it. Afterwards a failure only ends the stream:
the browser reconnects with its last id and loses nothing. A client that goes away is
unsubscribed at once (Starlette cancels the response on ``http.disconnect``).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from notifier.api.errors import ApiError, responses
from notifier.api.recipient_access import InboxAccessDep
from notifier.pipeline.inbox import CURSOR_LENGTH
from notifier.pipeline.inbox_feed import FeedFull, FeedUnavailable, InboxEvent, InboxFeed
from notifier.settings import Settings, get_settings

router = APIRouter(prefix="/v1/recipients", tags=["inbox"])

#: What a browser waits before reconnecting, in milliseconds: this plus up to ``_JITTER``.
RETRY_MS = 2000
_JITTER = 3000
#: The SSE answer's headers: never cached, never buffered by nginx or its kin.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MEDIA_TYPE = "text/event-stream"

_DESCRIPTION = """Server-Sent Events: `event: message` (`id:` the message's cursor,
`data:` the inbox item's JSON) for each new message, `event: ready` once caught up,
`: heartbeat` comments while quiet. Resume with `Last-Event-ID` (sent by `EventSource`
on reconnect) or `cursor`. Errors are JSON and come before the stream starts
(docs/api.md)."""


class StreamGate:
    """The process's inbox feed and its open streams, counted in all and per recipient."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.open: Counter[str] = Counter()
        self._feed: InboxFeed | None = None

    async def feed(self) -> InboxFeed:
        """The feed, started by the first stream (a process without browsers holds no
        ``LISTEN`` connection)."""
        if self._feed is None:
            self._feed = InboxFeed.from_settings(
                self.settings, max_subscribers=self.settings.api_max_streams)
        await self._feed.start()
        return self._feed

    def admit(self, recipient_id: str) -> None:
        """Count one more stream, or refuse it past a cap (503 all, 429 this recipient)."""
        cap, mine = self.settings.api_max_streams, self.settings.api_max_streams_per_recipient
        if self.open.total() >= cap:
            raise _full(f"this API process already serves {cap} live streams")
        if self.open[recipient_id] >= mine:
            raise ApiError(429, f"this recipient already has {mine} live streams on this API"
                                " process", [{"limit": mine, "retry_after": 5}],
                           headers={"Retry-After": "5"})
        self.open[recipient_id] += 1

    def release(self, recipient_id: str) -> None:
        self.open[recipient_id] -= 1
        if self.open[recipient_id] <= 0:
            del self.open[recipient_id]

    async def close(self) -> None:
        """At the app's shutdown: every stream still open ends."""
        if self._feed is not None:
            await self._feed.close()
            self._feed = None


def install(app: FastAPI) -> None:
    """Give the app its gate and the stream route (the app's lifespan calls :func:`close`)."""
    app.state.inbox_streams = StreamGate(get_settings())
    app.include_router(router)


async def close(app: FastAPI) -> None:
    gate: StreamGate | None = getattr(app.state, "inbox_streams", None)
    if gate is not None:
        await gate.close()


def _full(error: str) -> ApiError:
    return ApiError(503, f"{error}; try again", [{"retry_after": 5}],
                    headers={"Retry-After": "5"})


Cursor = Annotated[str | None, Query(
    min_length=CURSOR_LENGTH, max_length=CURSOR_LENGTH,
    description="Start after this message (a cursor of the inbox's pages or an event"
                " id); default: from now on. `Last-Event-ID` wins over it.",
)]


@router.get(
    "/{recipient_id}/inbox/stream", summary="The recipient's new inbox messages, live (SSE)",
    description=_DESCRIPTION, response_class=StreamingResponse,
    responses={200: {"content": {MEDIA_TYPE: {"schema": {"type": "string"}}},
                     "description": "The event stream (it stays open)"},
               **responses(401, 403, 422, 429, 503)},
)
async def inbox_stream(
    request: Request, access: InboxAccessDep, cursor: Cursor = None,
    last_event_id: Annotated[str | None, Query(
        min_length=CURSOR_LENGTH, max_length=CURSOR_LENGTH,
        description="The same as `cursor` (the name some SSE polyfills use)")] = None,
    last_event_id_header: Annotated[str | None, Header(
        alias="Last-Event-ID", max_length=CURSOR_LENGTH,
        description="The last event id the browser saw (EventSource sends it on reconnect)",
    )] = None,
) -> StreamingResponse:
    gate: StreamGate = request.app.state.inbox_streams
    recipient = access.recipient_id
    given = [(field, value) for field, value in (("Last-Event-ID", last_event_id_header),
             ("cursor", cursor), ("last_event_id", last_event_id)) if value]
    gate.admit(recipient)
    try:
        events, first = await _open(gate, recipient, given[0] if given else None)
    except BaseException:
        gate.release(recipient)
        raise
    frames = _frames(events, first, gate.settings)
    return EventStreamResponse(frames, lambda: _end(events, gate, recipient))


async def _open(
    gate: StreamGate, recipient: str, after: tuple[str, str] | None,
) -> tuple[AsyncGenerator[InboxEvent], InboxEvent]:
    """The recipient's events and the first of them, or the JSON error refusing them.
    ``after``: where to resume, and the field that said so."""
    field, cursor = after or ("recipient_id", None)
    feed = await gate.feed()
    events = feed.stream(recipient, cursor, idle=gate.settings.api_stream_heartbeat)
    assert isinstance(events, AsyncGenerator)
    try:
        return events, await anext(events)
    except ValueError as exc:  # a cursor the inbox never gave out
        problem = str(exc).removeprefix("cursor: ")
        raise ApiError(422, "invalid request", [{"field": field, "problem": problem}]) from None
    except FeedFull as exc:
        raise _full(str(exc)) from None
    except FeedUnavailable:
        raise _full("the database does not answer") from None


async def _frames(
    events: AsyncIterator[InboxEvent], first: InboxEvent, settings: Settings,
) -> AsyncGenerator[bytes]:
    """The SSE frames of the events, until the feed ends, fails or the stream is old."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.api_stream_max_seconds
    yield f"retry: {RETRY_MS + random.randrange(_JITTER)}\n\n".encode()
    yield frame(first)
    try:
        async for event in events:
            yield frame(event)
            if loop.time() >= deadline:
                return
    except FeedUnavailable:
        return  # the browser comes back with its Last-Event-ID


def frame(event: InboxEvent) -> bytes:
    """One event as SSE: JSON holds no raw newline, a cursor is URL-safe base64."""
    if event.kind == "ping":
        return b": heartbeat\n\n"
    data: dict[str, Any] = (event.item.as_json() if event.item is not None
                            else {"cursor": event.cursor})
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event.kind}\nid: {event.cursor}\ndata: {body}\n\n".encode()


async def _end(events: AsyncGenerator[InboxEvent], gate: StreamGate, recipient: str) -> None:
    """Unsubscribe and uncount, whether the stream ended, failed or was never sent."""
    try:
        await events.aclose()
    finally:
        gate.release(recipient)


class EventStreamResponse(StreamingResponse):
    """A streaming answer that always runs ``on_end``, even when the client left before
    the first frame was sent (Starlette then never starts the body's iterator)."""

    def __init__(
        self, frames: AsyncGenerator[bytes], on_end: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(frames, media_type=MEDIA_TYPE, headers=HEADERS)
        self._frames, self._on_end = frames, on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._frames.aclose()
            finally:
                await self._on_end()
