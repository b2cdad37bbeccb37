"""Batch sizes that follow the backlog.

A big batch is cheap per item (one transaction, one SMTP session) but the first item
waits for the last; a small one goes out sooner and spreads over more worker processes.
So the size grows with what is waiting: the configured minimum at an empty queue, the
maximum once ``adaptive_high_water`` maximum-size batches are waiting, linear between.
Queue depth is read from the broker at most once per ``adaptive_refresh`` seconds per
process, and every choice is published as the ``notifier_batch_size_chosen`` gauge.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from notifier.settings import Settings
from notifier.worker.queues import INGEST_QUEUES, queue_depths

log = logging.getLogger(__name__)


def size_for_depth(waiting: int, minimum: int, maximum: int, high_water: int) -> int:
    """The batch size for ``waiting`` items: ``minimum`` at 0, ``maximum`` at
    ``high_water`` and above, linear between."""
    if maximum <= minimum or high_water <= 0:
        return max(minimum, maximum)
    share = min(1.0, max(0, waiting) / high_water)
    return round(minimum + (maximum - minimum) * share)


class AdaptiveBatchSize:
    """One stage's batch size, re-chosen from its queue depth now and then."""

    def __init__(
        self, stage: str, minimum: int, maximum: int, high_water_batches: float,
        depth: Callable[[], int], refresh: float,
    ) -> None:
        self.stage = stage
        self.minimum = min(minimum, maximum)
        self.maximum = maximum
        self.high_water = int(high_water_batches * maximum)
        self.depth = depth
        self.refresh = refresh
        self._size = maximum
        self._checked = float("-inf")

    @property
    def last(self) -> int:
        """The size chosen last (no broker call)."""
        return self._size

    def current(self, extra_waiting: int = 0) -> int:
        """The size to use now; ``extra_waiting`` are items the caller already holds."""
        now = time.monotonic()
        if now - self._checked >= self.refresh:
            self._checked = now
            try:
                waiting = self.depth()
            except Exception as exc:  # the broker away: keep the last size
                log.debug("queue depth unavailable for %s batches: %s", self.stage, exc)
                return self._size
            self._choose(waiting + extra_waiting)
        return self._size

    def _choose(self, waiting: int) -> None:
        from notifier.worker import metrics

        self._size = size_for_depth(waiting, self.minimum, self.maximum, self.high_water)
        metrics.record_batch_size_chosen(self.stage, self._size)


def broker_depth(queues: Iterable[str], items_per_message: Callable[[], float]) -> int:
    """Items waiting in the broker's ``queues`` (messages times the items they carry)."""
    depths = queue_depths(list(queues))
    messages = sum(depth or 0 for depth in depths.values())
    return round(messages * items_per_message())


def ingest_sizer(settings: Settings, items_per_message: Callable[[], float]) -> AdaptiveBatchSize:
    bulk = INGEST_QUEUES[1:]  # critical ones are written as they come, unbatched
    return AdaptiveBatchSize(
        "ingest", settings.ingest_batch_min, settings.ingest_batch_size,
        settings.adaptive_high_water, lambda: broker_depth(bulk, items_per_message),
        settings.adaptive_refresh,
    )


_delivery_sizers: dict[str, AdaptiveBatchSize] = {}


def delivery_sizer(settings: Settings) -> Callable[[str, int], int]:
    """:func:`delivery_batch_size` with ``settings``, as the pipeline's outbox takes it
    (``notifier.pipeline.outbox.BatchSize``)."""
    return lambda queue, ready: delivery_batch_size(queue, settings, ready)


def delivery_batch_size(queue: str, settings: Settings, ready: int) -> int:
    """Deliveries per task for ``ready`` new deliveries bound for ``queue``: what waits in
    the queue already counts (messages there carry about a batch each)."""
    sizer = _delivery_sizers.get(queue)
    if sizer is None:
        sizer = _delivery_sizers[queue] = _delivery_sizer(queue, settings)
    return sizer.current(extra_waiting=ready)


def _delivery_sizer(queue: str, settings: Settings) -> AdaptiveBatchSize:
    # A message in a delivery queue carries about one batch: the size chosen last.
    sizer = AdaptiveBatchSize(
        "deliver", settings.delivery_batch_min, settings.delivery_batch_size,
        settings.adaptive_high_water,
        lambda: broker_depth([queue], lambda: sizer.last),
        settings.adaptive_refresh,
    )
    return sizer
