"""The run's broker as tests look into it, on Redis and on RabbitMQ alike: messages
waiting in a queue, messages held by workers, emptying the queues, losing everything
(what a broker restart without persistence does), producers from outside notifier.

Imports nothing of notifier at module level: ``tests/conftest.py`` imports this before
it sets the environment notifier's settings are read from.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from celery import Celery
from kombu import Connection

#: Every queue of ours, as ``notifier queues`` lists them, plus RabbitMQ's dead-letter
#: queue (filled in on first use: notifier's modules read the settings).
_QUEUES: list[str] = []


def our_queues() -> list[str]:
    if not _QUEUES:
        from notifier.broker_topology import DEAD_LETTER_QUEUE
        from notifier.worker.queues import ALL_QUEUES

        _QUEUES.extend([*ALL_QUEUES, DEAD_LETTER_QUEUE])
    return _QUEUES


@dataclass
class Envelope:
    """A message as a consumer gets it: Celery's headers, the body, the properties."""

    headers: dict[str, Any]
    body: bytes
    properties: dict[str, Any]

    def args(self) -> Any:
        """The task's positional arguments (Celery's protocol 2: args, kwargs, embed)."""
        return json.loads(self.body)[0]


class TestBroker:
    """What the tests need of a broker; :func:`connect` picks the implementation."""

    url: str
    is_rabbitmq: bool

    def waiting(self, queue: str) -> int:
        """Messages ready in ``queue`` (not those a worker holds)."""
        raise NotImplementedError

    def held(self) -> int:
        """Messages workers hold unacknowledged, over all queues."""
        raise NotImplementedError

    def drained(self, queues: list[str] | None = None) -> bool:
        """No message waits in ``queues`` (default: all of ours) and none is held."""
        return self.held() == 0 and all(self.waiting(q) == 0 for q in queues or our_queues())

    def peek(self, queue: str) -> list[Envelope]:
        """The messages waiting in ``queue``, oldest first, left where they are."""
        raise NotImplementedError

    def fill(self, queue: str, count: int) -> None:
        """Put ``count`` placeholder messages in ``queue`` (a backlog no worker reads)."""
        raise NotImplementedError

    def empty_queues(self) -> None:
        """Drop the messages waiting in our queues (between tests)."""
        raise NotImplementedError

    def lose_everything(self) -> None:
        """What a broker restart that keeps nothing on disk does to our queues."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class RedisBroker(TestBroker):
    is_rabbitmq = False

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url)

    def waiting(self, queue: str) -> int:
        return int(self.client.llen(queue))

    def held(self) -> int:
        return int(self.client.hlen("unacked"))

    def peek(self, queue: str) -> list[Envelope]:
        envelopes = []
        for raw in reversed(self.client.lrange(queue, 0, -1)):  # LPUSHed, BRPOPed
            message = json.loads(raw)
            envelopes.append(Envelope(message["headers"], base64.b64decode(message["body"]),
                                      message["properties"]))
        return envelopes

    def fill(self, queue: str, count: int) -> None:
        self.client.lpush(queue, *[b"{}"] * count)

    def empty_queues(self) -> None:
        for key in self.client.scan_iter("notifier.*"):
            self.client.delete(key)

    def lose_everything(self) -> None:
        self.client.flushdb()

    def close(self) -> None:
        self.client.close()


class RabbitBroker(TestBroker):
    """The run's virtual host. Ready counts come from a passive declare; held ones from
    ``rabbitmqctl`` (AMQP does not tell), which is slow: held() is for final checks."""

    is_rabbitmq = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.vhost = unquote(urlsplit(url).path.lstrip("/")) or "/"
        self.connection = Connection(url)

    def _channel(self) -> Any:
        return self.connection.default_channel

    def waiting(self, queue: str) -> int:
        try:
            return int(self._channel().queue_declare(queue=queue, passive=True).message_count)
        except self.connection.channel_errors:  # not declared yet: nothing waits
            self.connection.close()
            self.connection = Connection(self.url)
            return 0

    def messages(self) -> dict[str, tuple[int, int]]:
        """Queue -> (ready, unacknowledged), from rabbitmqctl."""
        listing = subprocess.run(
            ["rabbitmqctl", "-q", "list_queues", "-p", self.vhost, "--no-table-headers",
             "name", "messages_ready", "messages_unacknowledged"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        counts = {}
        for line in listing.splitlines():
            name, ready, unacked = line.split()
            counts[name] = (int(ready), int(unacked))
        return counts

    def held(self) -> int:
        ours = set(our_queues())
        return sum(unacked for name, (_, unacked) in self.messages().items() if name in ours)

    def peek(self, queue: str) -> list[Envelope]:
        """Got without acknowledging, on a channel closed after: RabbitMQ puts them back
        in their order (each delivery counts towards the queue's delivery limit), and
        this waits until they are ready again."""
        envelopes = []
        with Connection(self.url) as connection:
            channel = connection.channel()
            try:
                while (message := channel.basic_get(queue, no_ack=False)) is not None:
                    body = message.body
                    properties = dict(message.properties)
                    properties.pop("application_headers", None)  # the headers, again
                    envelopes.append(Envelope(
                        dict(message.headers), body.encode() if isinstance(body, str) else body,
                        properties))
            except connection.channel_errors:  # never declared: nothing waits
                return []
            channel.close()
        deadline = time.monotonic() + 10
        while self.waiting(queue) < len(envelopes) and time.monotonic() < deadline:
            time.sleep(0.01)
        return envelopes

    def fill(self, queue: str, count: int) -> None:
        from notifier.broker_topology import declare_queue
        from notifier.settings import get_settings

        declared = declare_queue(queue, get_settings())
        with Connection(self.url) as connection:
            producer = connection.Producer()
            for _ in range(count):
                producer.publish({}, exchange=declared.exchange, routing_key=queue,
                                 declare=[declared])

    def empty_queues(self) -> None:
        for queue in our_queues():
            try:
                self._channel().queue_purge(queue)
            except self.connection.channel_errors:
                self.connection.close()
                self.connection = Connection(self.url)

    def lose_everything(self) -> None:
        self.empty_queues()

    def close(self) -> None:
        self.connection.close()


def connect(broker_url: str) -> TestBroker:
    if broker_url.startswith("amqp"):
        return RabbitBroker(broker_url)
    return RedisBroker(broker_url)


def foreign_producer(name: str, broker_url: str) -> Celery:
    """A Celery app of another service that sends ``notifier.ingest`` by name.

    On Redis a plain app (``Celery(name, broker=...)``) is enough. On RabbitMQ our queues
    are quorum queues with arguments, and a plain app's declaration of a classic queue
    of the same name would be refused: a foreign producer declares them as we do
    (``notifier.broker_topology``), which is what this app does there.
    """
    app = Celery(name, broker=broker_url)
    if broker_url.startswith("amqp"):
        from notifier.broker_topology import declare_queue
        from notifier.settings import PRIORITIES, get_settings, queue_name

        settings = get_settings().model_copy(update={"broker_url": broker_url})
        app.conf.task_queues = [declare_queue(queue_name(p), settings) for p in PRIORITIES]
    return app
