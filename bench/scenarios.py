"""The measured scenarios: each sends notifications and times them until committed.

Every pipeline scenario follows the same steps: warm up (so connection setup is not
timed), empty the tables, start the clock, send everything from this process, poll
``SELECT count(*)`` until every row is committed, stop the clock. The producer's own
share of the time is kept apart (``send_seconds``) because it is often the limit.
"""

from __future__ import annotations

import gc
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import redis
from psycopg.types.json import Jsonb

from bench import cpu, database, naive, profile
from bench.broker import BacklogReader
from bench.config import RESULTS_DIR, BenchConfig
from bench.series import Sampler, Samples, relative, row_counter
from bench.workers import Worker
from notifier.client import BufferedProducer, build, notify, notify_many
from notifier.ids import uuid7
from notifier.pipeline.ingest import IngestMessage
from notifier.schemas import to_message
from notifier.settings import get_settings, queue_name
from notifier.worker.tasks import store_messages

Payload = dict[str, Any]
Sender = Callable[[list[Payload]], None]
WARM_UP = 20
#: Recipients the notifications are spread over; they exist before each scenario.
RECIPIENTS = 1000


@dataclass
class Outcome:
    """What one scenario measured."""

    name: str
    label: str
    notifications: int
    seconds: float
    send_seconds: float
    committed: int
    cores: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: Items done over time: (seconds since the clock started, items), for the plots.
    series: list[tuple[float, int]] = field(default_factory=list)
    #: Latency samples in ms, by what they measure (e.g. ``critical``), for the plots.
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.committed / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.committed >= self.notifications


@dataclass
class Bench:
    """What every scenario needs: the settings and the polling connection."""

    config: BenchConfig
    conn: psycopg.Connection[Any]

    def wait_rows(
        self, expected: int, priority: str | None = None, samples: Samples | None = None,
    ) -> tuple[float, int]:
        return database.wait_for_rows(
            self.conn, expected, self.config.timeout_for(expected),
            self.config.poll_interval, priority, samples,
        )

    def sampling(self, read: Any, samples: Samples) -> Sampler:
        """A thread reading ``read()`` every ``sample_interval`` into ``samples``."""
        return Sampler(read, self.config.sample_interval, samples)

    def counting_rows(self, priority: str | None = None) -> AbstractContextManager[Any]:
        """A row counter on a connection of its own (opened before the clock starts)."""
        return row_counter(self.config.libpq_url, priority)


def make_notifications(count: int, priority: str = "normal", first: int = 0) -> list[Payload]:
    """Notifications as a caller passes them to notify(): spread over the recipients."""
    payloads = []
    for i in range(first, first + count):
        payload: Payload = {
            "recipient": f"user-{i % RECIPIENTS}", "type": "bench.event",
            "title": f"Event {i}", "body": "Something happened that you should know.",
            "data": {"n": i, "source": "bench"},
        }
        if priority != "normal":
            payload["priority"] = priority
        payloads.append(payload)
    return payloads


# -- senders: one way each of handing notifications to a pipeline -------------------------

def send_unbuffered(payloads: list[Payload]) -> None:
    for payload in payloads:
        notify(**payload)


def threaded(sender: Sender, threads: int) -> Sender:
    """The same sender run by several producer threads, each on its own slice."""

    def send(payloads: list[Payload]) -> None:
        slices = [payloads[i::threads] for i in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(sender, slices))

    return send


def send_buffered(payloads: list[Payload]) -> None:
    producer = BufferedProducer()
    for payload in payloads:
        producer.notify(**payload)
    producer.close()


def send_many(payloads: list[Payload]) -> None:
    notify_many(payloads)


def send_naive(payloads: list[Payload]) -> None:
    for payload in payloads:
        naive.app.send_task(
            naive.STORE_TASK, args=[{"id": str(uuid7()), **payload}], queue=naive.QUEUE
        )


# -- scenarios ------------------------------------------------------------------------------

@dataclass
class Timed:
    """What one send-then-wait run measured."""

    seconds: float
    send_seconds: float
    done: int
    cores: dict[str, float]
    series: list[tuple[float, int]]


