"""Many browsers' live inbox streams, held by one process: a lean Server-Sent Events client.

What a browser's ``EventSource`` does, for ``count`` streams at once on raw asyncio
streams (uvloop where installed): ``GET /v1/recipients/{id}/inbox/stream?token=…`` with
``Accept: text/event-stream``, then read events for as long as the stream lasts. Each
message event is checked against the stream contract (``event: message``, ``id:`` the
item's cursor, ``data:`` the inbox item's JSON, ``InboxItem.as_json``) and kept with the
wall-clock time it was read and the item's ``created_at`` (Postgres' stamp of the row,
same host, same clock: ``bench.database.clock_offset_ms``).

Run as ``python -m bench.sse_client`` with one JSON object on stdin
(:class:`StreamSpec`). It prints one line when every stream is open (``{"open": …}``:
how many answered 200 and were caught up, and why the others failed), then, after
``expected`` message events, the end of every stream, or ``timeout`` seconds, one line
with what it read (``{"events": …}``), and exits when its stdin closes. The benchmark
sends the messages between the two lines.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

from bench.http_load import MAX_HEAD, loop_factory

#: Streams opened at once while connecting (the listen backlog stays short).
CONNECT_BATCH = 100


@dataclass(frozen=True)
class StreamSpec:
    host: str
    port: int
    #: (recipient id, token) of each stream; a recipient may appear many times.
    streams: list[tuple[str, str]]
    #: Message events to read before stopping (all streams together).
    expected: int
    #: Seconds to wait for them once every stream is open.
    timeout: float
    #: Seconds a stream may take to be caught up (its ``ready`` event or first comment)
    #: once it answered; a stream that sends neither counts as open after it.
    settle: float = 1.0


@dataclass
class StreamsRead:
    #: Message events: (stream index, read at (unix s), item created_at (unix s), item id).
    events: list[tuple[int, float, float, str]] = field(default_factory=list)
    #: Events that broke the contract (wrong event name, id not the cursor, bad JSON).
    broken: list[str] = field(default_factory=list)
    comments: int = 0
    #: Other named events (``ready``), by name.
    others: dict[str, int] = field(default_factory=dict)
    #: Streams that ended (closed by the server, or failed) before the end.
    ended: list[str] = field(default_factory=list)


class SseParser:
    """Incremental ``text/event-stream`` parsing: feed bytes, get complete events."""

    def __init__(self) -> None:
        self._buffer = b""
        self._fields: dict[str, list[str]] = {}
        self.comments = 0

    def feed(self, data: bytes) -> list[dict[str, str]]:
        self._buffer += data
        events: list[dict[str, str]] = []
        while True:
            line, found, rest = self._buffer.partition(b"\n")
            if not found:
                return events
            self._buffer = rest
            text = line.rstrip(b"\r").decode()
            if not text:
                # As EventSource does: a block without data (``retry:`` alone) is no event.
                if "data" in self._fields:
                    events.append({k: "\n".join(v) for k, v in self._fields.items()})
                self._fields = {}
            elif text.startswith(":"):
                self.comments += 1
            else:
                name, _, value = text.partition(":")
                self._fields.setdefault(name, []).append(value.removeprefix(" "))


class Dechunker:
    """HTTP/1.1 chunked transfer coding, undone incrementally (or passed through)."""

    def __init__(self, chunked: bool) -> None:
        self.chunked = chunked
        self._buffer = b""
        self._left = 0  # bytes of the current chunk still to pass on
        self._crlf = False  # the CRLF after a chunk's data is still to skip
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if not self.chunked:
            return data
        self._buffer += data
        out = bytearray()
        while not self.done:
            if self._left:
                taken = self._buffer[:self._left]
                if not taken:
                    break
                out += taken
                self._buffer = self._buffer[len(taken):]
                self._left -= len(taken)
                self._crlf = self._left == 0
                continue
            if self._crlf:
                if len(self._buffer) < 2:
                    break
                self._buffer, self._crlf = self._buffer[2:], False
                continue
            size_line, found, rest = self._buffer.partition(b"\r\n")
            if not found:
                break
            self._buffer = rest
            self._left = int(size_line.split(b";")[0], 16)
            self.done = self._left == 0
        return bytes(out)


def check_message(event: dict[str, str]) -> tuple[float, str]:
    """(created_at as unix seconds, item id) of a message event; ValueError saying how
    it breaks the stream contract."""
    item = json.loads(event.get("data", ""))
    if not isinstance(item, dict):
        raise ValueError("data: not a JSON object")
    if event.get("id") != item.get("cursor"):
        raise ValueError(f"id {event.get('id')!r} is not the item's cursor")
    created = datetime.fromisoformat(str(item["created_at"])).timestamp()
    return created, str(item["id"])


class Streams:
    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.read = StreamsRead()
        self.statuses: Counter[str] = Counter()
        self.caught_up: set[int] = set()
        self.enough = asyncio.Event()
        self.errors: list[str] = []

    async def one(self, index: int, recipient: str, token: str, opened: asyncio.Event) -> None:
        spec = self.spec
        try:
            reader, writer = await asyncio.open_connection(spec.host, spec.port,
                                                           limit=MAX_HEAD * 4)
        except OSError as exc:
            self.statuses["connect error"] += 1
            self.errors.append(repr(exc)[:200])
            opened.set()
            return
        try:
            writer.write((f"GET /v1/recipients/{quote(recipient, safe='')}/inbox/stream"
                          f"?token={quote(token)} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n"
                          "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
                          ).encode())
            head = (await reader.readuntil(b"\r\n\r\n")).decode(errors="replace")
            status = head.split(" ", 2)[1] if " " in head else "?"
            self.statuses[status] += 1
            opened.set()
            if status != "200":
                self.errors.append(f"{status}: {(await reader.read(300)).decode(errors='replace')}")
                return
            await self._events(index, reader, "transfer-encoding: chunked" in head.lower())
        except (OSError, ValueError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            self.read.ended.append(f"stream {index}: {exc!r}"[:200])
        finally:
            opened.set()
            writer.close()

    async def _events(self, index: int, reader: asyncio.StreamReader, chunked: bool) -> None:
        parser, dechunk = SseParser(), Dechunker(chunked)
        while not dechunk.done:
            data = await reader.read(65536)
            if not data:
                break
            at = time.time()
            comments = parser.comments
            for event in parser.feed(dechunk.feed(data)):
                self._event(index, event, at)
            if parser.comments > comments:
                self.read.comments += parser.comments - comments
                self.caught_up.add(index)
        self.read.ended.append(f"stream {index}: ended by the server")

    def _event(self, index: int, event: dict[str, str], at: float) -> None:
        name = event.get("event", "message")
        self.caught_up.add(index)
        if name != "message":
            self.read.others[name] = self.read.others.get(name, 0) + 1
            return
        try:
            created, item_id = check_message(event)
        except (ValueError, KeyError, TypeError) as exc:
            self.read.broken.append(f"stream {index}: {exc}"[:200])
            return
        self.read.events.append((index, at, created, item_id))
        if len(self.read.events) >= self.spec.expected:
            self.enough.set()


async def run(spec: StreamSpec, out: Any = sys.stdout) -> StreamsRead:
    streams = Streams(spec)
    tasks = []
    for start in range(0, len(spec.streams), CONNECT_BATCH):
        batch = []
        for index in range(start, min(start + CONNECT_BATCH, len(spec.streams))):
            recipient, token = spec.streams[index]
            opened = asyncio.Event()
            tasks.append(asyncio.create_task(streams.one(index, recipient, token, opened)))
            batch.append(opened.wait())
        await asyncio.gather(*batch)
    answered = streams.statuses.get("200", 0)
    deadline = time.monotonic() + spec.settle
    while len(streams.caught_up) < answered and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    print(json.dumps({"open": answered, "caught_up": len(streams.caught_up),
                      "statuses": dict(streams.statuses), "errors": streams.errors[:5]}),
          file=out, flush=True)
    # Until enough events, every stream ended, or the timeout.
    enough = asyncio.create_task(streams.enough.wait())
    ended = asyncio.gather(*tasks, return_exceptions=True)
    if spec.expected > 0:
        await asyncio.wait({enough, ended}, timeout=spec.timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    for task in [*tasks, enough]:
        task.cancel()
    await asyncio.gather(*tasks, enough, return_exceptions=True)
    return streams.read


def main() -> None:
    raw = json.loads(sys.stdin.readline())
    spec = StreamSpec(**{**raw, "streams": [tuple(s) for s in raw["streams"]]})
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        read = runner.run(run(spec))
    print(json.dumps(asdict(read)), flush=True)
    sys.stdin.read()  # until closed: the benchmark reads this process's CPU meanwhile


if __name__ == "__main__":
    main()
