"""A batch task base that acknowledges only what was committed and never lets critical
work wait behind bulk work.

celery-batches collects the messages a worker holds into one call, which is what lets
ingest write hundreds of notifications per transaction. Its scheduling does not fit a
pipeline that must not lose anything and must keep critical latency low, so this
subclass keeps its message handling and replaces the rest:

* **Commit, then acknowledge.** celery-batches acknowledges a batch whose ``run``
  raised; here a batch that did not commit goes back to the queue (and so does a batch
  whose pool process died). On Redis a committed batch's acknowledgements go in one
  round trip (``notifier.broker_redis.QoS.acks_together``).
* **Items, not messages.** One message may carry hundreds of notifications, so a batch
  closes at ``flush_items`` items (or after ``flush_interval`` seconds).
* **One batch per pool process.** Handing every batch to the pool at once would queue
  them first-in-first-out inside the pool, where a critical batch waits behind all of
  them. Batches wait in this process instead, and when a pool process frees up the
  critical ones ("urgent") go first.
* **A lane for critical batches.** Under the prefork pool the worker runs processes
  beyond ``-c`` (:mod:`notifier.worker.lane`): bulk batches take a slot of the
  worker's semaphore like any Celery task, so bulk batches and deliveries together
  hold at most ``-c`` processes, and an urgent batch goes at once to a lane process,
  never behind a bulk batch. Urgent work takes one of the ``-c`` processes too once
  the lanes fall behind, and bulk leaves a core to them while criticals flow.
* **Back-pressure.** While a pool's worth of batches is already waiting, or the
  messages held weigh more than ``worker_held_bytes``, the worker stops taking messages
  from its bulk queues, so the backlog stays in the broker, where the queue order still
  puts critical work first. Urgent queues are paused only at twice the byte budget.
* **Bounded messages.** A message over ``max_message_bytes`` is never decoded, and one
  Celery cannot even turn into a request (any header, any body) is not dropped: both
  go to the ingest task as a :class:`RefusedMessage`, which dead-letters them.
* **No message retried for ever.** A batch that did not commit for a reason other
  than Postgres being away, or whose pool process died, counts one failure against
  each of its messages (in the state Redis). A redelivered message with failures runs
  in a batch of its own, so its companions are not dragged along; at
  ``message_max_failures`` failures it is dead-lettered without running. A message on its
  first delivery costs no Redis round trip: only redelivered ones are looked up.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task
from kombu.message import Message

from notifier.settings import PRIORITIES, get_settings, queue_name
from notifier.worker.lane import SlotLedger

if TYPE_CHECKING:
    from notifier.worker.batch_sizing import AdaptiveBatchSize

log = logging.getLogger(__name__)

#: The key of a batch result that says "not committed" (see :func:`batch_failed`).
UNCOMMITTED = "uncommitted"
#: State Redis hash per message id: failures counted, the last one's class and reason.
FAILURES_KEY = "notifier:ingest:failures:{}"


def batch_failed(exc: BaseException, database_unavailable: bool) -> dict[str, Any]:
    """What a batch task returns when it did not commit: its messages go back to the
    queue, and unless Postgres was away the failure counts against each of them."""
    from notifier.pipeline.ingest import describe_exception

    return {UNCOMMITTED: True, "database_unavailable": database_unavailable,
            "error_class": type(exc).__name__, "reason": describe_exception(exc)}


class RefusedMessage(SimpleRequest):
    """A message the consumer would not hand over as is (too big, unreadable, failed too
    often): the ingest task dead-letters it, with ``payload`` (the decoded argument,
    or a prefix of the raw body when ``original`` gives its size and SHA-256)."""

    def __init__(self, id: Any, delivery_info: dict[str, Any], reason: str, error_class: str,
                 payload: Any, original: tuple[int, str] | None) -> None:
        super().__init__(id, "notifier.ingest", (), {}, delivery_info, "", True, None, None, {})
        self.reason = reason
        self.error_class = error_class
        self.payload = payload
        self.original = original


class _Refused:
    """The consumer's side of a :class:`RefusedMessage`: acknowledges the message."""

    def __init__(self, message: Message, refused: RefusedMessage, size: int) -> None:
        self.message = message
        self.refused = refused
        self.id = refused.id
        self.args = refused.args
        self.delivery_info = refused.delivery_info
        self.body_size = size

    def acknowledge(self) -> None:
        self.message.ack_log_error(log, (Exception,))

    def reject(self, requeue: bool = False) -> None:
        self.message.reject_log_error(log, (Exception,), requeue=requeue)