def _timed(
    bench: Bench, worker: Worker | None, send: Callable[[], None],
    wait: Callable[[Samples], tuple[float, int]],
    counter: AbstractContextManager[Callable[[], int]] | None = None,
) -> Timed:
    """Time one send-then-wait run; items done over time are sampled by a thread reading
    ``counter`` while this one sends, then by ``wait``'s own polls."""
    pid = worker.pid if worker else None
    samples: Samples = []
    with counter or nullcontext() as read:
        before = cpu.snapshot(pid)
        start = time.perf_counter()
        samples.append((start, 0))
        with bench.sampling(read, samples):
            send()
        sent = time.perf_counter()
    done_at, done = wait(samples)
    seconds = done_at - start
    return Timed(seconds, sent - start, done, cpu.cores_used(before, cpu.snapshot(pid), seconds),
                 relative(samples, start))


def warm_up(bench: Bench, sender: Sender) -> None:
    """A few notifications first, so connecting (producer, worker, Postgres) is not timed."""
    database.reset(bench.conn, RECIPIENTS)
    sender(make_notifications(WARM_UP))
    bench.wait_rows(WARM_UP)


def pipeline(
    bench: Bench, worker: Worker, name: str, label: str, sender: Sender, count: int
) -> Outcome:
    """Send ``count`` notifications with ``sender`` and time them until committed."""
    warm_up(bench, sender)
    payloads = make_notifications(count)
    database.reset(bench.conn, RECIPIENTS)
    run = _timed(bench, worker, lambda: sender(payloads),
                 lambda samples: bench.wait_rows(count, samples=samples), bench.counting_rows())
    return Outcome(name, label, count, run.seconds, run.send_seconds, run.done, run.cores,
                   series=run.series)


def empty_tasks(bench: Bench, worker: Worker, count: int) -> Outcome:
    """The rate of a task that does nothing: one message per item, no database."""
    client = redis.Redis.from_url(bench.config.state_redis_url)

    def send(n: int) -> None:
        for _ in range(n):
            naive.app.send_task(naive.EMPTY_TASK, queue=naive.QUEUE)

    def wait(expected: int, samples: Samples | None = None) -> tuple[float, int]:
        deadline = time.perf_counter() + bench.config.timeout_for(expected)
        while True:
            done = int(client.get(naive.EMPTY_COUNTER) or 0)
            now = time.perf_counter()
            if samples is not None:
                samples.append((now, done))
            if done >= expected or now > deadline:
                return now, done
            time.sleep(bench.config.poll_interval)

    send(WARM_UP)
    wait(WARM_UP)
    client.delete(naive.EMPTY_COUNTER)
    sampler_client = redis.Redis.from_url(bench.config.state_redis_url)
    run = _timed(bench, worker, lambda: send(count), lambda samples: wait(count, samples),
                 nullcontext(lambda: int(sampler_client.get(naive.EMPTY_COUNTER) or 0)))
    client.close()
    sampler_client.close()
    return Outcome("empty_task", "empty Celery task (1 message each)", count, run.seconds,
                   run.send_seconds, run.done, run.cores, series=run.series)


