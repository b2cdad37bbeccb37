"""Batch sizes that follow the queue depth, read from the real broker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from notifier.pipeline.outbox import group_into_tasks
from notifier.settings import get_settings
from notifier.worker import batch_sizing
from notifier.worker.batch_sizing import AdaptiveBatchSize, delivery_sizer, size_for_depth
from tests.brokers import TestBroker


@pytest.mark.parametrize(("waiting", "expected"), [
    (0, 10), (500, 55), (1000, 100), (50_000, 100),
])
def test_size_grows_linearly_from_minimum_to_maximum(waiting, expected):
    assert size_for_depth(waiting, minimum=10, maximum=100, high_water=1000) == expected


def test_depth_is_read_at_most_once_per_refresh():
    reads = []

    def depth() -> int:
        reads.append(1)
        return 10_000

    sizer = AdaptiveBatchSize("ingest", 50, 500, 10, depth, refresh=60)
    assert [sizer.current() for _ in range(5)] == [500] * 5
    assert len(reads) == 1


def test_a_broker_that_cannot_answer_keeps_the_last_size():
    def depth() -> int:
        raise ConnectionError("broker away")

    sizer = AdaptiveBatchSize("deliver", 10, 100, 10, depth, refresh=0)
    assert sizer.current() == 100


@pytest.fixture
def console_queue(broker: TestBroker) -> Iterator[TestBroker]:
    """The console channel's delivery queue in the run's broker, emptied after."""
    batch_sizing._delivery_sizers.clear()
    yield broker
    broker.empty_queues()
    batch_sizing._delivery_sizers.clear()


def _rows(count: int) -> list[tuple[uuid.UUID, str, str]]:
    return [(uuid.uuid4(), "console", "normal") for _ in range(count)]


def test_deliveries_spread_over_small_tasks_when_the_queue_is_empty(console_queue):
    settings = get_settings()
    tasks = group_into_tasks(_rows(100), settings, batch_size=delivery_sizer(settings))
    # 100 ready of a high water of 10 x 100: 10 + 90 x 0.1 = 19 per task.
    assert [len(t.delivery_ids) for t in tasks] == [19] * 5 + [5]


def test_deliveries_go_in_full_tasks_behind_a_backlog(console_queue):
    console_queue.fill("notifier.deliver.console", 100)
    settings = get_settings()
    tasks = group_into_tasks(_rows(100), settings, batch_size=delivery_sizer(settings))
    assert [len(t.delivery_ids) for t in tasks] == [100]
