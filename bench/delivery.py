"""Delivery scenarios: e-mails and webhooks per second, the naive way and the pipeline's.

The servers are real TCP servers on 127.0.0.1, in processes of their own (``spawn``),
so that their CPU never shares a GIL with the measured client: by default a minimal
asyncio SMTP server (banner, EHLO, MAIL, RCPT, DATA, QUIT; ``--smtp-server aiosmtpd``
for aiosmtpd) and a minimal asyncio HTTP/1.1 keep-alive server. They count messages,
connections and content bytes, and parse nothing else, so they cost little of the
machine's two cores and the clients' rates are what is measured.

* ``email_naive``: a new SMTP connection per e-mail (connect, banner, EHLO,
  MAIL/RCPT/DATA, QUIT), sequential, in this process; the message is composed by the
  e-mail channel's own code and sent with smtplib, as the channel sends it.
* ``email_reused``: the same messages over one kept SMTP session: the e-mail channel's
  ``send_batch`` in this process, no database. As an extra figure, ``deliver_batch`` in
  this process: the worker's code without Celery (claim, send, record in Postgres).
* ``email_pooled``: the pipeline: delivery rows in Postgres, ``notifier.deliver`` tasks
  consumed by a real worker (``-c 4 --prefetch-multiplier 1``: four pool processes,
  four kept sessions); timed from the publish until every delivery row is ``sent``.
* ``webhook_naive`` / ``webhook_pooled``: the same for webhooks; naive is one
  ``httpx.post`` per request (a new client, SSL context and connection each time), with
  a second figure for a new connection per request through one client.

Every scenario warms up first (connections, imports), so only the steady state is
timed, and is timed ``delivery_runs`` times: the fastest run counts (``best_of``).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import smtplib
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import cpu, database, profile
from bench.config import RESULTS_DIR, BenchConfig
from bench.scenarios import RECIPIENTS, Bench, Outcome
from bench.series import Sampler, Samples, relative
from bench.workers import Worker, WorkerSpec, running_worker
from notifier.channels import close_channels
from notifier.channels.base import OutgoingMessage
from notifier.channels.email import EmailChannel
from notifier.channels.webhook import signed_request
from notifier.ids import uuid7
from notifier.pipeline.delivery import deliver_batch
from notifier.pipeline.ingest import IngestMessage, ingest_batch
from notifier.pipeline.outbox import DeliveryTask, queue_deliveries
from notifier.settings import Settings, delivery_queue, get_settings
from notifier.storage.db import raw_cursor, session_scope
from notifier.storage.state import state_redis
from notifier.worker.tasks import publish

#: Deliveries sent before the clock starts (connections, first queries, imports).
WARM_UP = 40
SENDER = "notifier@example.com"
SMTP_HOSTNAME = "bench-smtp.localhost"
TITLE, BODY = "Event {}", "Something happened that you should know."
#: How long to wait for a server process to listen.
SERVER_START_TIMEOUT = 30.0
#: The rate limits off: the benchmark measures sending, not a recipient's quota.
NO_RATE_LIMITS = {
    "rate_limit_per_minute": 0, "rate_limit_per_hour": 0, "rate_limit_per_day": 0,
    "rate_limit_global_per_minute": 0,
}


# --- Servers, each in processes of their own -------------------------------------------


class _Counters:
    """Shared-memory numbers the server processes update and this process reads."""

    def __init__(self, context: Any) -> None:
        self.port: Synchronized[int] = context.Value("i", 0)
        self.ready: Synchronized[int] = context.Value("i", 0)
        self.items: Synchronized[int] = context.Value("q", 0)
        self.connections: Synchronized[int] = context.Value("q", 0)
        #: Bytes of content received: the DATA of each e-mail, the body of each request.
        self.bytes: Synchronized[int] = context.Value("q", 0)

    def count(self, counter: Synchronized[int], amount: int = 1) -> None:
        with counter.get_lock():
            counter.value += amount

    def received(self, size: int) -> None:
        """One message (or request) of ``size`` bytes arrived."""
        with self.items.get_lock():
            self.items.value += 1
            self.bytes.value += size


class _SmtpProtocol(asyncio.Protocol):
    """A minimal ESMTP server: banner, EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT.

    Every command gets its reply and every message is read to its ``CRLF.CRLF``; nothing
    is parsed beyond that and every message is accepted. Cheap on purpose: the server
    costs a small share of a core, so the clients' rates are what is measured.

    ``reply_delay`` (seconds, 0 by default) holds every reply back that long, as a
    distant server's round trip would: the client waits for each reply (smtplib does not
    pipeline), so it stands for the network latency that loopback does not have.
    """

    def __init__(self, counters: _Counters, reply_delay: float = 0.0) -> None:
        self.counters = counters
        self.reply_delay = reply_delay
        self.buffer = bytearray()
        self.in_data = False
        self.scanned = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.counters.count(self.counters.connections)
        self._reply(b"220 " + SMTP_HOSTNAME.encode() + b" ESMTP bench\r\n")

    def _reply(self, reply: bytes, close: bool = False) -> None:
        if self.reply_delay > 0:
            asyncio.get_running_loop().call_later(self.reply_delay, self._write, reply, close)
        else:
            self._write(reply, close)

    def _write(self, reply: bytes, close: bool) -> None:
        if not self.transport.is_closing():
            self.transport.write(reply)
            if close:
                self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer and not self.transport.is_closing():
            if not (self._message() if self.in_data else self._command()):
                return

    def _message(self) -> bool:
        """Take one message if its end arrived; False: wait for more bytes."""
        if self.buffer.startswith(b".\r\n"):  # an empty message
            end, size = 3, 0
        else:
            found = self.buffer.find(b"\r\n.\r\n", self.scanned)
            if found < 0:
                self.scanned = max(0, len(self.buffer) - 4)
                return False
            end, size = found + 5, found + 2
        del self.buffer[:end]
        self.in_data, self.scanned = False, 0
        self.counters.received(size)
        self._reply(b"250 OK queued\r\n")
        return True

    def _command(self) -> bool:
        end = self.buffer.find(b"\r\n")
        if end < 0:
            if len(self.buffer) > 4096:
                self._write(b"500 Line too long\r\n", close=True)
            return False
        verb = bytes(self.buffer[:4]).upper()
        del self.buffer[:end + 2]
        if verb == b"EHLO":
            self._reply(_EHLO_REPLY)
        elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            self._reply(b"250 OK\r\n")
        elif verb == b"DATA":
            self.in_data = True
            self._reply(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"QUIT":
            self._reply(b"221 Bye\r\n", close=True)
        else:
            self._reply(b"502 Command not implemented\r\n")
        return True


#: What aiosmtpd offers too (SIZE makes smtplib send ``size=`` with MAIL FROM).
_EHLO_REPLY = (
    f"250-{SMTP_HOSTNAME}\r\n250-SIZE 33554432\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
    "250 HELP\r\n"
).encode()


class _CountingSmtpHandler:
    """aiosmtpd's handler: accept every message and count it."""

    def __init__(self, counters: _Counters) -> None:
        self.counters = counters

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.counters.received(len(envelope.original_content or b""))
        return "250 OK"


