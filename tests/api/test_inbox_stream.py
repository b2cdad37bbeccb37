"""``GET /v1/recipients/{id}/inbox/stream`` on real API processes and real Postgres:
messages written by the real in-app channel reach the open streams of every process;
a reconnect with ``Last-Event-ID`` loses nothing and repeats nothing; credentials, caps
and hostile input are refused as JSON before the stream starts; a client that leaves
frees its place at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest
from sqlalchemy.engine import make_url

from chaos.faults import free_port
from notifier.pipeline.recipient_tokens import mint
from notifier.settings import Settings
from tests.api.server import ApiServer
from tests.api.sse import WAIT, EventStream
from tests.conftest import DATABASE_URL
from tests.pipeline.test_inbox import deliver

SECRET = "s" * 32 + "-stream-tests"
TOKENS = Settings(api_token_secret=SECRET)
STREAM_ENV = {"NOTIFIER_API_TOKEN_SECRET": SECRET, "NOTIFIER_API_STREAM_HEARTBEAT": "0.5"}
PATH = "/v1/recipients/{}/inbox/stream"


def token(recipient: str) -> str:
    return mint(recipient, 600, settings=TOKENS)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 120))


@pytest.fixture(scope="module")
def stream_server(database: str) -> Iterator[ApiServer]:
    server = ApiServer.start(env=STREAM_ENV)
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def opened(
    server: ApiServer, recipient: str, *, headers: dict[str, str] | None = None,
    **params: str,
) -> AsyncIterator[EventStream]:
    """An open stream (200, SSE) of the recipient, read with a token unless other
    credentials are given; closing it disconnects."""
    if headers is None and "token" not in params:
        params["token"] = token(recipient)
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client, \
            client.stream("GET", PATH.format(recipient), params=params,
                          headers=headers or {}) as response:
        if response.status_code != 200:
            await response.aread()
            raise AssertionError(f"{response.status_code}: {response.text}")
        yield EventStream(response)


async def deliver_async(recipient: str, count: int, title: str = "Title") -> list[str]:
    return await asyncio.to_thread(deliver, recipient, count, title)


def get(server: ApiServer, recipient: str, **options: object) -> httpx.Response:
    """The answer to a stream request that is refused (read whole: it is JSON)."""
    return httpx.get(f"{server.url}{PATH.format(recipient)}", timeout=WAIT, **options)


def test_a_message_the_inapp_channel_delivers_arrives_on_the_stream(stream_server):
    """The stream starts with retry and ready (with an id), then the new message as
    ``event: message`` with its cursor as id and the inbox item as data; the time from
    the send to the event is printed."""
    async def test() -> None:
        async with opened(stream_server, "ada") as events:
            assert events.response.headers["content-type"].startswith("text/event-stream")
            assert events.response.headers["cache-control"] == "no-cache"
            assert events.response.headers["x-accel-buffering"] == "no"
            retry = await events.next()
            assert retry.kind == "retry" and 2000 <= (retry.retry or 0) < 5000
            ready = await events.next_event("ready")
            assert ready.id and ready.json() == {"cursor": ready.id}
            start = time.perf_counter()
            [sent] = await deliver_async("ada", 1, "Disk almost full")
            message = await events.next_event("message")
            elapsed = time.perf_counter() - start
            item = message.json()
            assert item["id"] == sent and message.id == item["cursor"]
            assert item["title"] == "Disk almost full 0" and item["state"] == "unread"
            print(f"\nsend to SSE event: {elapsed * 1000:.0f} ms")
    run(test)


def test_two_api_processes_both_stream_the_message(stream_server):
    """Each API process holds its own LISTEN connection: a browser on either gets it."""
    other = ApiServer.start(env=STREAM_ENV)
    try:
        async def test() -> None:
            async with opened(stream_server, "bea") as one, opened(other, "bea") as two:
                for events in (one, two):
                    await events.next_event("ready")
                start = time.perf_counter()
                [sent] = await deliver_async("bea", 1)
                got = await asyncio.gather(*(e.next_event("message") for e in (one, two)))
                elapsed = time.perf_counter() - start
                assert [frame.json()["id"] for frame in got] == [sent, sent]
                print(f"\nsend to SSE event on both processes: {elapsed * 1000:.0f} ms")
        run(test)
    finally:
        other.stop()


def test_a_reconnect_with_last_event_id_loses_nothing_and_repeats_nothing(stream_server):
    """The browser goes away; messages are delivered meanwhile; it comes back with the
    id of the last event it saw (as EventSource does) and gets exactly those, in order,
    then live ones."""
    async def test() -> None:
        async with opened(stream_server, "cal") as events:
            await events.next_event("ready")
            first = await deliver_async("cal", 2, "first")
            seen = [await events.next_event("message") for _ in first]
        assert {frame.json()["id"] for frame in seen} == set(first)
        missed = [await deliver_async("cal", 2, f"missed-{batch}") for batch in range(3)]
        last = seen[-1].id or ""
        async with opened(stream_server, "cal", headers={"Last-Event-ID": last},
                          token=token("cal")) as events:
            replayed = [await events.next_event("message") for _ in range(6)]
            ready = await events.next_event("ready")
            live = await deliver_async("cal", 1, "live")
            after = await events.next_event("message")
        ids = [frame.json()["id"] for frame in [*replayed, after]]
        # In order: batch after batch (a batch's messages share a time, ordered by id).
        assert [set(ids[n:n + 2]) for n in (0, 2, 4)] == [set(batch) for batch in missed]
        assert ids[6:] == live and len(set(ids)) == 7
        assert ready.id == replayed[-1].id
    run(test)


def test_a_first_connection_can_start_from_a_cursor_in_the_query(stream_server):
    """``?cursor=`` (a page's cursor) replays what came after it, like Last-Event-ID."""
    async def test() -> None:
        async with opened(stream_server, "dee") as events:
            await events.next_event("ready")
            sent = await deliver_async("dee", 3)
            got = [await events.next_event("message") for _ in sent]
        async with opened(stream_server, "dee", cursor=got[0].id or "") as events:
            replayed = [await events.next_event("message") for _ in sent[1:]]
        assert [frame.json()["id"] for frame in [got[0], *replayed]] == \
            [frame.json()["id"] for frame in got]
    run(test)


def test_a_quiet_stream_sends_heartbeats(stream_server):
    """Comments after NOTIFIER_API_STREAM_HEARTBEAT seconds (0.5 here) of silence."""
    async def test() -> None:
        async with opened(stream_server, "eve") as events:
            await events.next_event("ready")
            frames = [await events.next() for _ in range(2)]
        assert [(frame.kind, frame.data) for frame in frames] == [("comment", "heartbeat")] * 2
    run(test)


def test_credentials_are_checked_before_the_stream(stream_server, make_key):
    """Another recipient's token, no credentials, an API key in the query string or a
    key without the read scope are refused as JSON; a read key in the header streams."""
    refused = {
        "other recipient": get(stream_server, "fay", params={"token": token("gus")}),
        "none": get(stream_server, "fay"),
        "key in query": get(stream_server, "fay", params={"token": make_key("read")}),
        "send key": get(stream_server, "fay",
                        headers={"Authorization": f"Bearer {make_key('send')}"}),
    }
    statuses = {name: answer.status_code for name, answer in refused.items()}
    assert statuses == {"other recipient": 401, "none": 401, "key in query": 401,
                        "send key": 403}
    assert refused["other recipient"].json()["detail"] == [
        {"field": "token", "reason": "other recipient"}]
    assert all(answer.headers["content-type"] == "application/json"
               for answer in refused.values())

    async def test() -> None:
        key = {"Authorization": f"Bearer {make_key('read')}"}
        async with opened(stream_server, "fay", headers=key) as events:
            assert (await events.next_event("ready")).id
    run(test)


@pytest.mark.parametrize(("params", "headers", "field"), [
    ({"cursor": "x" * 34}, {}, "cursor"),
    ({"last_event_id": "A" * 34}, {}, "last_event_id"),
    ({}, {"Last-Event-ID": "B" * 34}, "Last-Event-ID"),
    ({"cursor": "short"}, {}, "query.cursor"),
    ({}, {"Last-Event-ID": "C" * 500}, "header.Last-Event-ID"),
])
def test_a_hostile_resume_position_is_one_422_naming_its_field(
    stream_server, params, headers, field,
):
    answer = get(stream_server, "hal", params={**params, "token": token("hal")},
                 headers=headers)
    assert answer.status_code == 422, answer.text
    [detail] = answer.json()["detail"]
    assert detail["field"] == field


def test_the_stream_caps_and_a_client_that_leaves_frees_its_place_at_once(database):
    """Past NOTIFIER_API_MAX_STREAMS_PER_RECIPIENT: 429; past NOTIFIER_API_MAX_STREAMS:
    503 with Retry-After. A client that disconnects is unsubscribed at once: its place
    is free for the next request, every time (a leak would fill the caps for good)."""
    server = ApiServer.start(env={**STREAM_ENV, "NOTIFIER_API_MAX_STREAMS": "3",
                                  "NOTIFIER_API_MAX_STREAMS_PER_RECIPIENT": "2"})
    try:
        async def test() -> None:
            async with opened(server, "ivy") as one, opened(server, "ivy") as two:
                for events in (one, two):
                    await events.next_event("ready")
                third = await asyncio.to_thread(get, server, "ivy",
                                                params={"token": token("ivy")})
                assert third.status_code == 429 and third.headers["retry-after"]
                async with opened(server, "jon") as jon:
                    await jon.next_event("ready")
                    full = await asyncio.to_thread(get, server, "kim",
                                                   params={"token": token("kim")})
                    assert full.status_code == 503, full.text
                    assert full.headers["retry-after"] == "5"
                    assert "3 live streams" in full.json()["error"]
            for round_ in range(5):  # every place came back, at once, every time
                async with opened(server, "ivy") as a, opened(server, "ivy") as b, \
                        opened(server, f"kim{round_}") as c:
                    for events in (a, b, c):
                        await events.next_event("ready")
        run(test)
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def test_a_stream_ends_after_its_lifetime_and_the_feed_down_is_503(database):
    """NOTIFIER_API_STREAM_MAX_SECONDS ends a stream (the browser reconnects and its
    credentials are checked again); a feed that cannot reach Postgres refuses with a
    JSON 503 before any stream starts."""
    server = ApiServer.start(env={**STREAM_ENV, "NOTIFIER_API_STREAM_MAX_SECONDS": "1"})
    down = ApiServer.start(env={**STREAM_ENV, "NOTIFIER_INBOX_LISTEN_URL":
                                "postgresql://postgres@127.0.0.1:1/nowhere"})
    try:
        async def test() -> None:
            async with opened(server, "lou") as events:
                await events.next_event("ready")
                with pytest.raises(EOFError):
                    while True:
                        await events.next()
        run(test)
        answer = get(down, "lou", params={"token": token("lou")})
        assert answer.status_code == 503 and answer.headers["retry-after"]
        assert answer.json()["error"] == "the database does not answer; try again"
    finally:
        server.stop()
        down.stop()


class PostgresGate:
    """A TCP proxy to the test's Postgres that can refuse, and cut, the connections whose
    startup packet holds ``marker`` (an application name): Postgres unreachable for one
    of the feed's two connections only."""

    def __init__(self) -> None:
        target = make_url(DATABASE_URL)
        self.target = (target.host or "127.0.0.1", target.port or 5432)
        self.url = target.set(drivername="postgresql", host="127.0.0.1",
                              port=free_port(27500), query={"sslmode": "disable"})
        self.listener = socket.create_server(("127.0.0.1", self.url.port or 0))
        self.blocked: bytes | None = None
        self._open: list[tuple[bytes, socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def block(self, marker: bytes) -> None:
        """Cut the connections holding ``marker`` and refuse new ones."""
        self.blocked = marker
        for first, *ends in list(self._open):
            if marker in first:
                _close(*ends)

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            first = downstream.recv(65536)
            if self.blocked is not None and self.blocked in first:
                _close(downstream)
                continue
            upstream = socket.create_connection(self.target)
            upstream.sendall(first)
            self._open.append((first, downstream, upstream))
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        for _, *ends in self._open:
            _close(*ends)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    _close(source, sink)


def _close(*ends: socket.socket) -> None:
    for end in ends:
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
        end.close()


def test_a_feed_that_loses_postgres_ends_the_stream_and_the_reconnect_loses_nothing(database):
    """Postgres becomes unreachable for the feed's reads while a stream is open: the
    stream ends cleanly (no error frame, no hang); the browser comes back with its last
    event id once Postgres answers again and gets what was delivered meanwhile, once."""
    gate = PostgresGate()
    server = ApiServer.start(env={**STREAM_ENV, "NOTIFIER_INBOX_LISTEN_URL":
                                  gate.url.render_as_string(hide_password=False)})
    try:
        async def test() -> None:
            async with opened(server, "max") as events:
                last = (await events.next_event("ready")).id or ""
                gate.block(b"notifier-inbox-feed-query")
                missed = await deliver_async("max", 2, "missed")
                with pytest.raises(EOFError):  # the read of the announced rows failed
                    while True:
                        frame = await events.next()
                        assert frame.kind == "comment", frame
            refused = await asyncio.to_thread(get, server, "max",
                                              params={"token": token("max")})
            assert refused.status_code == 503, refused.text
            gate.blocked = None
            async with opened(server, "max", headers={"Last-Event-ID": last},
                              token=token("max")) as events:
                got = [await events.next_event("message") for _ in missed]
                await events.next_event("ready")
            assert {frame.json()["id"] for frame in got} == set(missed)
        run(test)
    finally:
        server.stop()
        gate.close()
    assert "Traceback" not in server.log()


def test_stopping_the_api_ends_its_open_streams(database):
    """SIGTERM with a stream open: the process ends it after NOTIFIER_API_SHUTDOWN_TIMEOUT
    and exits by itself (the browser reconnects elsewhere), never needing SIGKILL."""
    server = ApiServer.start(env={**STREAM_ENV, "NOTIFIER_API_SHUTDOWN_TIMEOUT": "1"})
    try:
        async def test() -> None:
            async with opened(server, "ned") as events:
                await events.next_event("ready")
                os.killpg(server.process.pid, signal.SIGTERM)
                with pytest.raises((EOFError, httpx.RemoteProtocolError)):
                    while True:
                        await events.next()
        run(test)
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        server.stop()
    assert "Traceback" not in server.log()
