"""Sends published together: many concurrent requests, one message per priority.

Publishing a message costs about the same CPU whether it carries one notification or a
hundred (kombu's envelope, the broker round trip, its confirm), and the worker too takes
a message of 500 for less per notification than five of 100. So a request does not
publish its notifications itself: it hands them, per priority, to their *lane*, a
thread that publishes whatever is waiting as one Celery message per priority (of up to
``client_chunk_size`` notifications and ``max_message_bytes``, as
:func:`notifier.client.publish_many` chunks; a request's items are not split between
two messages unless they alone are more than one may hold), waits for the broker's
confirm (on RabbitMQ), and then answers each request it carried. When nothing is in
flight notifications leave at once (no timer, no added delay); what arrives while a
publish is in flight goes in the next one. Critical notifications have a lane of their
own, so they never wait behind a publish of others. A publish that fails fails exactly
the requests whose notifications it carried (their handlers answer 503); the others are
untouched.
"""

from __future__ import annotations

import asyncio
import os
import threading
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from notifier import client
from notifier.schemas import NotificationIn, to_message
from notifier.settings import get_settings


@dataclass(frozen=True)
class _Pending:
    """One request's notifications of one priority, answered when all are published."""

    messages: list[dict[str, Any]]
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
    answered once the messages carrying it are published, or with their error."""
    by_priority: dict[str, list[_Pending]] = {}
    for pending in taken:
        by_priority.setdefault(pending.priority, []).append(pending)
    chunk_size = get_settings().client_chunk_size
    for priority, group in by_priority.items():
        for bundle in _bundles(group, chunk_size):
            try:
                _publish_bundle(bundle, priority)
            except Exception as exc:  # not a publish's error: the lane must live on
                with suppress(Exception):  # e.g. a closed loop: nobody waits
                    _answer([(pending.answer, exc) for pending in bundle])


def _bundles(group: list[_Pending], chunk_size: int) -> list[list[_Pending]]:
    """``group`` in consecutive runs of at most ``chunk_size`` notifications (a request
    holding more is a run of its own): each run is one message unless it is over the
    size bound."""
    bundles: list[list[_Pending]] = []
    count = chunk_size
    for pending in group:
        if count + len(pending.messages) > chunk_size:
            bundles.append([])
            count = 0
        bundles[-1].append(pending)
        count += len(pending.messages)
    return bundles


def _publish_bundle(bundle: list[_Pending], priority: str) -> None:
    """Publish a run's notifications (:func:`client.message_chunks`: one message, but for
    one over the bounds); a request carried by a message that failed gets its error."""
    messages = [message for pending in bundle for message in pending.messages]
    owners = [index for index, pending in enumerate(bundle) for _ in pending.messages]
    errors: dict[int, BaseException] = {}
    start = 0
    for chunk in client.message_chunks(messages):
        carried = set(owners[start:start + len(chunk)])
        start += len(chunk)
        if carried <= errors.keys():
            continue  # each of them failed already: nothing more of theirs goes out
        try:
            client.publish_chunk(chunk, priority)
        except Exception as exc:  # each request answers its own error
            for index in carried:
                errors.setdefault(index, exc)
    _answer([(pending.answer, errors.get(index)) for index, pending in enumerate(bundle)])


def _answer(answers: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None],
                                                        BaseException | None]]] = {}
    for answer in answers:
        by_loop.setdefault(answer[0].get_loop(), []).append(answer)
    for loop, settled in by_loop.items():
        loop.call_soon_threadsafe(_settle, settled)


def _settle(answers: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    for answer, error in answers:
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
    lane.hand(_Pending([to_message(notification)], notification.priority, answer))
    await answer


async def publish_messages(messages: list[dict[str, Any]]) -> None:
    """Publish a request's checked notifications (``client.validated_messages``) with
    the others waiting, each priority in its lane; returns once the broker has all of
    them, or raises the first error of a publish that carried some (after every
    priority's publish has answered)."""
    loop = asyncio.get_running_loop()
    by_priority: dict[str, list[dict[str, Any]]] = {}
    for message in messages:
        by_priority.setdefault(message.get("priority", "normal"), []).append(message)
    answers: list[asyncio.Future[None]] = []
    for priority, group in by_priority.items():
        answer: asyncio.Future[None] = loop.create_future()
        (critical if priority == "critical" else others).hand(
            _Pending(group, priority, answer))
        answers.append(answer)
    if len(answers) == 1:
        await answers[0]
        return
    for outcome in await asyncio.gather(*answers, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome
