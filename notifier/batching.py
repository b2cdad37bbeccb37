"""A batch task base that acknowledges only what was committed and never lets critical
work wait behind bulk work.

celery-batches collects the messages a worker holds into one call, which is what lets
ingest write hundreds of notifications per transaction. Its scheduling does not fit a
pipeline that must not lose anything and must keep critical latency low, so this
subclass keeps its message handling and replaces the rest:

* **Commit, then acknowledge.** celery-batches acknowledges a batch whose ``run``
  raised; here a batch that did not commit goes back to the queue (and so does a batch
  whose pool process died).
* **Items, not messages.** One message may carry hundreds of notifications, so a batch
  closes at ``flush_items`` items (or after ``flush_interval`` seconds).
* **One batch per pool process.** Handing every batch to the pool at once would queue
  them first-in-first-out inside the pool, where a critical batch waits behind all of
  them. Batches wait in this process instead, and when a pool process frees up the
  critical ones ("urgent") go first.
* **Back-pressure.** While a pool's worth of batches is already waiting, the worker
  stops taking messages from its bulk queues, so the backlog stays in the broker, where
  the queue order still puts critical work first. Urgent queues are never paused.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task
from kombu.message import Message

from notifier.settings import PRIORITIES, get_settings, queue_name

log = logging.getLogger(__name__)


@dataclass
class _Held:
    request: Any
    items: int
    arrived: float


class _Buffer:
    """Requests waiting for a pool process, oldest first, with their item count."""

    def __init__(self) -> None:
        self.held: deque[_Held] = deque()
        self.items = 0

    def add(self, held: _Held) -> None:
        self.held.append(held)
        self.items += held.items

    def take(self, max_items: int) -> list[Any]:
        """Up to ``max_items`` items' worth of requests (at least one request)."""
        taken: list[Any] = []
        count = 0
        while self.held and (not taken or count + self.held[0].items <= max_items):
            held = self.held.popleft()
            taken.append(held.request)
            count += held.items
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
        self._sizer: Any = None

    # --- receiving ----------------------------------------------------------------------

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Callable[..., None]:
        self.flush_every = 1 << 62  # never by message count: we count items
        handle = super().Strategy(task, app, consumer)
        self._consumer = consumer
        self._slots = max(1, getattr(consumer.pool, "limit", None) or 1)

        def handle_message(message: Message, *args: Any, **kwargs: Any) -> None:
            handle(message, *args, **kwargs)  # builds the request into self._buffer
            self._do_flush()

        return handle_message

    def _take_incoming(self) -> None:
        """Sort what celery-batches queued into the urgent and bulk buffers."""
        now = time.monotonic()
        while not self._buffer.empty():
            request = self._buffer.get_nowait()
            urgent = request.delivery_info.get("routing_key") in self.urgent_routing_keys
            held = _Held(request, self.items_in(request), now)
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
                self._take_incoming()
                while self._in_flight < self._slots and (batch := self._next_batch()):
                    self.flush(batch)
            self._apply_back_pressure()
        finally:
            self._flushing = False

    def _next_batch(self) -> list[Any]:
        if self._urgent.held:
            return self._urgent.take(self.flush_items)
        size = self._bulk_batch_size()
        full = self._bulk.items >= size
        if full or self._bulk.oldest_age(time.monotonic()) >= self.flush_interval:
            return self._bulk.take(size)
        return []

    def _bulk_batch_size(self) -> int:
        """Bulk batches follow the backlog (``flush_items`` is the most); critical ones
        are written as they come."""
        if self._sizer is None:
            from notifier.batch_sizing import ingest_sizer

            self._sizer = ingest_sizer(get_settings(), self._items_per_message)
        return self._sizer.current(extra_waiting=self._bulk.items)

    def _items_per_message(self) -> float:
        held = len(self._bulk.held)
        return self._bulk.items / held if held else 1.0

    def flush(self, requests: Collection[Any]) -> Any:
        requests = list(requests)
        batch = ([SimpleRequest.from_request(request) for request in requests],)
        self._in_flight += 1
        event = self._batch_events(requests)

        def on_return(result: Any) -> None:
            if result is None:  # run() raised: nothing was committed
                self._requeue(requests, "the batch did not commit")
                event("task-failed", exception="the batch did not commit")
            else:
                for request in requests:
                    request.acknowledge()
                event("task-succeeded", result=repr(result))
            self._batch_done()

        def on_error(exc_info: Any) -> None:
            self._requeue(requests, f"the worker process failed ({exc_info!r})")
            event("task-failed", exception=repr(exc_info))
            self._batch_done()

        return self._pool.apply_async(
            apply_batches_task, (self, batch, 0, None),
            callback=on_return, error_callback=on_error,
        )

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

    def _batch_done(self) -> None:
        self._in_flight -= 1
        self._do_flush()

    @staticmethod
    def _requeue(requests: list[Any], why: str) -> None:
        log.warning("returning %d messages to the queue: %s", len(requests), why)
        for request in requests:
            request.reject(requeue=True)

    # --- back-pressure ------------------------------------------------------------------

    def _apply_back_pressure(self) -> None:
        """Pause the bulk queues while enough is waiting here; resume at half of it.

        Work waiting here does not delay critical work (that skips the buffers), so the
        mark is generous: ``pause_batches`` batches per pool process, and at most half
        the prefetch count in messages, so a critical message can always be fetched.
        """
        items = self._bulk.items + self._urgent.items
        messages = len(self._bulk.held) + len(self._urgent.held)
        item_mark = self.pause_batches * self._slots * self.flush_items
        message_mark = max(1, self._prefetch_count() // 2)
        if not self._paused_queues and (items >= item_mark or messages >= message_mark):
            self._pause_bulk_queues()
        elif self._paused_queues and items <= item_mark // 2 and messages <= message_mark // 2:
            self._resume_bulk_queues()

    def _prefetch_count(self) -> int:
        qos = getattr(self._consumer, "qos", None)
        return getattr(qos, "value", 0) or (1 << 30)

    def _task_consumer(self) -> Any:
        return getattr(self._consumer, "task_consumer", None)

    def _pause_bulk_queues(self) -> None:
        consumer = self._task_consumer()
        if consumer is None:
            return
        for name in (queue_name(p) for p in PRIORITIES):
            if name not in self.urgent_routing_keys and consumer.consuming_from(name):
                consumer.cancel_by_queue(name)
                self._paused_queues.append(name)

    def _resume_bulk_queues(self) -> None:
        """Consume the paused queues again, in priority order (kombu keeps that order)."""
        consumer = self._task_consumer()
        paused, self._paused_queues = self._paused_queues, []
        if consumer is None:
            return
        queues = self._consumer.app.amqp.queues
        for name in paused:
            if not consumer.consuming_from(name) and name in queues:
                consumer.add_queue(queues[name])
        consumer.consume()