class _HttpProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 server: reads each request's head and ``Content-Length`` body,
    answers ``200 ok`` and keeps the connection unless told to close it."""

    def __init__(self, counters: _Counters) -> None:
        self.counters = counters
        self.buffer = bytearray()
        self.body_left = -1  # -1: reading a head
        self.body_size = 0
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.counters.count(self.counters.connections)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.transport.is_closing():
            if self.body_left < 0 and not self._head():
                return
            taken = min(self.body_left, len(self.buffer))
            del self.buffer[:taken]
            self.body_left -= taken
            if self.body_left:
                return
            self._answer()

    def _head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > 65536:
                self._fail(b"431 Request Header Fields Too Large")
            return False
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        del self.buffer[:end + 4]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            self._fail(b"411 Length Required")
            return False
        self.keep_alive = (lines[0].endswith(b"HTTP/1.1")
                           and headers.get(b"connection") != b"close")
        self.body_left = self.body_size = int(headers.get(b"content-length") or 0)
        return True

    def _answer(self) -> None:
        self.body_left = -1
        self.counters.received(self.body_size)
        if self.keep_alive:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        else:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            self.transport.close()

    def _fail(self, status: bytes) -> None:
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
        self.transport.close()


#: The servers ``ServerProcess`` can start, by kind.
SERVER_KINDS = ("smtp", "aiosmtpd", "http")


def _protocol_factory(
    kind: str, counters: _Counters, loop: Any, reply_delay: float,
) -> Callable[[], Any]:
    if kind == "smtp":
        return lambda: _SmtpProtocol(counters, reply_delay)
    if kind == "http":
        return lambda: _HttpProtocol(counters)
    from aiosmtpd.smtp import SMTP

    handler = _CountingSmtpHandler(counters)

    def session() -> SMTP:
        counters.count(counters.connections)
        # A fixed hostname: by default every session would call socket.getfqdn().
        return SMTP(handler, hostname=SMTP_HOSTNAME, loop=loop)

    return session


def _serve(kind: str, counters: _Counters, port: int, reply_delay: float) -> None:
    """One server process: an asyncio loop on a ``SO_REUSEPORT`` socket, so that several
    processes can share the port (the kernel spreads the connections over them)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections only for
    # sockets that say so. Without it a reply written in pieces (aiosmtpd writes EHLO's
    # lines one by one) waits for the client's delayed ACK: 40 ms per EHLO.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    server = loop.run_until_complete(loop.create_server(
        _protocol_factory(kind, counters, loop, reply_delay), sock=sock, backlog=512,
    ))
    if not port:
        counters.port.value = server.sockets[0].getsockname()[1]
    counters.count(counters.ready)
    loop.run_forever()


class ServerProcess:
    """A counting server in ``processes`` ``spawn``-ed processes sharing one port;
    ``with`` starts and stops them.

    ``spawn`` (not ``fork``): the child starts clean, with no copy of this process's
    connections or threads. It re-imports the main module, so a script that starts one
    must keep its top level behind ``if __name__ == "__main__":`` (``python -m bench``
    does).
    """

    def __init__(self, kind: str, processes: int = 1, reply_delay: float = 0.0) -> None:
        if kind not in SERVER_KINDS:
            raise ValueError(f"unknown server kind {kind!r}; expected one of {SERVER_KINDS}")
        if reply_delay and kind != "smtp":
            raise ValueError("only the minimal SMTP server can delay its replies")
        self.reply_delay = reply_delay
        self.context = multiprocessing.get_context("spawn")
        self.kind = kind
        self.size = max(1, processes)
        self.counters = _Counters(self.context)
        self.processes: list[multiprocessing.process.BaseProcess] = []

    def __enter__(self) -> ServerProcess:
        try:
            self._start(0)  # the first picks the port, the others join it
            for _ in range(1, self.size):
                self._start(self.port)
        except BaseException:
            self.stop()
            raise
        self._ps = [psutil.Process(p.pid) for p in self.processes]
        return self

    def _start(self, port: int) -> None:
        process = self.context.Process(
            target=_serve, args=(self.kind, self.counters, port, self.reply_delay),
            name=f"bench-{self.kind}-server-{len(self.processes)}", daemon=True,
        )
        self.processes.append(process)
        process.start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while self.counters.ready.value < len(self.processes):
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the {self.kind} server process did not start")
            time.sleep(0.02)

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()

    @property
    def port(self) -> int:
        return int(self.counters.port.value)

    @property
    def items(self) -> int:
        """Messages (SMTP) or requests (HTTP) received so far."""
        return int(self.counters.items.value)

    @property
    def bytes(self) -> int:
        return int(self.counters.bytes.value)

    @property
    def connections(self) -> int:
        return int(self.counters.connections.value)

    @property
    def description(self) -> str:
        name = {"smtp": "minimal asyncio SMTP", "aiosmtpd": "aiosmtpd",
                "http": "minimal asyncio HTTP/1.1"}[self.kind]
        delay = f", replies {self.reply_delay * 1000:g} ms late" if self.reply_delay else ""
        return f"{name}, {self.size} process{'es' if self.size > 1 else ''}{delay}"

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self._ps:
            times = process.cpu_times()
            total += times.user + times.system
        return total


def smtp_server(config: BenchConfig) -> ServerProcess:
    kind = "aiosmtpd" if config.smtp_server == "aiosmtpd" else "smtp"
    return ServerProcess(kind, config.server_processes, config.smtp_reply_delay_ms / 1000)


