"""Beat's heartbeat, written where it happens: stamped into the message by beat when
it is published, recorded in Redis by beat and by the worker that runs it. ``notifier
health`` (``notifier.ops.health``) reads the record to tell whether beat still ticks and
whether a worker still takes its work.

Every time here is the state Redis's clock (``TIME``), read by beat, by the worker and
by the health check alike: they run on different hosts, whose clocks differ, and a
beat whose host is a minute slow must not look a minute dead (``docs/scaling.md``,
Clocks)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from notifier.storage.state import server_seconds

#: The Redis hash of beat's heartbeat (fields published_at, sent_at, ran_at, worker).
HEARTBEAT_KEY = "notifier.heartbeat"
#: The message header carrying the time (epoch seconds) the heartbeat was published.
SENT_AT_HEADER = "notifier_sent_at"
HEARTBEAT_TASK = "notifier.heartbeat"


@dataclass(frozen=True)
class Heartbeat:
    """Beat's last heartbeat as recorded in Redis (epoch seconds, None: never)."""

    #: When the publishing process (beat) sent the last one.
    published_at: float | None
    #: When the last heartbeat a worker ran was sent, per its message.
    sent_at: float | None
    #: When a worker last ran one, and which worker.
    ran_at: float | None
    worker: str | None

    @property
    def last_tick(self) -> float | None:
        ticks = [t for t in (self.published_at, self.sent_at) if t is not None]
        return max(ticks) if ticks else None


def stamp_heartbeat(headers: dict[str, Any] | None, now: float | None = None) -> None:
    """In the publishing process (beat): put the sending time (``now``: Redis's clock;
    the host's only when Redis cannot be asked) into the message."""
    if headers is not None:
        headers.setdefault(SENT_AT_HEADER, now if now is not None else time.time())


def record_heartbeat_published(client: Any, headers: Mapping[str, Any] | None) -> None:
    """In the publishing process (beat), once the heartbeat is sent."""
    sent = (headers or {}).get(SENT_AT_HEADER)
    if isinstance(sent, (int, float)):
        client.hset(HEARTBEAT_KEY, "published_at", repr(float(sent)))


def record_heartbeat_run(
    client: Any, sent_at: Any, worker: str | None, now: float | None = None
) -> None:
    """In the worker that runs a heartbeat: when it was sent, and when it ran (``now``,
    by default Redis's clock)."""
    ran_at = now if now is not None else server_seconds(client)
    fields = {"ran_at": repr(ran_at), "worker": worker or "?"}
    if isinstance(sent_at, (int, float)):
        fields["sent_at"] = repr(float(sent_at))
    client.hset(HEARTBEAT_KEY, mapping=fields)


def read_heartbeat(client: Any) -> Heartbeat:
    raw = {_text(k): _text(v) for k, v in client.hgetall(HEARTBEAT_KEY).items()}

    def number(name: str) -> float | None:
        try:
            return float(raw[name])
        except (KeyError, ValueError):
            return None

    return Heartbeat(number("published_at"), number("sent_at"), number("ran_at"),
                     raw.get("worker"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