@dataclass
class _Held:
    request: Any
    items: int
    arrived: float
    size: int = 0


class _Buffer:
    """Requests waiting for a pool process, oldest first, with their items and bytes."""

    def __init__(self) -> None:
        self.held: deque[_Held] = deque()
        self.items = 0
        self.bytes = 0

    def add(self, held: _Held) -> None:
        self.held.append(held)
        self.items += held.items
        self.bytes += held.size

    def take(self, max_items: int) -> list[Any]:
        """Up to ``max_items`` items' worth of requests (at least one request)."""
        taken: list[Any] = []
        count = 0
        while self.held and (not taken or count + self.held[0].items <= max_items):
            held = self.held.popleft()
            taken.append(held.request)
            count += held.items
            self.bytes -= held.size
        self.items -= count
        return taken

    def oldest_age(self, now: float) -> float:
        return now - self.held[0].arrived if self.held else 0.0


class CommittedBatches(Batches):
    abstract = True
    #: Items (not messages) that close a batch.
    flush_items: int = 500
    #: Batches per pool process that may wait here before the bulk queues are paused.
    #: On Redis a resumed queue is read only after the pending BRPOP returns (up to one
    #: second), so half of this must keep the pool busy for about that long.
    pause_batches: int = 20
    #: Seconds after an urgent message during which bulk batches leave the lane's
    #: process to it (see :meth:`_bulk_slots`).
    urgent_linger: float = 1.0
    #: Routing keys whose messages go first and whose queues are never paused.
    urgent_routing_keys: frozenset[str] = frozenset({queue_name("critical")})

    def __init__(self) -> None:
        super().__init__()
        self._urgent = _Buffer()
        self._bulk = _Buffer()
        self._in_flight = 0
        self._slots = 1
        self._consumer: Any = None
        self._paused_queues: list[str] = []
        self._flushing = False
        self._flush_again = False
        self._sizer: AdaptiveBatchSize | None = None
        #: Ids of redelivered messages with failures: each runs in a batch of its own.
        self._alone: set[str] = set()
        self._in_flight_bytes = 0
        self._urgent_paused: list[str] = []
        #: Pool processes kept for urgent batches (0: no lane), and those busy.
        self._lane = 0
        self._lane_in_flight = 0
        self._urgent_seen = float("-inf")
        #: The worker's semaphore, when there is a lane (bulk batches take its slots).
        self._ledger: SlotLedger | None = None

    # --- receiving ----------------------------------------------------------------------

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Callable[..., None]:
        self.flush_every = 1 << 62  # never by message count: we count items
        handle = super().Strategy(task, app, consumer)
        _refuse_compressed_bodies()
        self._consumer = consumer
        controller: Any = getattr(consumer, "controller", None)
        self._lane = getattr(controller, "critical_lane", 0) or 0
        pool_size = getattr(consumer.pool, "limit", None) or 1
        self._slots = max(1, pool_size - self._lane)
        if self._lane:
            self._ledger = SlotLedger(controller.semaphore)

        def handle_message(message: Message, *args: Any, **kwargs: Any) -> None:
            refused = self._refusal(message)
            if refused is None:
                waiting = self._buffer.qsize()
                try:
                    handle(message, *args, **kwargs)  # builds the request into self._buffer
                except Exception as exc:  # any header, any body
                    if self._buffer.qsize() == waiting:
                        self._alone.discard(_message_id(message))
                        refused = self._refuse(
                            message, f"message: could not be read: {_describe(exc)}",
                            type(exc).__name__, decode=False,
                        )
            if refused is not None:
                self._buffer.put(refused)
            self._do_flush()

        return handle_message

    # --- refusing -----------------------------------------------------------------------

    def _refusal(self, message: Message) -> _Refused | None:
        """Refuse a message too big to decode or that failed too often; else None, with
        a redelivered message that failed before marked to run alone. O(1) for a fresh
        message: only a redelivered one is looked up in Redis."""
        settings = get_settings()
        size = _body_size(message)
        compressed = (message.headers or {}).get("compression")
        if compressed:
            return self._refuse(
                message, f"message: compressed bodies are not accepted (compression:"
                f" {_quote(compressed)})", "MessageCompressed", decode=False,
            )
        if size > settings.max_message_bytes:
            return self._refuse(
                message, f"message: is {size} bytes, more than the limit of"
                f" {settings.max_message_bytes}", "MessageTooLarge", decode=False,
            )
        if not _redelivered(message):
            return None
        message_id = _message_id(message)
        failures = _failures_of(message_id)
        count = int(failures.get(b"count", 0) or 0)
        if count >= settings.message_max_failures:
            last = failures.get(b"reason", b"").decode(errors="replace")
            return self._refuse(
                message, f"message: came back {count} times after failing (limit"
                f" {settings.message_max_failures}); last failure: {last}",
                failures.get(b"error_class", b"Exception").decode(errors="replace"),
                decode=True,
            )
        if count:
            self._alone.add(message_id)
        return None

    def _refuse(self, message: Message, reason: str, error_class: str,
                decode: bool) -> _Refused:
        """A refused message with what its dead letter keeps: the decoded argument if it
        may be decoded, else a prefix of the raw body with its size and SHA-256."""
        size = _body_size(message)
        payload, original = None, None
        if decode:
            payload = _argument_of(message)
        if payload is None:
            body = message.body if isinstance(message.body, bytes) else str(message.body or "")
            raw = body.encode("utf-8", "replace") if isinstance(body, str) else body
            limit = get_settings().dead_letter_payload_bytes
            payload = raw[:limit].decode("utf-8", "replace")
            original = (len(raw), hashlib.sha256(raw).hexdigest())
        info = message.delivery_info or {}
        delivery_info = {"routing_key": info.get("routing_key"),
                         "exchange": info.get("exchange")}
        refused = RefusedMessage(_message_id(message), delivery_info, reason, error_class,
                                 payload, original)
        return _Refused(message, refused, size)

    def _take_incoming(self) -> None:
        """Sort what celery-batches queued into the urgent and bulk buffers."""
        now = time.monotonic()
        while not self._buffer.empty():
            request = self._buffer.get_nowait()
            urgent = request.delivery_info.get("routing_key") in self.urgent_routing_keys
            if urgent:
                self._urgent_seen = now
            items = self.items_in(request)
            if self._alone and _request_id(request) in self._alone:
                self._alone.discard(_request_id(request))
                items = max(items, self.flush_items)  # a batch of its own
            held = _Held(request, items, now, _request_size(request))
            (self._urgent if urgent else self._bulk).add(held)

    @staticmethod
    def items_in(request: Any) -> int:
        """How many items a request carries (its first argument, if a list)."""
        args = request.args
        return max(1, len(args[0])) if args and isinstance(args[0], list) else 1

    # --- dispatching --------------------------------------------------------------------

    def _do_flush(self) -> None:
        """Fill free pool processes, urgent batches first. Called on every message, on
        every timer tick and whenever a batch finishes."""
        if self._flushing:  # a solo pool finishes batches inside apply_async
            self._flush_again = True
            return
        self._flushing = True
        try:
            self._flush_again = True
            while self._flush_again:
                self._flush_again = False
                if self._ledger is not None:
                    self._ledger.settle()  # may grant our wait: then this loop runs again
                self._take_incoming()
                while self._lane_in_flight < self._lane and self._urgent.held:
                    self._send(self._urgent.take(self.flush_items), lane=True)
                while (self._in_flight < self._bulk_slots() and self._batch_ready()
                       and self._slot_free()):
                    self._send(self._next_batch(), lane=False)
            if self._ledger is not None:
                self._ledger.give_back()
            self._apply_back_pressure()
        finally:
            self._flushing = False

    def _bulk_slots(self) -> int:
        """Processes batches other than the lane's may hold: ``-c``, one less for
        ``urgent_linger`` seconds after an urgent message arrived. On a machine whose
        cores are all busy (Postgres on the same host), the lane running beside ``-c``
        bulk batches would have to share their cores; while criticals flow, the lane
        takes one bulk batch's place instead (what critical-first dispatch did before
        the lane, but without waiting for that batch to end first). One place, however
        many lanes: one lane is busy most of the time, a second covers the overlap of
        two critical batches."""
        lingering = time.monotonic() - self._urgent_seen < self.urgent_linger
        return max(1, self._slots - 1) if self._lane and lingering else self._slots

    def _urgent_overflows(self) -> bool:
        """Whether urgent work takes one of the ``-c`` processes: always without a lane;
        with lanes, once they fall behind (a full batch, or one that waited
        ``flush_interval``), or at once when every lane is busy and no bulk work waits
        here (an incident's burst of criticals on a quiet worker: the ``-c`` processes
        would idle while criticals queued for a lane). While bulk work waits,
        criticals arriving while every lane is busy gather for the next free one: split
        into small batches on every process, each batch's fixed cost (commit,
        publishing, a delivery task, its events) made criticals under load slower, and
        took processes from bulk work."""
        if not self._urgent.held:
            return False
        return (not self._lane or self._urgent.items >= self.flush_items
                or (not self._bulk.held and self._lane_in_flight >= self._lane)
                or self._urgent.oldest_age(time.monotonic()) >= self.flush_interval)

    def _batch_ready(self) -> bool:
        """An urgent batch, or a bulk one that is full or waited ``flush_interval``."""
        if self._urgent_overflows():
            return True
        if not self._bulk.held:
            return False
        full = self._bulk.items >= self._bulk_batch_size()
        return full or self._bulk.oldest_age(time.monotonic()) >= self.flush_interval

    def _next_batch(self) -> list[Any]:
        """The batch :meth:`_batch_ready` saw: urgent first."""
        if self._urgent_overflows():
            return self._urgent.take(self.flush_items)
        return self._bulk.take(self._bulk_batch_size())

    def _slot_free(self) -> bool:
        """Whether a batch may take a pool process now; with a lane, a slot of the
        worker's semaphore (else :meth:`_do_flush` runs again once one is free)."""
        return self._ledger is None or self._ledger.take(self._do_flush)

    def _bulk_batch_size(self) -> int:
        """Bulk batches follow the backlog (``flush_items`` is the most); critical ones
        are written as they come."""
        if self._sizer is None:
            from notifier.worker.batch_sizing import ingest_sizer

            self._sizer = ingest_sizer(get_settings(), self._items_per_message)
        return self._sizer.current(extra_waiting=self._bulk.items)

    def _items_per_message(self) -> float:
        held = len(self._bulk.held)
        return self._bulk.items / held if held else 1.0

    def flush(self, requests: Collection[Any]) -> Any:
        """celery-batches' entry point: a batch on one of the ``-c`` processes."""
        return self._send(requests, lane=False)

    def _send(self, requests: Collection[Any], lane: bool) -> Any:
        """Hand a batch to the pool: on the lane (an urgent batch, no semaphore slot),
        or on one of the ``-c`` processes (with the slot :meth:`_slot_free` took)."""
        requests = list(requests)
        batch = ([_simple(request) for request in requests],)
        size = sum(_request_size(request) for request in requests)
        if lane:
            self._lane_in_flight += 1
            if self._ledger is not None:
                self._ledger.lane_started()
        else:
            self._in_flight += 1
            if self._ledger is not None:
                self._ledger.spend()
        self._in_flight_bytes += size
        event = self._batch_events(requests)

        def on_return(result: Any) -> None:
            if result is None or (isinstance(result, dict) and result.get(UNCOMMITTED)):
                failure = result or {"error_class": "Exception",
                                     "reason": "the batch task raised (see the log)"}
                if not failure.get("database_unavailable"):
                    _count_failures(requests, failure["error_class"], failure["reason"])
                self._requeue(requests, f"the batch did not commit: {failure['reason']}")
                event("task-failed", exception="the batch did not commit")
            else:
                with self._acks_together():
                    for request in requests:
                        request.acknowledge()
                event("task-succeeded", result=repr(result))
            self._batch_done(size, lane)

        def on_error(exc_info: Any) -> None:
            exc = _unwrap(exc_info)
            _count_failures(requests, type(exc).__name__,
                            f"the worker process failed: {_describe(exc)}")
            self._requeue(requests, f"the worker process failed ({exc_info!r})")
            event("task-failed", exception=repr(exc_info))
            self._batch_done(size, lane)

        return self._pool.apply_async(
            apply_batches_task, (self, batch, 0, None),
            callback=on_return, error_callback=on_error,
        )

    def _acks_together(self) -> contextlib.AbstractContextManager[None]:
        """One broker round trip for a committed batch's acknowledgements where the
        transport offers it (``notifier.broker_redis``), else each message's own."""
        channel = getattr(self._task_consumer(), "channel", None)
        together = getattr(getattr(channel, "qos", None), "acks_together", None)
        return together() if callable(together) else contextlib.nullcontext()

    def _batch_events(self, requests: list[Any]) -> Callable[..., None]:
        """Task events for the batch as one task (celery-batches sends none), so Flower
        and its /metrics show ``notifier.ingest`` with a runtime: three events per batch,
        where events per message would cost the consumer three publishes each."""
        dispatcher = getattr(self._consumer, "event_dispatcher", None)
        if dispatcher is None or not dispatcher.enabled:
            return lambda *args, **kwargs: None
        batch_id, started = str(uuid.uuid4()), time.monotonic()
        items = sum(self.items_in(request) for request in requests)
        dispatcher.send("task-received", uuid=batch_id, name=self.name, retries=0,
                        args=f"[<{len(requests)} messages, {items} notifications>]",
                        kwargs="{}", root_id=batch_id, parent_id=None)
        dispatcher.send("task-started", uuid=batch_id)

        def send(kind: str, **fields: Any) -> None:
            dispatcher.send(kind, uuid=batch_id, runtime=time.monotonic() - started, **fields)

        return send

    def _batch_done(self, size: int, lane: bool) -> None:
        if lane:
            self._lane_in_flight -= 1
            if self._ledger is not None:
                self._ledger.lane_ended()
        else:
            self._in_flight -= 1
        self._in_flight_bytes -= size
        self._do_flush()

    @staticmethod
    def _requeue(requests: list[Any], why: str) -> None:
        with contextlib.suppress(Exception):  # a log line must not keep messages
            log.warning("returning %d messages to the queue: %s", len(requests), why)
        for request in requests:
            request.reject(requeue=True)

    # --- back-pressure ------------------------------------------------------------------

    def _apply_back_pressure(self) -> None:
        """Pause the bulk queues while enough is waiting here; resume at half of it.

        Work waiting here does not delay critical work (that skips the buffers), so the
        mark is generous: ``pause_batches`` batches per pool process, and at most half
        the prefetch count in messages, so a critical message can always be fetched.
        Bytes count too: messages waiting and in the pool may weigh ``worker_held_bytes``
        before the bulk queues pause, twice that before the urgent ones do.
        """
        items = self._bulk.items + self._urgent.items
        messages = len(self._bulk.held) + len(self._urgent.held)
        held_bytes = self._bulk.bytes + self._urgent.bytes + self._in_flight_bytes
        byte_mark = get_settings().worker_held_bytes
        item_mark = self.pause_batches * self._slots * self.flush_items
        message_mark = max(1, self._prefetch_count() // 2)
        if not self._paused_queues and (
            items >= item_mark or messages >= message_mark or held_bytes >= byte_mark
        ):
            self._paused_queues = self._pause_queues(urgent=False)
        elif self._paused_queues and (
            items <= item_mark // 2 and messages <= message_mark // 2
            and held_bytes <= byte_mark // 2
        ):
            self._resume_queues(self._paused_queues)
            self._paused_queues = []
        if not self._urgent_paused and held_bytes >= 2 * byte_mark:
            self._urgent_paused = self._pause_queues(urgent=True)
        elif self._urgent_paused and held_bytes <= byte_mark:
            self._resume_queues(self._urgent_paused)
            self._urgent_paused = []

    def _prefetch_count(self) -> int:
        qos = getattr(self._consumer, "qos", None)
        return getattr(qos, "value", 0) or (1 << 30)

    def _task_consumer(self) -> Any:
        return getattr(self._consumer, "task_consumer", None)

    def _pause_queues(self, urgent: bool) -> list[str]:
        """Stop consuming from the bulk (or the urgent) queues; returns those paused."""
        consumer = self._task_consumer()
        if consumer is None:
            return []
        paused = []
        for name in (queue_name(p) for p in PRIORITIES):
            if (name in self.urgent_routing_keys) == urgent and consumer.consuming_from(name):
                consumer.cancel_by_queue(name)
                paused.append(name)
        return paused

    def _resume_queues(self, paused: list[str]) -> None:
        """Consume the paused queues again, in priority order (kombu keeps that order)."""
        consumer = self._task_consumer()
        if consumer is None:
            return
        queues = self._consumer.app.amqp.queues
        for name in paused:
            if not consumer.consuming_from(name) and name in queues:
                consumer.add_queue(queues[name])
        consumer.consume()


# --- helpers of the consumer (plain functions: no state of the task) ------------------


def _refuse_compressed_bodies() -> None:
    """Make kombu leave compressed message bodies compressed in this (consuming) process.

    kombu decompresses a body whose ``compression`` header asks for it as the message
    arrives, before any size check: a few MB of zlib can become gigabytes. We never
    compress, so the body stays as it came, and :meth:`CommittedBatches._refusal`
    dead-letters the message (a decoder that raised would make kombu drop it instead).
    """
    from kombu import compression

    def leave_compressed(body: bytes) -> bytes:
        return body

    for content_type in list(compression._decoders):
        compression._decoders[content_type] = leave_compressed


def _simple(request: Any) -> SimpleRequest:
    if isinstance(request, _Refused):
        return request.refused
    return SimpleRequest.from_request(request)


def _body_size(message: Message) -> int:
    body = message.body
    return len(body) if isinstance(body, bytes | str) else 0


def _request_size(request: Any) -> int:
    if isinstance(request, _Refused):
        return request.body_size
    body = getattr(request, "body", None)
    return len(body) if isinstance(body, bytes | str) else 0


def _redelivered(message: Message) -> bool:
    """Whether the broker says it delivered this message before: AMQP's ``redelivered``
    flag, or on Redis the mark kombu puts on a restored (rejected, or unacknowledged
    past the visibility timeout) message, in its delivery info and headers."""
    info = message.delivery_info or {}
    headers = message.headers or {}
    return bool(info.get("redelivered") or headers.get("redelivered") is True)


def _message_id(message: Message) -> str:
    from notifier.pipeline.ingest import message_id_of

    headers = message.headers if isinstance(message.headers, dict) else {}
    return message_id_of(headers.get("id"))


def _request_id(request: Any) -> str:
    from notifier.pipeline.ingest import message_id_of

    return message_id_of(getattr(request, "id", None))


def _argument_of(message: Message) -> Any:
    """The message's one argument (what a dead letter keeps and a replay resends), or
    None if it cannot be decoded or is not one argument."""
    try:
        args, kwargs, *_ = message.decode()
    except Exception:  # then the raw body is kept
        return None
    return args[0] if isinstance(args, list) and len(args) == 1 and not kwargs else None


def _quote(value: Any) -> str:
    from notifier.schemas import quote

    return quote(value)


def _unwrap(exc_info: Any) -> Any:
    """The exception a pool error callback carries (billiard wraps it, twice)."""
    for _ in range(3):
        inner = getattr(exc_info, "exception", None) or getattr(exc_info, "exc", None)
        if not isinstance(inner, BaseException):
            break
        exc_info = inner
    return exc_info


def _describe(exc: BaseException) -> str:
    from notifier.pipeline.ingest import describe_exception

    return describe_exception(exc)


def _failures_of(message_id: str) -> dict[bytes, bytes]:
    """The failures counted against a message ({} if none, or Redis does not answer)."""
    from notifier.storage.state import state_redis

    try:
        failures = state_redis().hgetall(FAILURES_KEY.format(message_id))
        # The state Redis does not decode responses (redis-py's types cannot say so).
        return cast(dict[bytes, bytes], failures) or {}
    except Exception as exc:  # without Redis, a message runs as usual
        _warn("could not read a message's failures: %s", _describe(exc))
        return {}


def _count_failures(requests: list[Any], error_class: str, reason: str) -> None:
    """One more failure against each message of a batch that did not commit."""
    from notifier.storage.state import state_redis

    ttl = get_settings().message_failures_ttl
    try:
        pipe = state_redis().pipeline(transaction=False)
        for request in requests:
            key = FAILURES_KEY.format(_request_id(request))
            pipe.hincrby(key, "count", 1)
            pipe.hset(key, mapping={"error_class": error_class[:128], "reason": reason[:300]})
            pipe.expire(key, ttl)
        pipe.execute()
    except Exception as exc:  # the messages are requeued all the same
        _warn("could not count a batch's failure: %s", _describe(exc))


def _warn(message: str, *args: Any) -> None:
    with contextlib.suppress(Exception):
        log.warning(message, *args)