def http_server(config: BenchConfig) -> ServerProcess:
    return ServerProcess("http", config.server_processes)


def smtp_url(server: ServerProcess) -> str:
    return f"smtp://127.0.0.1:{server.port}?from=notifier%40example.com&starttls=no"


def hook_url(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.port}/hook"


# --- Content -------------------------------------------------------------------------


def _address(channel: str, i: int, target: str) -> dict[str, Any]:
    recipient = f"user-{i % RECIPIENTS}"
    if channel == "email":
        return {"id": recipient, "email": f"{recipient}@example.com"}
    return {"id": recipient, "addresses": {"webhook": target}}


def outgoing(channel: str, count: int, target: str = "") -> list[OutgoingMessage]:
    """What the pipeline hands a channel for ``count`` deliveries (for the naive paths)."""
    messages = []
    for i in range(count):
        address = _address(channel, i, target)
        messages.append(OutgoingMessage(
            delivery_id=uuid7(), recipient_id=address["id"],
            address=address.get("email") or target, type="bench.event", priority="critical",
            title=TITLE.format(i), body=BODY, data={"n": i, "source": "bench"},
            notification_id=uuid7(),
        ))
    return messages


def make_deliveries(count: int, channel: str, target: str = "") -> list[str]:
    """``count`` critical notifications through ingest: their delivery rows, pending."""
    batch = uuid.uuid4().hex[:8]
    chunk = get_settings().ingest_batch_size
    ids: list[str] = []
    for start in range(0, count, chunk):
        messages = [
            IngestMessage(f"bench-{batch}-{i}", {
                "recipient": _address(channel, i, target), "type": "bench.event",
                "priority": "critical", "title": TITLE.format(i), "body": BODY,
                "data": {"n": i, "source": "bench"}, "channels": [channel],
            })
            for i in range(start, min(start + chunk, count))
        ]
        with session_scope() as session:
            ids += [str(i) for i in ingest_batch(session, messages).delivery_ids]
    if len(ids) != count:
        raise RuntimeError(f"ingest made {len(ids)} deliveries, expected {count}")
    return ids


def queue(ids: list[str], size: int) -> list[DeliveryTask]:
    """Mark the rows queued (the ingest task's outbox step) and group them into tasks of
    exactly ``size`` deliveries, whatever size the pipeline would choose itself: the
    task size is a setting of the benchmark, reported with its figures."""
    settings = get_settings().model_copy(update={"delivery_batch_size": size})
    with session_scope() as session:
        cursor = raw_cursor(session)
        tasks = queue_deliveries(cursor, ids, settings)
    queued = [i for task in tasks for i in task.delivery_ids]
    if len(queued) != len(ids):
        raise RuntimeError(f"{len(queued)} of {len(ids)} deliveries queued")
    first = tasks[0]
    return [DeliveryTask(first.channel, first.queue, queued[start:start + size])
            for start in range(0, len(queued), size)]


def delivery_statuses(bench: Bench) -> dict[str, int]:
    rows = bench.conn.execute("SELECT status, count(*) FROM deliveries GROUP BY 1").fetchall()
    return {str(status): int(n) for status, n in rows}


def sent_latencies_ms(bench: Bench, published: float) -> list[float]:
    """Per delivery sent, ms from the publish of its task (``published``, this
    process's ``time.time()``; Postgres runs on the same host and clock) to ``sent_at``:
    every task is published at once, so this is mostly the wait in the queue."""
    rows = bench.conn.execute(
        "SELECT extract(epoch FROM sent_at) * 1000 - %s FROM deliveries"
        " WHERE status = 'sent' AND sent_at IS NOT NULL ORDER BY 1",
        (published * 1000,),
    ).fetchall()
    return [round(float(row[0]), 3) for row in rows]


def wait_sent(bench: Bench, expected: int) -> tuple[float, int]:
    """Poll until ``expected`` deliveries are sent (perf_counter time, rows sent); stop
    early if any failed, so a broken setup does not wait out the timeout."""
    interval = min(bench.config.poll_interval, 0.01)
    deadline = time.perf_counter() + bench.config.timeout_for(expected)
    while True:
        statuses = delivery_statuses(bench)
        now = time.perf_counter()
        sent = statuses.get("sent", 0)
        failed = sum(statuses.get(s, 0) for s in ("dead", "retrying"))
        if sent >= expected or failed or now > deadline:
            return now, sent
        time.sleep(interval)


