"""How our queues are declared on each broker, for the producer client and the workers
alike (one source: both must declare a queue identically, or RabbitMQ refuses the
second declaration).

* **Redis** (and ``NOTIFIER_BROKER_QUEUE_TYPE=classic`` on RabbitMQ): each queue as a
  plain Celery app declares ``queue="notifier.<priority>"``, a direct exchange and a
  routing key of the queue's name, so foreign producers and we agree.
* **RabbitMQ** (``amqp://``): quorum queues, replicated and written to disk before the
  broker confirms a publish, with ``x-delivery-limit`` (``NOTIFIER_BROKER_DELIVERY_LIMIT``)
  so a message that keeps coming back (its worker is killed by it, or it is returned
  again and again) cannot loop: past the limit RabbitMQ moves it to the quorum queue
  :data:`DEAD_LETTER_QUEUE`, which no worker consumes and which ``notifier status``, the
  health check's queue depths and /metrics show. Its messages keep their headers
  (``x-death`` names the queue they came from), so an operator moves them back (a
  shovel, ``rabbitmqadmin``) once the cause is fixed. Each queue's exchange is a topic
  exchange of the queue's name: Celery's native delayed delivery (countdowns on quorum
  queues, which cannot hold a message back themselves) routes a delayed message through
  its ``celery_delayed_*`` exchanges and finds the queue by a binding that direct
  exchanges cannot express.

Priorities are kept by queue order on both: a worker consumes its queues most urgent
first (Redis reads them in that order; on RabbitMQ each queue's consumer has its own
prefetch window, so bulk messages never fill the window critical ones need, and the
ingest batcher runs critical batches first).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from kombu import Exchange, Queue

from notifier.settings import Settings

#: Where RabbitMQ puts a message past its queue's delivery limit: an exchange and a
#: quorum queue of this name (the message keeps its headers, and ``x-death`` names the
#: queue it came from).
DEAD_LETTER_QUEUE = "notifier.dead-lettered"


def uses_quorum_queues(settings: Settings) -> bool:
    """RabbitMQ with quorum queues (the default there); never on Redis."""
    return not settings.is_redis_broker and settings.broker_queue_type == "quorum"


def declare_queue(name: str, settings: Settings) -> Queue:
    """The kombu queue ``name`` as every process of ours declares it."""
    if not uses_quorum_queues(settings):
        return Queue(name, Exchange(name, type="direct"), routing_key=name)
    return _QuorumQueue(
        name, Exchange(name, type="topic"), routing_key=name,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": settings.broker_delivery_limit,
            "x-dead-letter-exchange": DEAD_LETTER_QUEUE,
            "x-dead-letter-routing-key": DEAD_LETTER_QUEUE,
        },
    )


def dead_letter_queue() -> Queue:
    """The queue of messages past their delivery limit: quorum, no limit of its own."""
    return Queue(DEAD_LETTER_QUEUE, Exchange(DEAD_LETTER_QUEUE, type="fanout"),
                 routing_key=DEAD_LETTER_QUEUE, queue_arguments={"x-queue-type": "quorum"})


class _QuorumQueue(Queue):
    """A quorum queue that declares its dead-letter queue first: RabbitMQ silently
    drops a message dead-lettered to an exchange that does not exist, and this is the
    one declaration every publisher and consumer of the queue goes through."""

    def declare(self, nowait: bool = False, channel: Any = None) -> Any:
        channel = channel or self.channel
        dead_letter_queue().bind(channel).declare()
        return super().declare(nowait=nowait, channel=channel)


def transport_options(settings: Settings) -> dict[str, Any]:
    """kombu transport options for ``settings.broker_url``; the Redis ones as before."""
    if settings.is_redis_broker:
        return {
            "visibility_timeout": settings.visibility_timeout,
            "queue_order_strategy": "priority",
            "unacked_restore_interval": settings.unacked_restore_interval,
            "unacked_restore_throttle": 1,
            # The lock around that scan; kombu's default (300 s) means a worker killed
            # while holding it stops every other worker from restoring messages for
            # five minutes.
            "unacked_mutex_expire": 10,
            # Our transport (notifier/broker_redis.py): how often an idle worker looks.
            "idle_poll_interval": settings.broker_idle_poll_interval,
            # Behind Sentinel: the master's name (and the Sentinels' password).
            **settings.broker_sentinel_options,
        }
    return {"confirm_publish": settings.broker_confirm_publish}


def publish_options(settings: Settings) -> dict[str, Any]:
    """Per-publish options: how long a publish waits for RabbitMQ's confirm."""
    if settings.is_redis_broker or not settings.broker_confirm_publish:
        return {}
    return {"confirm_timeout": settings.broker_confirm_timeout}


def countdown(seconds: float | None, settings: Settings) -> float | None:
    """A countdown as the broker can honour it. Native delayed delivery counts whole
    seconds and refuses less than one (Celery would raise for 0.4 s): round up there."""
    if not seconds or seconds <= 0:
        return None
    if uses_quorum_queues(settings):
        return float(math.ceil(seconds))
    return seconds


#: Our kombu transports for Redis URLs (``notifier/broker_redis.py``): a worker takes a
#: message off a queue and records it as unacknowledged in one atomic step. On Redis they
#: keep kombu's format, so stock producers and consumers share the queues with them.
REDIS_TRANSPORT = "notifier.broker_redis:Transport"
SENTINEL_TRANSPORT = "notifier.broker_redis:SentinelTransport"


def broker_transport(settings: Settings) -> str | None:
    """The kombu transport for ``settings.broker_url``; ``None``: the URL's own."""
    if settings.is_sentinel_broker:
        return SENTINEL_TRANSPORT
    if settings.broker_url.startswith("redis:"):
        # Not (yet) ``rediss://``: kombu turns TLS on by the transport's name "rediss";
        # nor ``redis+socket://``, which kombu reads as "redis" whatever it is told.
        return REDIS_TRANSPORT
    return None


def keep_sentinel_transport(alternates: list[str]) -> Iterator[str]:
    """Failover strategy for ``sentinel://a;sentinel://b``: kombu "switches" to the next
    URL after a failed connect, and a switch re-reads the transport from that URL's
    scheme (stock ``sentinel``), which would drop :data:`SENTINEL_TRANSPORT` for the rest
    of the process. Switching is pointless there (the Sentinel channel asks every
    Sentinel of the URL whichever is current), so the strategy names the first
    Sentinel's host again: a hostname without a scheme keeps the transport and the rest."""
    return itertools.repeat(urlsplit(alternates[0]).hostname or "localhost")


def celery_settings(settings: Settings) -> dict[str, Any]:
    """What the worker's and the producer's Celery apps both set for the broker."""
    quorum = uses_quorum_queues(settings)
    return {
        "broker_url": settings.broker_url,
        "broker_transport": broker_transport(settings),
        "broker_failover_strategy": (keep_sentinel_transport if settings.is_sentinel_broker
                                     else None),
        "broker_transport_options": transport_options(settings),
        # A queue named by a publisher but not declared is made like ours.
        "task_create_missing_queue_type": "quorum" if quorum else "classic",
        "task_create_missing_queue_exchange_type": "topic" if quorum else None,
        # Countdowns on quorum queues: kombu's delay exchanges (quorum too), declared
        # by every worker at start; publishers route delayed messages through them.
        "broker_native_delayed_delivery_queue_type": "quorum",
    }
