"""The producer API: hand notifications to the pipeline and get their ids at once.

Ids are made here (UUIDv7) so a caller never waits for the database. Notifications are
checked before they are sent, so a caller's mistake raises in the caller's process
instead of surfacing later as a dead letter. Each goes to the queue of its priority.

* :func:`notify` publishes one message per call: simplest, and right for critical work.
* :func:`notify_many` publishes many notifications per message.
* :class:`BufferedProducer` (or :func:`buffered`) collects single ``notify`` calls in
  process and publishes them many per message, by size or after a short delay.
* :class:`ConfirmingProducer` also keeps what it sent until Postgres holds it.

On RabbitMQ every publish waits for the broker's confirm (``NOTIFIER_BROKER_CONFIRM_PUBLISH``):
a call that returned an id has its message on the broker's disk (quorum queues), and a
message the broker refused raises instead. On Redis a publish returns once Redis has it
in memory.

This module needs the broker alone: it sends through a Celery app of its own (below),
not the workers' app, so a producer service imports neither the database layer nor the
channels and installs only the base dependencies. The calls that read or change stored
data live in :mod:`notifier.records`.
"""

from __future__ import annotations

import atexit
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from celery import Celery

from notifier.broker_topology import celery_settings, declare_queue, publish_options
from notifier.ids import uuid7, uuid7_texts
from notifier.schemas import (
    ENQUEUED_AT_HEADER,
    NotificationError,
    NotificationIn,
    parse_notification,
    plain_message,
    to_message,
    validate_notifications,
)
from notifier.settings import PRIORITIES, get_settings, queue_name

INGEST_TASK = "notifier.ingest"


def _producer_settings() -> dict[str, Any]:
    """The client's Celery settings: the workers' values (``celeryconfig``) of all that
    shapes a published message. The broker and how its queues are declared
    (``notifier.broker_topology``: on RabbitMQ quorum queues and publisher confirms),
    JSON, message priority 0, no task-sent event; ``tests/test_client.py`` checks that
    both apps agree and send the same message.
    """
    settings = get_settings()
    return {
        **celery_settings(settings),
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_queues": [declare_queue(name, settings) for name in map(queue_name, PRIORITIES)],
        "task_default_queue": queue_name("normal"),
        "task_default_priority": 0,
        "task_create_missing_queues": True,
        "task_send_sent_event": False,
        "timezone": "UTC",
        "enable_utc": True,
    }


def _producer_app() -> Celery:
    """A Celery app that only publishes: the workers' app would bring their whole
    configuration, tasks, database and channels into every producer."""
    producer = Celery("notifier", set_as_current=False)
    producer.conf.update(_producer_settings())  # behind Sentinel too: transport_options
    return producer


#: The producer's own Celery app (never the current app of the process, so a worker or
#: Flower that imports this module keeps its own).
app = _producer_app()


def build(
    recipient: str | Mapping[str, Any] | None = None,
    type: str | None = None,
    title: str | None = None,
    body: str = "",
    *,
    priority: str = "normal",
    channels: list[str] | None = None,
    data: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
    send_at: datetime | str | None = None,
    id: str | uuid.UUID | None = None,
    callback_url: str | None = None,
) -> NotificationIn:
    """A validated notification with its id; raises NotificationError naming bad fields.
    ``callback_url``: where each terminal status of its deliveries is POSTed
    (docs/callbacks.md)."""
    fields = {
        "recipient": recipient, "type": type, "title": title, "body": body,
        "priority": priority, "channels": channels, "data": dict(data or {}),
        "idempotency_key": idempotency_key, "send_at": send_at, "id": id,
        "callback_url": callback_url,
    }
    return _validated({key: value for key, value in fields.items() if value is not None})


def _validated(raw: Mapping[str, Any]) -> NotificationIn:
    notification = parse_notification(dict(raw))
    if notification.id is None:
        notification.id = uuid7()
    return notification


def _publish(messages: list[dict[str, Any]] | dict[str, Any], priority: str) -> None:
    if isinstance(messages, list) and len(messages) > 1:
        chunks = _within_message_bytes(messages, get_settings().max_message_bytes)
        if len(chunks) > 1:
            for chunk in chunks:
                _send(chunk, priority)
            return
    _send(messages, priority)


