"""A batch task base that acknowledges only what was committed.

celery-batches collects the messages a worker holds into one call, which is what lets
ingest write hundreds of notifications per transaction. Two of its habits do not fit a
pipeline that must not lose anything, so this subclass changes them:

* it acknowledges a batch whose ``run`` raised; here a batch that did not commit is
  rejected back to the queue (and a batch whose worker process died, too);
* it counts messages, while one message may carry hundreds of notifications; here a
  batch is flushed by the number of items it carries, and at once when a critical
  message arrives, so critical work never waits for a timer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task
from kombu.message import Message

log = logging.getLogger(__name__)


class CommittedBatches(Batches):
    abstract = True
    #: Items (not messages) that trigger a flush.
    flush_items: int = 500
    #: Routing keys whose messages are flushed as soon as they arrive.
    urgent_routing_keys: frozenset[str] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self._buffered_items = 0

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Callable[..., None]:
        # Count by items ourselves: the message count never triggers a flush.
        self.flush_every = 1 << 62
        handle = super().Strategy(task, app, consumer)

        def handle_message(message: Message, *args: Any, **kwargs: Any) -> None:
            handle(message, *args, **kwargs)
            self._buffered_items += self.items_in(message)
            if self._buffered_items >= self.flush_items or self.is_urgent(message):
                self._do_flush()

        return handle_message

    def items_in(self, message: Message) -> int:
        """How many items the message carries (its first argument, if a list)."""
        try:
            args = message.decode()[0]
            return len(args[0]) if args and isinstance(args[0], list) else 1
        except Exception:
            return 1

    def is_urgent(self, message: Message) -> bool:
        return message.delivery_info.get("routing_key") in self.urgent_routing_keys

    def flush(self, requests: Collection[Any]) -> Any:
        self._buffered_items = 0
        requests = list(requests)
        batch = ([SimpleRequest.from_request(request) for request in requests],)

        def on_return(result: Any) -> None:
            if result is None:  # run() raised: nothing was committed
                self._requeue(requests, "the batch did not commit")
            else:
                for request in requests:
                    request.acknowledge()

        def on_error(exc_info: Any) -> None:
            self._requeue(requests, f"the worker process failed ({exc_info!r})")

        return self._pool.apply_async(
            apply_batches_task, (self, batch, 0, None),
            callback=on_return, error_callback=on_error,
        )

    @staticmethod
    def _requeue(requests: list[Any], why: str) -> None:
        log.warning("returning %d messages to the queue: %s", len(requests), why)
        for request in requests:
            request.reject(requeue=True)
