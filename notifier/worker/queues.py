"""The broker's queues: their names, derived from the priorities and the channel
registry, and how many messages wait in each.

The names are the public contract of producers and workers alike; the Celery config
declares these, ``notifier queues`` prints them for a worker's ``-Q`` (the Makefile's
workers use it), and docker-compose.yml is checked against it.

Depth is read over a connection of its own to ``NOTIFIER_BROKER_URL`` (the broker the
app uses), not through the Celery app: delivery's batch sizing asks for it, and must not
need the app that runs it.
"""

from __future__ import annotations

from collections.abc import Iterable

from kombu import Connection

from notifier.broker_topology import DEAD_LETTER_QUEUE, transport_options, uses_quorum_queues
from notifier.channels import CHANNEL_NAMES
from notifier.settings import PRIORITIES, delivery_queue, get_settings, queue_name

#: Ingest, one queue per priority, most urgent first: notifier.critical ... notifier.low.
INGEST_QUEUES: tuple[str, ...] = tuple(queue_name(priority) for priority in PRIORITIES)
#: Deliveries: critical notifications' path, shared by every channel, then a queue per
#: channel (by name), so a slow provider holds up only its own.
DELIVERY_QUEUES: tuple[str, ...] = (
    delivery_queue("", "critical"),
    *(delivery_queue(channel, "normal") for channel in sorted(CHANNEL_NAMES)),
)
#: The critical path alone: critical ingest and critical deliveries.
CRITICAL_QUEUES: tuple[str, ...] = (INGEST_QUEUES[0], DELIVERY_QUEUES[0])
#: Beat's housekeeping (the flush tick, the delivery sweep, the heartbeat) goes to the
#: critical delivery queue, which no bulk traffic holds up; a worker consuming it runs
#: the flush loop (``notifier.worker.flush_loop``).
BEAT_QUEUE: str = DELIVERY_QUEUES[0]
#: Every queue, in the order a worker without ``-Q`` consumes them: critical ingest,
#: critical deliveries, the bulk ingest queues, then each channel's delivery queue.
ALL_QUEUES: tuple[str, ...] = (*CRITICAL_QUEUES, *INGEST_QUEUES[1:], *DELIVERY_QUEUES[1:])

#: What ``notifier queues --<kind>`` prints.
QUEUES_BY_KIND: dict[str, tuple[str, ...]] = {
    "all": ALL_QUEUES, "ingest": INGEST_QUEUES, "deliver": DELIVERY_QUEUES,
    "critical": CRITICAL_QUEUES,
}

#: Seconds to connect to the broker (Celery's default ``broker_connection_timeout``).
_CONNECT_TIMEOUT = 4.0


def queue_depths(names: Iterable[str] | None = None) -> dict[str, int | None]:
    """Messages waiting in each of our queues, or in ``names`` (None where the broker
    cannot tell). On RabbitMQ's quorum queues ours include ``notifier.dead-lettered``,
    the messages past their delivery limit, so ``notifier status``, the health check
    and /metrics show them."""
    settings = get_settings()
    ours = (*ALL_QUEUES, DEAD_LETTER_QUEUE) if uses_quorum_queues(settings) else ALL_QUEUES
    depths: dict[str, int | None] = {}
    with Connection(settings.broker_url, connect_timeout=_CONNECT_TIMEOUT,
                    transport_options=transport_options(settings)) as connection:
        connection.ensure_connection(max_retries=1)
        channel = connection.default_channel
        for name in list(names or ()) or ours:
            if hasattr(channel, "_size"):  # kombu's virtual transports (Redis)
                depths[name] = channel._size(name)
                continue
            try:
                depths[name] = channel.queue_declare(queue=name, passive=True).message_count
            except Exception:  # an AMQP queue nobody declared yet
                depths[name] = None
                channel = connection.channel()
    return depths
