"""A lean HTTP/1.1 load generator: keep-alive connections over raw asyncio streams.

Why not httpx or aiohttp: at a few thousand requests a second on a 2-core machine, a
full client library's per-request Python would take as much CPU as the API it measures,
and the generator, not the API, would set the rate. Here each request is one prebuilt
byte string written to the socket and each answer is read by its ``Content-Length``; on
uvloop (installed with uvicorn) one process drives thousands of requests a second on a
fraction of a core. Its own CPU is measured all the same (``bench.cpu``, party
``loadgen``), so a run where it, and not the API, was the limit says so.

Closed loop: ``connections`` keep-alive connections each send a request, wait for the
whole answer, and send the next, until every body is sent. Every request's latency
(write to last byte read) is kept.

Run as ``python -m bench.http_load``: it reads one JSON line (:class:`LoadSpec`) on
stdin, builds every request, prints ``{"ready": n}``, waits for a line (``go``) to start,
prints one JSON line (:class:`LoadResult`), and exits when its stdin closes: so neither
its start-up nor its exit is timed, and its CPU can be read while it still runs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

#: Longest answer head read (status line and headers).
MAX_HEAD = 16_384


@dataclass(frozen=True)
class LoadSpec:
    host: str
    port: int
    path: str
    #: ``Authorization`` header value (``Bearer nk_...``).
    authorization: str
    #: Each request's body (JSON text), in the order they are sent.
    bodies: list[str]
    connections: int


@dataclass
class LoadResult:
    requests: int = 0
    #: Answers by status code (as strings: JSON keys).
    statuses: dict[str, int] = field(default_factory=dict)
    #: Connections that failed (reset, closed by the server, unreadable answer).
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: Every request's latency in ms, smallest first.
    latencies_ms: list[float] = field(default_factory=list)
    #: A body of an answer that was not 202, to say why.
    sample_error: str = ""


def request_bytes(spec: LoadSpec, text: str) -> bytes:
    body = text.encode()
    head = (f"POST {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n"
            f"Authorization: {spec.authorization}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def parse_head(head: bytes) -> tuple[int, int]:
    """(status, content length) of an answer's head; ValueError if it is not HTTP/1.1
    with a length (the API never answers chunked to a POST)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP answer: {lines[0][:80]!r}")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None:
        raise ValueError("an answer without Content-Length")
    return int(parts[1]), length


async def _connection(spec: LoadSpec, requests: Iterator[bytes], result: LoadResult,
                      statuses: Counter[int], latencies: list[float]) -> None:
    try:
        reader, writer = await asyncio.open_connection(spec.host, spec.port, limit=MAX_HEAD * 4)
    except OSError as exc:
        result.errors.append(f"connect: {exc!r}")
        return
    try:
        for request in requests:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status, length = parse_head(head)
            body = await reader.readexactly(length)
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[status] += 1
            if status != 202 and not result.sample_error:
                result.sample_error = body[:500].decode(errors="replace")
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        result.errors.append(repr(exc)[:200])
    finally:
        writer.close()


async def run(spec: LoadSpec, requests: list[bytes]) -> LoadResult:
    """Send ``requests`` over ``spec.connections`` connections; what they answered."""
    result = LoadResult()
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    shared = iter(requests)  # each connection takes the next one
    started = time.perf_counter()
    await asyncio.gather(*(_connection(spec, shared, result, statuses, latencies)
                           for _ in range(spec.connections)))
    result.seconds = time.perf_counter() - started
    result.requests = len(latencies)
    result.statuses = {str(code): n for code, n in sorted(statuses.items())}
    result.latencies_ms = sorted(round(ms, 3) for ms in latencies)
    return result


def main() -> None:
    spec = LoadSpec(**json.loads(sys.stdin.readline()))
    requests = [request_bytes(spec, body) for body in spec.bodies]
    print(json.dumps({"ready": len(requests)}), flush=True)
    sys.stdin.readline()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        result = runner.run(run(spec, requests))
    print(json.dumps(asdict(result)), flush=True)
    sys.stdin.read()  # until closed: the benchmark reads this process's CPU meanwhile


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed (with uvicorn), else asyncio's own (which
    works as well, at more CPU per request)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    main()
