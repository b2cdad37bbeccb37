"""Single sends published together: many concurrent requests, one message per priority.

Publishing a message costs about the same CPU whether it carries one notification or a
hundred (kombu's envelope, the broker round trip, its confirm), so a request of one
notification does not publish it itself: it hands the notification to its *lane*, a
thread that publishes whatever is waiting as one Celery message per priority (chunked
as :func:`notifier.client.publish_many` chunks), waits for the broker's confirm (on
RabbitMQ), and then answers each request it carried. When nothing is in flight a
notification leaves at once (no timer, no added delay); what arrives while a publish is
in flight goes in the next one. Critical notifications have a lane of their own, so
they never wait behind a publish of others. A publish that fails fails exactly the
requests whose notifications it carried (their handlers answer 503); the others are
untouched.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from typing import Any

from notifier import client
from notifier.schemas import NotificationIn, to_message


@dataclass(frozen=True)
class _Pending:
    message: dict[str, Any]
    priority: str
    answer: asyncio.Future[None]


class Lane:
    """A thread publishing what requests hand it, all that waits at once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ready = threading.Condition()
        self._waiting: list[_Pending] = []
        self._thread: threading.Thread | None = None
        self._pid = 0  # a forked child has the lane but not its thread: it starts its own

    def hand(self, pending: _Pending) -> None:
        with self._ready:
            self._waiting.append(pending)
            if self._thread is None or self._pid != os.getpid():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"notifier-api-publish-{self.name}")
                self._thread.start()
                self._pid = os.getpid()
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._waiting:
                    self._ready.wait()
                taken, self._waiting = self._waiting, []
            publish_batch(taken)


def publish_batch(taken: list[_Pending]) -> None:
    """One message per priority (per chunk), in the order handed; each request is
    answered once the message carrying it is published, or with its error."""
    by_priority: dict[str, list[_Pending]] = {}
    for pending in taken:
        by_priority.setdefault(pending.priority, []).append(pending)
    for priority, group in by_priority.items():
        start = 0
        for chunk in client.message_chunks([pending.message for pending in group]):
            carried = group[start:start + len(chunk)]
            start += len(chunk)
            try:
                client.publish_chunk(chunk, priority)
            except Exception as exc:  # each request answers its own error
                _answer(carried, exc)
            else:
                _answer(carried, None)


def _answer(carried: list[_Pending], error: BaseException | None) -> None:
    loop = carried[0].answer.get_loop()
    loop.call_soon_threadsafe(_settle, [pending.answer for pending in carried], error)


def _settle(answers: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for answer in answers:
        if answer.done():  # the client went away
            continue
        if error is None:
            answer.set_result(None)
        else:
            answer.set_exception(error)


critical = Lane("critical")
others = Lane("others")


async def publish(notification: NotificationIn) -> None:
    """Publish one notification with the others waiting; returns once the broker has it
    (raises what its publish raised)."""
    answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    lane = critical if notification.priority == "critical" else others
    lane.hand(_Pending(to_message(notification), notification.priority, answer))
    await answer