# --- Measuring -----------------------------------------------------------------------


@dataclass
class _Clock:
    """Wall time and CPU of one timed stretch: this process, the worker, Postgres, Redis
    (``bench.cpu``) and the server processes; and what the server received meanwhile.

    ``bench.cpu`` counts every Postgres backend, other people's too; ``postgres_ours``
    counts only the backends connected to the benchmark's database, and the per-item CPU
    and the other load use that.
    """

    server: ServerProcess
    database: str
    worker_pid: int | None = None
    seconds: float = 0.0
    cores: dict[str, float] = field(default_factory=dict)
    postgres_ours: float = 0.0
    machine: float = 0.0
    items: int = 0
    connections: int = 0
    bytes: int = 0
    #: Items the server received over time: (seconds since the start, items).
    series: list[tuple[float, int]] = field(default_factory=list)
    sample_interval: float = 0.1

    @contextmanager
    def timing(self) -> Iterator[_Clock]:
        server = self.server
        before, server_before = cpu.snapshot(self.worker_pid), server.cpu_seconds()
        counts_before = server.items, server.connections, server.bytes
        machine_before = _machine_busy()
        samples: Samples = []
        self.start = time.perf_counter()
        samples.append((self.start, 0))
        with Sampler(lambda: server.items - counts_before[0], self.sample_interval, samples):
            yield self
        self.seconds = time.perf_counter() - self.start
        samples.append((self.start + self.seconds, server.items - counts_before[0]))
        self.series = relative(samples, self.start)
        self.items, self.connections, self.bytes = (
            after - prior for after, prior in
            zip((server.items, server.connections, server.bytes), counts_before, strict=True)
        )
        after = cpu.snapshot(self.worker_pid)
        self.cores = cpu.cores_used(before, after, self.seconds)
        self.cores["server"] = round((server.cpu_seconds() - server_before) / self.seconds, 2)
        self.postgres_ours = round(_backend_seconds(before, after, self.database)
                                   / self.seconds, 2)
        #: Every process on the machine: more than the parties means other work ran.
        self.machine = round((_machine_busy() - machine_before) / self.seconds, 2)

    @property
    def _ours(self) -> float:
        """Cores of the parties, with only our own Postgres backends."""
        return sum(self.cores.values()) - self.cores.get("postgres", 0.0) + self.postgres_ours

    @property
    def other_cores(self) -> float:
        """Cores the rest of the machine kept busy meanwhile: other people's work."""
        return round(max(0.0, self.machine - self._ours), 2)

    @property
    def cpu_ms_per_item(self) -> float:
        """CPU of every party (this process, worker, our Postgres backends, Redis, the
        server) per item."""
        return round(self._ours * self.seconds / max(self.items, 1) * 1000, 2)


def _backend_seconds(before: cpu.Snapshot, after: cpu.Snapshot, database: str) -> float:
    """CPU seconds the Postgres backends connected to ``database`` spent in between."""
    total = 0.0
    for pid, (party, spent) in after.items():
        if party != "postgres" or f" {database} " not in _command_line(pid):
            continue
        previous = before.get(pid)
        total += spent - (previous[1] if previous and previous[0] == party else 0.0)
    return total


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _database(bench: Bench) -> str:
    return bench.config.libpq_url.rsplit("/", 1)[-1].split("?")[0]


def _machine_busy() -> float:
    """CPU seconds the whole machine spent busy so far (idle and iowait excluded)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _outcome(
    name: str, label: str, count: int, clock: _Clock, done: int,
    send_seconds: float | None = None, **extra: Any,
) -> Outcome:
    """``done``: items that reached their end (received by the server, or rows ``sent``)."""
    extra = {"server": clock.server.description, "server_items": clock.items,
             "server_connections": clock.connections,
             "bytes_per_item": round(clock.bytes / max(clock.items, 1)),
             "machine_cores": clock.machine, "other_cores": clock.other_cores,
             "postgres_ours_cores": clock.postgres_ours,
             "cpu_ms_per_item": clock.cpu_ms_per_item, **extra}
    return Outcome(name, label, count, clock.seconds,
                   clock.seconds if send_seconds is None else send_seconds, done,
                   clock.cores, extra, series=clock.series)


def best_of(runs: int, once: Callable[[], Outcome]) -> Outcome:
    """Run a timed stretch ``runs`` times and keep the fastest, with every run's rate.

    On a shared machine other work only ever slows a run down, so the fastest run is the
    least disturbed one; every scenario is treated alike, and the spread is reported.
    """
    outcomes = [once() for _ in range(max(1, runs))]
    best = max(outcomes, key=lambda outcome: outcome.rate)
    best.extra["rates_per_run"] = [round(outcome.rate, 1) for outcome in outcomes]
    return best


def _in_process_settings(config: BenchConfig, channel: str, url: str) -> Settings:
    settings = get_settings()
    return settings.model_copy(update={
        "channels": {**settings.channels, channel: url}, **NO_RATE_LIMITS,
        "delivery_batch_size": batch_size(config),
    })


def batch_size(config: BenchConfig) -> int:
    """Deliveries per ``notifier.deliver`` task: the bench's option, else the setting."""
    return config.delivery_batch_size or get_settings().delivery_batch_size


# --- Worker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryWorkerSpec(WorkerSpec):
    """The delivery worker as ``make worker-deliver`` runs it, at the bench's concurrency:
    ``-c N --prefetch-multiplier 1``."""

    concurrency: int = 4

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("-c") + 1] = str(self.concurrency)
        return [*command, "--prefetch-multiplier", "1"]


@dataclass(frozen=True)
class _ConfigWithEnvironment(BenchConfig):
    """The bench's config, whose workers get a few more variables (channels, limits)."""

    extra_environment: tuple[tuple[str, str], ...] = ()

    def worker_environment(self) -> dict[str, str]:
        return {**super().worker_environment(), **dict(self.extra_environment)}


def _worker_config(config: BenchConfig, channel: str, url: str) -> _ConfigWithEnvironment:
    environment = {f"NOTIFIER_{key.upper()}": "0" for key in NO_RATE_LIMITS}
    environment |= {f"NOTIFIER_CHANNELS__{channel.upper()}": url,
                    "NOTIFIER_ALLOW_PRIVATE_TARGETS": "1",
                    "NOTIFIER_DELIVERY_BATCH_SIZE": str(batch_size(config))}
    values = {f.name: getattr(config, f.name) for f in fields(BenchConfig)}
    return _ConfigWithEnvironment(**values, extra_environment=tuple(environment.items()))


def _worker_spec(channel: str, config: BenchConfig) -> DeliveryWorkerSpec:
    queues = (delivery_queue(channel, "critical"), delivery_queue(channel, "normal"))
    return DeliveryWorkerSpec("bench-deliver", "notifier", queues,
                              concurrency=config.delivery_concurrency)


def pooled_label(config: BenchConfig, what: str) -> str:
    return (f"{what}: worker -c {config.delivery_concurrency}, prefetch 1,"
            f" {batch_size(config)}/task")


def _pooled(
    bench: Bench, server: ServerProcess, channel: str, channel_url: str, target: str,
    count: int, name: str, label: str,
) -> Outcome:
    config = _worker_config(bench.config, channel, channel_url)
    size = batch_size(bench.config)
    with running_worker(_worker_spec(channel, bench.config), config) as worker:
        warm_connections = _warm_up_pool(bench, worker, server, channel, target)

        def once() -> Outcome:
            database.reset(bench.conn, RECIPIENTS)
            tasks = queue(make_deliveries(count, channel, target), size)
            clock = _Clock(server, _database(bench), worker.pid,
                           sample_interval=bench.config.sample_interval)
            with clock.timing():
                published = time.time()
                publish(tasks)
                send_seconds = time.perf_counter() - clock.start
                _, sent = wait_sent(bench, count)
            outcome = _outcome(name, label, count, clock, sent, send_seconds,
                               tasks=len(tasks), batch_size=size,
                               concurrency=bench.config.delivery_concurrency,
                               warm_up_connections=warm_connections,
                               statuses=delivery_statuses(bench))
            outcome.samples["publish_to_sent"] = sent_latencies_ms(bench, published)
            return outcome

        best = best_of(bench.config.delivery_runs, once)
        if bench.config.profile:
            best.extra["profile"] = _profiled_run(worker, once, label, name)
        return best