def raw_copy(bench: Bench, count: int) -> Outcome:
    """COPY ``count`` rows into notifications in one transaction: the bulk ceiling."""
    columns = ("id, recipient_id, type, priority, title, body, data, status, enqueued_at")
    now = datetime.now(UTC)
    rows = [
        (uuid7(), p["recipient"], p["type"], "normal", p["title"], p["body"],
         Jsonb(p["data"]), "pending", now)
        for p in make_notifications(count)
    ]
    database.reset(bench.conn, RECIPIENTS)
    with psycopg.connect(bench.config.libpq_url) as conn:
        start = time.perf_counter()
        with conn.cursor() as cursor, cursor.copy(
            f"COPY notifications ({columns}) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
        conn.commit()
        seconds = time.perf_counter() - start
    committed = database.count_rows(bench.conn)
    return Outcome("raw_copy", "raw COPY, one transaction, no Celery", count, seconds,
                   seconds, committed)


def in_process_ingest(bench: Bench, count: int) -> Outcome:
    """The worker's own code (validate, upsert, COPY, commit) called directly, one process.

    What one pool process can do per second with no broker in between: the rate the
    worker's pool would reach if the consumer and the producer cost nothing.
    """
    chunk = get_settings().ingest_batch_size
    bodies = [to_message(build(**p)) for p in make_notifications(count)]
    stamp = datetime.now(UTC)
    messages = [
        IngestMessage(str(uuid.uuid4()), bodies[i:i + chunk], stamp)
        for i in range(0, count, chunk)
    ]
    store_messages(messages[:1])  # warm up: connection, caches
    database.reset(bench.conn, RECIPIENTS)
    gc.freeze()  # as a pool process does at start: the prepared messages are not its work
    start = time.perf_counter()
    for message in messages:
        store_messages([message])
    seconds = time.perf_counter() - start
    gc.unfreeze()
    committed = database.count_rows(bench.conn)
    outcome = Outcome("in_process_ingest", f"ingest code in 1 process, {chunk}/transaction",
                      count, seconds, seconds, committed)
    if bench.config.profile:
        outcome.extra["profile"] = _profiled_ingest(bench, messages, chunk)
    return outcome


def _profiled_ingest(bench: Bench, messages: list[IngestMessage], chunk: int) -> dict[str, Any]:
    """The same pass once more, untimed, with py-spy sampling this process."""
    database.reset(bench.conn, RECIPIENTS)
    what = f"ingest code in 1 process ({chunk}/transaction): store_messages"
    keep = RESULTS_DIR / "profile-in_process_ingest.txt"
    with profile.profiling(what, os.getpid(), keep) as found:
        for message in messages:
            store_messages([message])
    return found.as_dict()


def critical_under_backlog(bench: Bench, worker: Worker) -> Outcome:
    """Critical notifications sent one at a time while a notify_many backlog drains."""
    config = bench.config
    warm_up(bench, send_many)
    backlog = make_notifications(config.count)
    criticals = make_notifications(config.criticals, "critical", first=config.count)
    database.reset(bench.conn, RECIPIENTS)
    broker = BacklogReader(config.broker_url)
    samples: Samples = []
    with bench.counting_rows("normal") as read:
        before = cpu.snapshot(worker.pid)
        start = time.perf_counter()
        samples.append((start, 0))
        with bench.sampling(read, samples):
            send_many(backlog)
            backlog_sent = time.perf_counter()
            at_first = backlog_state(bench, broker)
            for payload in criticals:
                notify(**payload)
                time.sleep(config.critical_spacing)
            criticals_sent = time.perf_counter()
            at_last = backlog_state(bench, broker)
    drained_at, drained = bench.wait_rows(config.count, "normal", samples)
    _, critical_rows = bench.wait_rows(config.criticals, "critical")
    seconds = drained_at - start
    cores = cpu.cores_used(before, cpu.snapshot(worker.pid), seconds)
    broker.close()
    return Outcome(
        "critical_under_backlog", "critical one by one + notify_many backlog",
        config.count, seconds, backlog_sent - start, drained, cores,
        extra={
            "criticals": config.criticals, "critical_rows": critical_rows,
            "critical_spacing_ms": config.critical_spacing * 1000,
            "critical_latency_ms": database.latency_ms(bench.conn, "critical"),
            "backlog_latency_ms": database.latency_ms(bench.conn, "normal"),
            "criticals_committed_after_backlog": database.committed_after(
                bench.conn, "critical", "normal"),
            "at_first_critical": at_first,
            "at_last_critical": at_last,
            "criticals_send_seconds": round(criticals_sent - backlog_sent, 3),
        },
        series=relative(samples, start),
        samples={"critical": database.latencies_ms(bench.conn, "critical"),
                 "backlog": database.latencies_ms(bench.conn, "normal")},
    )


def backlog_state(bench: Bench, broker: BacklogReader) -> dict[str, int | None]:
    """Where the backlog is: rows still to commit, messages still in the broker, and
    messages the worker has taken but not acknowledged (prefetched, batched or being
    written; None on RabbitMQ, which does not say over AMQP).

    The broker's queue order can only put critical messages first among those still in
    the broker; on RabbitMQ the critical queue has a prefetch window of its own.
    """
    return {
        "rows_pending": bench.config.count - database.count_rows(bench.conn, "normal"),
        "messages_in_broker": broker.waiting(queue_name("normal")),
        "messages_in_worker": broker.held(),
    }
