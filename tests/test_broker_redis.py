"""notifier/broker_redis.py: a message taken off a Redis queue is never only in a socket.

kombu's stock transport pops a message (``BRPOP``) and records it as unacknowledged in a
second command; a connection broken after Redis sent the reply, or a worker killed while
the reply sits in its socket, loses it. Each test below says what the stock transport
does in the same situation (checked by hand with ``broker_transport`` set to ``None``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery
from kombu import Connection, Consumer, Exchange, Producer, Queue

from chaos.faults import free_port
from notifier import client
from notifier.broker_topology import SENTINEL_TRANSPORT, celery_settings
from notifier.settings import get_settings
from tests.brokers import foreign_producer
from tests.conftest import BROKER, BROKER_URL, STATE_REDIS_URL
from tests.workers import WorkerProcess, count_rows, wait_for, wait_for_rows

OURS = "notifier.broker_redis:Transport"
redis_only = pytest.mark.skipif(BROKER != "redis", reason="the Redis transport")


class CuttingProxy:
    """A TCP proxy to the test's Redis that, once, closes both sides of the connection
    whose reply from Redis carries ``marker`` instead of passing that reply on: a
    connection lost after Redis sent its answer. Every other byte passes unchanged."""

    def __init__(self, marker: bytes) -> None:
        target = urlsplit(STATE_REDIS_URL)
        self.target = (target.hostname or "127.0.0.1", target.port or 6379)
        self.marker = marker
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", free_port(26500)))
        self.port = self.listener.getsockname()[1]
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            pair = (downstream, upstream)
            threading.Thread(target=self._pipe, args=(downstream, upstream, pair, False),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, downstream, pair, True),
                             daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket,
              pair: tuple[socket.socket, socket.socket], from_redis: bool) -> None:
        tail = b""
        try:
            while chunk := source.recv(65536):
                seen, tail = tail + chunk, (tail + chunk)[-len(self.marker):]
                if from_redis and not self.cut.is_set() and self.marker in seen:
                    self.cut.set()
                    break
                sink.sendall(chunk)
        except OSError:
            pass
        for end in pair:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self._closing = True
        self.listener.close()


@pytest.fixture
def proxy() -> Iterator[CuttingProxy]:
    cutting = CuttingProxy(b"notifier.ingest")
    yield cutting
    cutting.close()


@redis_only
def test_a_reply_lost_after_redis_took_the_message_loses_nothing(proxy: CuttingProxy):
    """The worker's connection breaks right after Redis answered with a notification
    (popped from its queue): it comes back after the visibility timeout and is stored,
    once. (The stock transport loses it: it was in no list and in no hash.)"""
    db = urlsplit(STATE_REDIS_URL).path
    worker = WorkerProcess.start(env={
        "NOTIFIER_BROKER_URL": f"redis://127.0.0.1:{proxy.port}{db}",
        "NOTIFIER_REDIS_URL": STATE_REDIS_URL,
    })
    try:
        client.notify("ada", "report", "cut off in the reply")
        wait_for(proxy.cut.is_set, 15, "the reply carrying the message")
        wait_for_rows(1, timeout=30)
        time.sleep(1)  # a second delivery would land now
        assert count_rows() == 1
    finally:
        worker.stop()
    assert "Connection to broker lost" in worker.log()


@redis_only
def test_a_worker_killed_while_waiting_for_messages_takes_none_with_it():
    """A worker frozen while it waits on empty queues, then SIGKILLed after messages
    arrived on its most urgent queue and another: a new worker stores both. (The stock
    transport's waiting ``BRPOP`` pops a message into the frozen worker's socket, and
    the kill loses it.)"""
    first = WorkerProcess.start()
    time.sleep(0.5)  # well inside its wait
    os.kill(first.process.pid, signal.SIGSTOP)
    try:
        client.notify("ada", "alert", "urgent", priority="critical")
        client.notify("bob", "report", "in due course")
        time.sleep(0.5)
    finally:
        first.kill()
    second = WorkerProcess.start()
    try:
        wait_for_rows(2, timeout=20)
    finally:
        second.stop()


def _queues() -> list[Queue]:
    return [Queue(name, Exchange(name, type="direct"), routing_key=name)
            for name in ("test-brokerredis.first", "test-brokerredis.second")]


def _publish_mix(url: str) -> None:
    """Eight messages from a stock kombu producer over two queues and two priority steps."""
    first, second = _queues()
    with Connection(url) as connection:
        producer = Producer(connection)
        for n in range(8):
            queue = (first, second)[n % 2]
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=queue.routing_key,
                             declare=[queue], priority=(0, 9)[n // 4])


def _consume(url: str, transport: str | None, count: int, ack: bool = True) -> list[int]:
    bodies: list[int] = []

    def received(body: dict[str, int], message: object) -> None:
        bodies.append(body["n"])
        if ack:
            message.ack()  # type: ignore[attr-defined]

    options = {"queue_order_strategy": "priority"}
    with Connection(url, transport=transport, transport_options=options) as connection, \
            Consumer(connection, _queues(), callbacks=[received]):
        deadline = time.monotonic() + 10
        while len(bodies) < count and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=1)
        # Unacknowledged ones stay recorded, as if the consumer had died (a channel
        # closed in good order puts them back at once).
        connection.default_channel.do_restore = ack
    return bodies


@pytest.fixture
def kombu_db() -> Iterator[str]:
    """The run's Redis db with the test queues and kombu's unacked records emptied."""
    state = redis.Redis.from_url(STATE_REDIS_URL)

    def empty() -> None:
        for key in [*state.scan_iter("test-brokerredis*"), "unacked", "unacked_index"]:
            state.delete(key)

    empty()
    yield STATE_REDIS_URL
    empty()
    state.close()


def test_messages_come_in_the_stock_transports_order(kombu_db: str):
    """Queue order and priority steps: the same messages come in the order kombu's own
    ``BRPOP`` gives them (every queue at step 0, in order, then the next step)."""
    _publish_mix(kombu_db)
    stock = _consume(kombu_db, None, 8)
    _publish_mix(kombu_db)
    ours = _consume(kombu_db, OURS, 8)
    assert ours == stock
    assert sorted(ours) == list(range(8))


def test_unacknowledged_records_are_kombus_own_and_its_restore_brings_them_back(kombu_db: str):
    """What the script records is what kombu's ``QoS.append`` writes, and the stock
    visibility-timeout restore puts it back on its queue, marked redelivered."""
    _publish_mix(kombu_db)
    assert len(_consume(kombu_db, OURS, 8, ack=False)) == 8
    state = redis.Redis.from_url(kombu_db)
    entries = [json.loads(raw) for raw in state.hvals("unacked")]
    assert len(entries) == state.zcard("unacked_index") == 8
    for message, exchange, routing_key in entries:
        assert exchange == routing_key == message["properties"]["delivery_info"]["routing_key"]
        assert routing_key.startswith("test-brokerredis.")
        assert state.zscore("unacked_index", message["properties"]["delivery_tag"])
    with Connection(kombu_db, transport_options={"visibility_timeout": 0}) as connection:
        connection.default_channel.qos.restore_visible(num=100, interval=1)
    assert state.hlen("unacked") == 0
    again = _consume(kombu_db, None, 8)
    assert sorted(again) == list(range(8))


def test_no_ack_consumers_leave_no_record(kombu_db: str):
    """A consumer that does not acknowledge (Celery's reply queues) gets its messages
    without a record in ``unacked``, as from the stock transport (a record would
    bring them back after the visibility timeout)."""
    _publish_mix(kombu_db)
    with Connection(kombu_db, transport=OURS) as connection:
        bodies: list[int] = []
        with Consumer(connection, _queues(), no_ack=True,
                      callbacks=[lambda body, _: bodies.append(body["n"])]):
            while len(bodies) < 8:
                connection.drain_events(timeout=5)
    assert redis.Redis.from_url(kombu_db).hlen("unacked") == 0


def test_a_receive_takes_no_more_than_the_prefetch_window_has_room_for(kombu_db: str):
    """One receive may take several messages, never more than the consumer's prefetch
    window: the rest stay on their queues for other workers."""
    _publish_mix(kombu_db)
    state = redis.Redis.from_url(kombu_db)
    received: list[int] = []
    options = {"queue_order_strategy": "priority"}
    with Connection(kombu_db, transport=OURS, transport_options=options) as connection, \
            Consumer(connection, _queues(), prefetch_count=3,
                     callbacks=[lambda body, _: received.append(body["n"])]):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=0.2)
        assert len(received) == 3
        queued = sum(state.llen(key) for key in state.scan_iter("test-brokerredis*"))
        assert queued == 5 and state.hlen("unacked") == 3
        connection.default_channel.do_restore = False


def test_an_unreadable_message_in_a_receive_costs_only_itself(kombu_db: str):
    """A receive that takes a message nobody can read (not JSON, pushed by hand) among
    good ones hands every good one over, then raises that one's error once."""
    first, _ = _queues()
    state = redis.Redis.from_url(kombu_db)
    with Connection(kombu_db) as connection:
        producer = Producer(connection)
        for n in range(4):
            if n == 2:
                state.lpush(first.name, b"not json {")
            producer.publish({"n": n}, exchange=first.exchange, routing_key=first.routing_key,
                             declare=[first])
    received: list[int] = []
    failures: list[Exception] = []
    options = {"queue_order_strategy": "priority"}
    with Connection(kombu_db, transport=OURS, transport_options=options) as connection, \
            Consumer(connection, [first], callbacks=[
                lambda body, message: (received.append(body["n"]), message.ack())]):
        deadline = time.monotonic() + 5
        while len(received) < 4 and time.monotonic() < deadline:
            try:
                connection.drain_events(timeout=0.5)
            except TimeoutError:
                pass
            except ValueError as exc:  # the unreadable one: JSONDecodeError
                failures.append(exc)
    assert received == [0, 1, 2, 3]
    assert len(failures) == 1
    assert state.llen(first.name) == 0


def test_acks_together_remove_the_blocks_records_in_one_write_when_it_ends(kombu_db: str):
    """Inside ``acks_together`` an ack frees the prefetch window at once and its record
    stays until the block ends; then every record of the block is gone."""
    _publish_mix(kombu_db)
    state = redis.Redis.from_url(kombu_db)
    messages: list[Any] = []
    with Connection(kombu_db, transport=OURS) as connection, \
            Consumer(connection, _queues(), prefetch_count=8,
                     callbacks=[lambda _, message: messages.append(message)]):
        while len(messages) < 8:
            connection.drain_events(timeout=5)
        qos = connection.default_channel.qos
        assert not qos.can_consume()
        with qos.acks_together():
            for message in messages:
                message.ack()
            assert qos.can_consume()
            assert state.hlen("unacked") == state.zcard("unacked_index") == 8
        assert state.hlen("unacked") == state.zcard("unacked_index") == 0
        assert all(message.acknowledged for message in messages)


@redis_only
def test_a_workers_batches_leave_no_unacknowledged_record(worker: WorkerProcess):
    """Single notifications, acknowledged a batch at a time: once stored, none of their
    messages is left in ``unacked`` (the restore would send it again)."""
    for n in range(40):
        client.notify("ada", "report", f"single {n}")
    wait_for_rows(40, timeout=30)
    broker = redis.Redis.from_url(BROKER_URL)
    wait_for(lambda: broker.hlen("unacked") == 0, 10, "no unacknowledged record left")


@redis_only
def test_a_foreign_stock_producers_messages_are_stored(worker: WorkerProcess):
    """A plain Celery app of another service (stock transport, ``send_task``) still
    feeds workers on ours."""
    app = foreign_producer("other-service", BROKER_URL)
    for priority in ("critical", "low"):
        app.send_task("notifier.ingest", args=[{"recipient": "ada", "type": "report",
                                                "title": priority, "priority": priority}],
                      queue=f"notifier.{priority}")
    wait_for_rows(2, timeout=20)


def test_workers_and_producers_use_it_for_redis_and_keep_it_through_a_sentinel_switch():
    """``celery_settings`` picks our transport for redis:// and sentinel://, and a
    failed connect to a Sentinel (kombu "switches" to the next URL, re-reading the
    scheme) does not put the stock one back."""
    sentinels = "sentinel://:pw@127.0.0.1:1/0;sentinel://127.0.0.1:2/0"
    settings = get_settings().model_copy(update={"broker_url": sentinels,
                                                 "broker_sentinel_master": "m"})
    app = Celery("switch-check")
    app.conf.update(celery_settings(settings))
    connection = app.connection_for_write()
    assert connection.transport_cls == SENTINEL_TRANSPORT
    connection.maybe_switch_next()
    assert connection.transport_cls == SENTINEL_TRANSPORT
    assert (connection.hostname, connection.password, connection.virtual_host) == (
        "127.0.0.1", "pw", "0")
    app = Celery("uri-check")
    app.conf.update(celery_settings(get_settings().model_copy(
        update={"broker_url": "redis://127.0.0.1/3"})))
    connection = app.connection_for_write()
    assert connection.transport_cls == OURS
    # What Flower's broker page and Celery's banner read: the URL's own scheme.
    assert connection.as_uri().startswith("redis://")


@redis_only
def test_an_idle_worker_waits_with_redis_client_tracking_armed(worker: WorkerProcess):
    """An idle worker has its consuming connection tracking keys (``CLIENT TRACKING``,
    flag ``t``) for a connection of its own subscribed to invalidations, which is how a
    push wakes it; a notification sent then is stored."""
    state = redis.Redis.from_url(STATE_REDIS_URL)
    db = int(urlsplit(STATE_REDIS_URL).path.strip("/"))

    def armed() -> bool:
        clients = [c for c in state.client_list() if int(c.get("db", -1)) == db]
        tracking = [c for c in clients if "t" in c["flags"]]
        return any(int(c.get("redir", -1)) in {int(o["id"]) for o in clients} for c in tracking)

    wait_for(armed, 15, "a tracking connection redirected to one of the worker's")
    client.notify("ada", "report", "while idle")
    wait_for_rows(1, timeout=20)