def _profiled_run(
    worker: Worker, once: Callable[[], Outcome], label: str, name: str,
) -> dict[str, Any]:
    """One more run, not counted, with py-spy sampling the worker and its pool."""
    what = f"{label}: the worker's processes"
    keep = RESULTS_DIR / f"profile-{name}.txt"
    with profile.profiling(what, worker.pid, keep, subprocesses=True) as found:
        once()
    return found.as_dict()


def _warm_up_pool(
    bench: Bench, worker: Worker, server: ServerProcess, channel: str, target: str,
) -> int:
    """Small tasks, a few per pool process, so that each one likely connects; returns
    the connections the server saw (one per pool process when every one connected)."""
    database.reset(bench.conn, RECIPIENTS)
    before = server.connections
    tasks = queue(make_deliveries(WARM_UP, channel, target), WARM_UP)
    ids = [i for task in tasks for i in task.delivery_ids]
    parts = 2 * bench.config.delivery_concurrency
    publish([DeliveryTask(channel, tasks[0].queue, ids[n::parts]) for n in range(parts)])
    if wait_sent(bench, WARM_UP)[1] < WARM_UP:
        raise RuntimeError(f"warm-up not delivered: {delivery_statuses(bench)}; see"
                           f" {worker.log_path}")
    return server.connections - before


# --- E-mail ----------------------------------------------------------------------------


def _send_new_connection_each(server: ServerProcess, composer: EmailChannel,
                              messages: list[OutgoingMessage]) -> None:
    """What a first version would do: per e-mail a new TCP connection, the banner, EHLO,
    MAIL/RCPT/DATA and QUIT; smtplib as the channel uses it, the channel's own message."""
    for message in messages:
        mail, recipient = composer._compose(message)
        smtp = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
        smtp.ehlo()
        smtp.sendmail(SENDER, [recipient], mail)
        smtp.quit()


def email_naive(bench: Bench, count: int) -> Outcome:
    """One SMTP connection per e-mail, sequential, in this process."""
    with smtp_server(bench.config) as server:
        composer = EmailChannel(smtp_url(server))
        _send_new_connection_each(server, composer, outgoing("email", WARM_UP))

        def once() -> Outcome:
            messages = outgoing("email", count)
            clock = _Clock(server, _database(bench),
                           sample_interval=bench.config.sample_interval)
            with clock.timing():
                _send_new_connection_each(server, composer, messages)
            return _outcome("email_naive", "e-mail: new SMTP connection each, 1 process",
                            count, clock, clock.items)

        return best_of(bench.config.delivery_runs, once)


def email_reused(bench: Bench, count: int) -> Outcome:
    """One SMTP session kept for every e-mail: the e-mail channel's ``send_batch`` called
    in this process, ``batch_size`` messages a call, no database.

    Then, as an extra figure, the pipeline's code without Celery: ``deliver_batch`` in
    this process (claim in Postgres, send over the kept session, record each result).
    """
    config = bench.config
    size = batch_size(config)
    with smtp_server(config) as server:
        channel = EmailChannel(smtp_url(server))

        def once() -> Outcome:
            messages = outgoing("email", count)
            clock = _Clock(server, _database(bench),
                           sample_interval=bench.config.sample_interval)
            with clock.timing():
                for start in range(0, count, size):
                    for result in channel.send_batch(messages[start:start + size]):
                        if not result.sent:
                            raise RuntimeError(f"e-mail not sent: {result.error}")
            return _outcome("email_reused", "e-mail: one kept SMTP session, 1 process",
                            count, clock, clock.items)

        try:
            list(channel.send_batch(outgoing("email", WARM_UP)))
            outcome = best_of(config.delivery_runs, once)
        finally:
            channel.close()
        outcome.extra["in_process_pipeline"] = _deliver_batch_in_process(
            bench, server, count, size)
        return outcome


def _deliver_batch_in_process(
    bench: Bench, server: ServerProcess, count: int, size: int
) -> dict[str, Any]:
    """``deliver_batch`` in this process: the worker's work without Celery, 1 process."""
    settings = _in_process_settings(bench.config, "email", smtp_url(server))
    state = state_redis()
    label = f"e-mail: deliver_batch in 1 process, {size}/batch (no Celery)"

    def once() -> Outcome:
        database.reset(bench.conn, RECIPIENTS)
        ids = make_deliveries(count, "email")
        clock = _Clock(server, _database(bench),
                       sample_interval=bench.config.sample_interval)
        with clock.timing():
            for start in range(0, count, size):
                deliver_batch("email", ids[start:start + size], settings, state)
        return _outcome("email_in_process", label, count, clock,
                        delivery_statuses(bench).get("sent", 0))

    close_channels()
    try:
        database.reset(bench.conn, RECIPIENTS)
        deliver_batch("email", make_deliveries(WARM_UP, "email"), settings, state)
        best = best_of(bench.config.delivery_runs, once)
    finally:
        close_channels()
        state.close()
    return {"label": label, "sent": best.committed, "seconds": round(best.seconds, 3),
            "rate_per_s": round(best.rate, 1), "cores": best.cores,
            "server_connections": best.extra["server_connections"],
            "cpu_ms_per_item": best.extra["cpu_ms_per_item"],
            "rates_per_run": best.extra["rates_per_run"]}


def email_pooled(bench: Bench, count: int) -> Outcome:
    """The pipeline: delivery rows in Postgres, ``notifier.deliver`` tasks run by a real
    worker whose pool processes each keep an SMTP session; timed until all are sent."""
    with smtp_server(bench.config) as server:
        return _pooled(bench, server, "email", smtp_url(server), "", count, "email_pooled",
                       pooled_label(bench.config, "e-mail"))


# --- Webhooks ----------------------------------------------------------------------------


#: The one secret a naive sender would keep in its configuration (the channel gives
#: each receiver its own).
NAIVE_WEBHOOK_SECRET = "whsec_bench-naive-sender"


def webhook_naive(bench: Bench, count: int) -> Outcome:
    """``httpx.post`` per request: a new client (and connection) each time, sequential.

    A second loop sends the same requests through one client that keeps no connection,
    to tell the cost of a new TCP connection from that of a new client (its SSL context).
    """
    with http_server(bench.config) as server:
        url = hook_url(server)
        def send(messages: list[OutgoingMessage], post: Callable[..., httpx.Response]) -> None:
            for message in messages:
                request = signed_request(message, [NAIVE_WEBHOOK_SECRET], time.time())
                post(url, timeout=10, **request).raise_for_status()

        send(outgoing("webhook", 5, url), httpx.post)

        def once() -> Outcome:
            messages = outgoing("webhook", count, url)
            clock = _Clock(server, _database(bench),
                           sample_interval=bench.config.sample_interval)
            with clock.timing():
                send(messages, httpx.post)
            return _outcome("webhook_naive",
                            "webhook: httpx.post each (new client), 1 process",
                            count, clock, clock.items)

        outcome = best_of(bench.config.delivery_runs, once)
        limits = httpx.Limits(max_keepalive_connections=0)
        rates = []
        with httpx.Client(limits=limits) as client:
            send(outgoing("webhook", 5, url), client.post)
            for _ in range(max(1, bench.config.delivery_runs)):
                again = outgoing("webhook", count, url)
                connections = server.connections
                start = time.perf_counter()
                send(again, client.post)
                rates.append(round(count / (time.perf_counter() - start), 1))
                if server.connections - connections < count:
                    raise RuntimeError("the client kept connections: the figure would be wrong")
        outcome.extra["new_connection_one_client_rate"] = max(rates)
        outcome.extra["new_connection_one_client_rates_per_run"] = rates
        return outcome


#: The one secret a naive sender would keep in its configuration (the channel gives
#: each receiver its own).


def webhook_pooled(bench: Bench, count: int) -> Outcome:
    with http_server(bench.config) as server:
        return _pooled(
            bench, server, "webhook", "webhook://", hook_url(server), count, "webhook_pooled",
            pooled_label(bench.config, "webhook") + ", pooled client",
        )