def _send(messages: list[dict[str, Any]] | dict[str, Any], priority: str) -> None:
    """One Celery message of ``messages``, already within the size bound."""
    count = len(messages) if isinstance(messages, list) else 1
    app.send_task(
        INGEST_TASK, args=[messages], queue=queue_name(priority),
        headers={ENQUEUED_AT_HEADER: time.time()},
        # What Flower and logs show of the arguments: a count, never the contents
        # (addresses, personal data), and no repr of 500 items on every publish.
        argsrepr=f"[<{count} notification{'s' if count != 1 else ''}>]",
        # On RabbitMQ: wait this long for the broker's confirm (the message is on its
        # disk when this returns), raising if it refuses or does not answer.
        **publish_options(get_settings()),
    )


def _within_message_bytes(
    items: list[dict[str, Any]], limit: int
) -> list[list[dict[str, Any]]]:
    """``items`` in consecutive chunks whose JSON stays under ``limit`` bytes (ingest
    dead-letters a bigger message whole), by an upper bound of each item's size that
    costs no encoding of its strings: a non-ASCII character counts 6 bytes (an escape)."""
    chunks: list[list[dict[str, Any]]] = [[]]
    budget = limit * 9 // 10 - 1024  # Celery's envelope of the arguments
    used = 0
    for item in items:
        size = _json_size_bound(item)
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(item)
        used += size
    return chunks


def _json_size_bound(value: Any) -> int:
    """An upper bound of ``value``'s JSON size: a string 2 + 2 bytes a character (6 if
    any is not ASCII), 24 for any other scalar, containers their items' sum plus the
    separators. The strings of a dict or list (most of a notification) are sized in
    the loop, without a call each: this walks every item of every published message."""
    if isinstance(value, str):
        return 2 + (len(value) * 2 if value.isascii() else len(value) * 6)
    if isinstance(value, dict):
        size = 2
        for key, item in value.items():
            size += 2 + (2 + 2 * len(key) if type(key) is str and key.isascii()
                         else _json_size_bound(key))
            size += (2 + 2 * len(item) if type(item) is str and item.isascii()
                     else _json_size_bound(item))
        return size
    if isinstance(value, list):
        size = 2
        for item in value:
            size += 1 + (2 + 2 * len(item) if type(item) is str and item.isascii()
                         else _json_size_bound(item))
        return size
    return 24


def notify(
    recipient: str | Mapping[str, Any], type: str, title: str, body: str = "",
    **fields: Any,
) -> str:
    """Send one notification in its own message; returns its id."""
    notification = build(recipient, type, title, body, **fields)
    publish_one(notification)
    return str(notification.id)


def publish_one(notification: NotificationIn) -> None:
    """Publish a notification made by :func:`build` in its own message."""
    _publish(to_message(notification), notification.priority)


def notify_many(
    notifications: Iterable[Mapping[str, Any]], chunk_size: int | None = None
) -> list[str]:
    """Send many notifications, many per message, grouped by priority; returns ids in order.

    Every notification is validated first: if one is bad, nothing is sent and the
    NotificationError says which item and field.
    """
    raws = list(notifications)
    messages = validated_messages(raws)
    if messages is None:  # one is refused (or not a dict): each alone names its problem
        messages = [to_message(_validated_item(index, raw)) for index, raw in enumerate(raws)]
    return publish_messages(messages, chunk_size)


def validated(raw: Any) -> NotificationIn:
    """One notification as received (any JSON value) checked as :func:`notify` checks
    it, with its id made if it has none; raises NotificationError naming each bad field
    (the HTTP API's check)."""
    if not isinstance(raw, Mapping):
        parse_notification(raw)  # raises: "notification: expected a JSON object, ..."
    return _validated(raw)


def validated_messages(raws: list[Any]) -> list[dict[str, Any]] | None:
    """The messages (:func:`to_message`'s form, ids made) of notifications that all pass
    :func:`validated`'s checks, checked in one call over the list and built from plain
    data (``schemas.validate_notifications``, ``schemas.plain_message``): no model per
    item. None if any is refused or is not a dict: then each is checked alone, for its
    own reasons."""
    items = validate_notifications(raws)
    if items is None:
        return None
    made = iter(uuid7_texts(sum(item["id"] is None for item in items)))
    return [plain_message(item, next(made) if item["id"] is None else str(item["id"]))
            for item in items]


def publish_many(
    validated: list[NotificationIn], chunk_size: int | None = None
) -> list[str]:
    """Publish notifications checked by :func:`validated` as :func:`notify_many` does:
    many per message, grouped by priority, critical ones first; returns ids in order."""
    return publish_messages([to_message(notification) for notification in validated],
                            chunk_size)


