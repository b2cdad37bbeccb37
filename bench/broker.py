"""The benchmark's broker, Redis or RabbitMQ: emptying it between scenarios and reading
where a backlog is.

Redis tells both how many messages wait in a queue (its list) and how many workers hold
unacknowledged (kombu's ``unacked`` hash). Over AMQP RabbitMQ tells only the first (a
passive declare); the second is not readable without its management API, so it is
reported as unknown there rather than guessed.
"""

from __future__ import annotations

import redis
from kombu import Connection


def is_amqp(broker_url: str) -> bool:
    return broker_url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp")


def empty(broker_url: str, queues: list[str]) -> None:
    """No message of an earlier scenario survives: Redis's db is flushed (queues, unacked
    messages, bindings); on RabbitMQ ``queues`` are purged (a stopped worker's
    unacknowledged messages are back in them by then)."""
    if not is_amqp(broker_url):
        client = redis.Redis.from_url(broker_url)
        try:
            client.flushdb()
        finally:
            client.close()
        return
    with Connection(broker_url) as connection:
        for queue in queues:
            channel = connection.channel()
            try:
                channel.queue_purge(queue)
            except connection.channel_errors:  # not declared yet
                pass
            finally:
                channel.close()


class BacklogReader:
    """Messages waiting in a queue and held by workers, on either broker."""

    def __init__(self, broker_url: str) -> None:
        self.amqp = is_amqp(broker_url)
        self._redis = None if self.amqp else redis.Redis.from_url(broker_url)
        self._connection = Connection(broker_url) if self.amqp else None

    def waiting(self, queue: str) -> int:
        if self._redis is not None:
            return int(self._redis.llen(queue))
        assert self._connection is not None
        ok = self._connection.default_channel.queue_declare(queue=queue, passive=True)
        return int(ok.message_count)

    def held(self) -> int | None:
        """Held unacknowledged by workers; None on RabbitMQ (AMQP does not say)."""
        return None if self._redis is None else int(self._redis.hlen("unacked"))

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._connection is not None:
            self._connection.close()