def publish_messages(
    messages: list[dict[str, Any]], chunk_size: int | None = None
) -> list[str]:
    """Publish checked notifications' messages (:func:`validated_messages`,
    :func:`to_message`) as :func:`notify_many` does; returns their ids in order."""
    chunk_size = chunk_size or get_settings().client_chunk_size
    by_priority: dict[str, list[dict[str, Any]]] = {p: [] for p in PRIORITIES}
    for message in messages:
        by_priority[message.get("priority", "normal")].append(message)
    for priority in PRIORITIES:  # critical ones leave first
        items = by_priority[priority]
        for start in range(0, len(items), chunk_size):
            _publish(items[start:start + chunk_size], priority)
    return [message["id"] for message in messages]


def message_chunks(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``messages`` (of one priority) as :func:`publish_many` splits them into Celery
    messages: at most ``client_chunk_size`` and ``max_message_bytes`` each."""
    settings = get_settings()
    size = settings.client_chunk_size
    return [chunk for start in range(0, len(messages), size)
            for chunk in _within_message_bytes(messages[start:start + size],
                                               settings.max_message_bytes)]


def publish_chunk(messages: list[dict[str, Any]], priority: str) -> None:
    """One Celery message of notifications made by :func:`message_chunks` (on RabbitMQ,
    confirmed when this returns): it is published whole or raises (not sized again:
    :func:`message_chunks` kept it within the bound)."""
    _send(messages, priority)


def _validated_item(index: int, raw: Mapping[str, Any]) -> NotificationIn:
    try:
        return _validated(raw)
    except NotificationError as exc:
        raise NotificationError([f"[{index}] {problem}" for problem in exc.problems]) from None


class BufferedProducer:
    """Collects ``notify`` calls and publishes them many per message.

    A buffer is published when it holds ``max_items`` notifications, when its oldest has
    waited ``max_delay`` seconds, on :meth:`flush`, at interpreter exit and on SIGTERM.
    Critical notifications are never held: they are published at once.
    """

    def __init__(self, max_items: int | None = None, max_delay: float | None = None):
        settings = get_settings()
        self.max_items = max_items or settings.client_chunk_size
        self.max_delay = max_delay or settings.buffer_max_delay
        self._buffers: dict[str, list[dict[str, Any]]] = {p: [] for p in PRIORITIES}
        self._oldest: dict[str, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._timer = threading.Thread(target=self._flush_on_time, daemon=True,
                                       name="notifier-buffer")
        self._timer.start()
        # Connect now: the exit flush cannot import what a first publish imports lazily.
        with app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=1)
        _at_interpreter_exit(self.close)

    def notify(
        self, recipient: str | Mapping[str, Any], type: str, title: str,
        body: str = "", **fields: Any,
    ) -> str:
        """Validate and buffer one notification; returns its id at once."""
        notification = build(recipient, type, title, body, **fields)
        if notification.priority == "critical":
            publish_one(notification)
            return str(notification.id)
        full: list[dict[str, Any]] | None = None
        with self._lock:
            if self._closed:
                raise RuntimeError("this BufferedProducer is closed")
            buffer = self._buffers[notification.priority]
            buffer.append(to_message(notification))
            if len(buffer) == 1:
                self._oldest[notification.priority] = time.monotonic()
                self._wake.notify()
            if len(buffer) >= self.max_items:
                full = self._take(notification.priority)
        if full:
            _publish(full, notification.priority)
        return str(notification.id)

    def flush(self) -> None:
        """Publish everything buffered now."""
        with self._lock:
            taken = {p: self._take(p) for p in PRIORITIES}
        for priority in PRIORITIES:
            if taken[priority]:
                _publish(taken[priority], priority)

    def close(self) -> None:
        """Flush and stop the timer; later ``notify`` calls raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
        self.flush()

    def _take(self, priority: str) -> list[dict[str, Any]]:
        items, self._buffers[priority] = self._buffers[priority], []
        self._oldest.pop(priority, None)
        return items

    def _flush_on_time(self) -> None:
        while True:
            due: dict[str, list[dict[str, Any]]] = {}
            with self._lock:
                if self._closed:
                    return
                if not self._oldest:
                    self._wake.wait()
                    continue
                now = time.monotonic()
                wait = min(self._oldest.values()) + self.max_delay - now
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                for priority, oldest in list(self._oldest.items()):
                    if oldest + self.max_delay <= now:
                        due[priority] = self._take(priority)
            for priority, items in due.items():
                _publish(items, priority)

    def __enter__(self) -> BufferedProducer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _at_interpreter_exit(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the main thread ends, while publishing still works.

    ``threading``'s exit hooks run before plain ``atexit`` ones, while the timer thread
    and the broker connection are still alive.
    """
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(callback)
            return
    except RuntimeError:  # already shutting down
        pass
    atexit.register(callback)


_buffered: BufferedProducer | None = None
_buffered_lock = threading.Lock()


def buffered() -> BufferedProducer:
    """The process-wide buffered producer, flushed at exit and on SIGTERM."""
    global _buffered
    with _buffered_lock:
        if _buffered is None or _buffered._closed:
            _buffered = BufferedProducer()
            _flush_on_sigterm(_buffered)
        return _buffered


def _flush_on_sigterm(producer: BufferedProducer) -> None:
    """Flush before the process's own SIGTERM behaviour runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        producer.close()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


class ConfirmingProducer:
    """Keeps each notification it sent until Postgres holds it, and sends again (same
    id, so it is stored once) what the broker lost.

    Redis keeps nothing on disk: a notification still queued when Redis restarts is
    gone, although :func:`notify` returned its id. Services that must not lose one call
    :meth:`confirm` now and then (or :meth:`wait` before exiting). A notification not
    stored ``resend_after`` seconds after it was sent is published again, at most
    ``max_sends`` times in all; one Postgres never takes (refused as a duplicate
    idempotency key, or dead-lettered) is given up after that and logged.

    Sending needs the broker only, like :func:`notify`; :meth:`confirm` reads Postgres
    (through :func:`notifier.records.stored_ids`, imported on the first confirm), so a
    service using this class needs the database and the ``server`` extra as well.
    """

    def __init__(self, resend_after: float = 30.0, max_sends: int = 5) -> None:
        self.resend_after = resend_after
        self.max_sends = max_sends
        self.resent = 0
        self.given_up: list[str] = []
        self._waiting: dict[uuid.UUID, _Unconfirmed] = {}
        self._lock = threading.Lock()

    def notify(
        self, recipient: str | Mapping[str, Any], type: str, title: str, body: str = "",
        **fields: Any,
    ) -> str:
        notification = build(recipient, type, title, body, **fields)
        message = to_message(notification)
        with self._lock:
            self._waiting[notification.id] = _Unconfirmed(  # type: ignore[index]
                message, notification.priority, time.monotonic()
            )
        _publish(message, notification.priority)
        return str(notification.id)

    @property
    def unconfirmed(self) -> int:
        return len(self._waiting)

    def confirm(self) -> int:
        """Forget what is stored, send again what is overdue; returns how many wait."""
        with self._lock:
            ids = list(self._waiting)
        if not ids:
            return 0
        from notifier.records import stored_ids  # the database, only when confirming

        stored = stored_ids(ids)
        now = time.monotonic()
        again: list[_Unconfirmed] = []
        with self._lock:
            for note_id in stored:
                self._waiting.pop(note_id, None)
            for note_id, item in list(self._waiting.items()):
                if now - item.sent_at < self.resend_after:
                    continue
                if item.sends >= self.max_sends:
                    del self._waiting[note_id]
                    self.given_up.append(str(note_id))
                    continue
                item.sends += 1
                item.sent_at = now
                again.append(item)
            waiting = len(self._waiting)
        for item in again:
            _publish(item.message, item.priority)
        self.resent += len(again)
        return waiting

    def wait(self, timeout: float, interval: float = 1.0) -> bool:
        """Confirm until everything is stored (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while self.confirm():
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
        return True


class _Unconfirmed:
    __slots__ = ("message", "priority", "sends", "sent_at")

    def __init__(self, message: dict[str, Any], priority: str, sent_at: float) -> None:
        self.message, self.priority, self.sent_at, self.sends = message, priority, sent_at, 1


#: The database-facing calls that used to live here, now in :mod:`notifier.records`.
_RECORDS = frozenset({"lookup", "inbox", "mark_read", "set_preferences", "get_preferences",
                      "cancel"})


def __getattr__(name: str) -> Any:
    """``notifier.client.lookup`` and the other database calls: the old spelling of
    :mod:`notifier.records`, imported on first use so that importing the producer never
    loads the database layer."""
    if name in _RECORDS:
        from notifier import records

        return getattr(records, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
