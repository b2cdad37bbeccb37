"""The producer: a steady stream of notifications through notifier's own client.

Each notification is planned up front (recipient, type, priority, channels, and what
should become of it), has its id and an idempotency key, and is handed over with
``client.build`` + ``client.publish_one`` (what ``client.notify`` does). It counts as
**accepted** only once the publish returned: that is when a caller of ``notify()`` holds
an id. A publish that raises (Redis is down) is tried again with the same id and key
until it goes through, as a careful caller would.

Two producers:

* :class:`Producer` hands each notification over once (the client's contract today);
* :class:`ResendingProducer` also keeps every accepted notification until
  ``records.lookup(idempotency_key)`` finds it stored, and publishes it again (same id,
  same key, so ingest stores it once) when it is not stored after ``resend_after``
  seconds: the producer side of "nothing is lost" when the broker keeps nothing.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

#: What should become of a notification, by the plan.
DELIVER, SUPPRESS, DEAD = "deliver", "suppress", "dead"


@dataclass(frozen=True)
class Planned:
    index: int
    id: str
    key: str
    recipient: str
    type: str
    priority: str
    channels: tuple[str, ...]
    expect: str

    def fields(self) -> dict[str, Any]:
        return {
            "recipient": self.recipient, "type": self.type,
            "title": f"chaos {self.type} #{self.index}", "body": f"notification {self.index}",
            "priority": self.priority, "channels": list(self.channels),
            "data": {"index": self.index}, "idempotency_key": self.key, "id": self.id,
        }


@dataclass(frozen=True)
class Recipients:
    """The recipients of a run, created (with their preferences) before traffic starts."""

    normal: tuple[str, ...]
    #: Their e-mail address is refused by the SMTP server (550): e-mail dead-lettered.
    refused: tuple[str, ...]
    #: No e-mail address at all: an e-mail delivery is dead-lettered at once.
    no_email: tuple[str, ...]
    #: Opted out of ``chaos_promo`` on every channel: suppressed at ingest.
    opted_out: tuple[str, ...]

    @classmethod
    def for_scale(cls, run: str, scale: int) -> Recipients:
        count = max(10, scale // 25)
        return cls(
            normal=tuple(f"chaos-{run}-u{i}" for i in range(count)),
            refused=tuple(f"chaos-{run}-refused{i}" for i in range(3)),
            no_email=tuple(f"chaos-{run}-noemail{i}" for i in range(3)),
            opted_out=tuple(f"chaos-{run}-optout{i}" for i in range(3)),
        )

    @staticmethod
    def email_of(recipient: str) -> str:
        return f"{recipient}@example.com"

    def refused_addresses(self) -> list[str]:
        return [self.email_of(r) for r in self.refused]

    def create(self) -> None:
        from notifier import records

        for recipient in (*self.normal, *self.refused):
            records.set_preferences(recipient, email=self.email_of(recipient))
        for recipient in self.no_email:
            records.set_preferences(recipient)
        for recipient in self.opted_out:
            records.set_preferences(recipient, email=self.email_of(recipient),
                                    opt_out={"chaos_promo": ["*"]})


def plan(run: str, count: int, recipients: Recipients, seed: int) -> list[Planned]:
    """``count`` notifications in a fixed mix (the same for the same seed):

    ====  ===============================================  ===========================
    10 %  critical ``chaos_alert``, e-mail + in-app         delivered at once
    30 %  ``chaos_instant`` (not aggregated), e-mail+in-app  delivered at once
    40 %  ``chaos_digest`` (3 s / 5 items), e-mail + in-app  folded into digests
    10 %  ``chaos_inbox`` (2 s / 10 items), in-app           folded into digests
     4 %  ``chaos_promo`` to opted-out recipients            suppressed, with a reason
     3 %  to a refused address, e-mail + in-app              e-mail dead-lettered
     3 %  e-mail to a recipient without an address          dead-lettered
    ====  ===============================================  ===========================
    """
    rng = random.Random(seed)
    both = ("email", "inapp")
    items = []
    for index in range(count):
        roll = rng.random()
        normal = rng.choice(recipients.normal)
        priority = rng.choice(("high", "normal", "normal", "low"))
        if roll < 0.10:
            spec = (normal, "chaos_alert", "critical", both, DELIVER)
        elif roll < 0.40:
            spec = (normal, "chaos_instant", priority, both, DELIVER)
        elif roll < 0.80:
            spec = (normal, "chaos_digest", priority, both, DELIVER)
        elif roll < 0.90:
            spec = (normal, "chaos_inbox", priority, ("inapp",), DELIVER)
        elif roll < 0.94:
            spec = (rng.choice(recipients.opted_out), "chaos_promo", priority, both, SUPPRESS)
        elif roll < 0.97:
            spec = (rng.choice(recipients.refused), "chaos_instant", priority, both, DEAD)
        else:
            spec = (rng.choice(recipients.no_email), "chaos_instant", priority, ("email",),
                    DEAD)
        recipient, type_, prio, channels, expect = spec
        items.append(Planned(
            index, str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            f"chaos-{run}-{index}", recipient, type_, prio, channels, expect,
        ))
    return items


@dataclass
class Accepted:
    item: Planned
    at: float  # time.time() when the publish returned


@dataclass
class Producer:
    """Sends the plan at ``rate`` per second in a thread of its own."""

    items: list[Planned]
    rate: float
    #: Give up on a notification that cannot be published for this long.
    give_up_after: float = 120.0
    accepted: list[Accepted] = field(default_factory=list)
    publish_errors: int = 0
    given_up: list[Planned] = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos-producer")
        self._lock = threading.Lock()

    def start(self) -> Producer:
        self.started_at = time.time()
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def accepted_count(self) -> int:
        with self._lock:
            return len(self.accepted)

    def wait_accepted(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.accepted_count < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self) -> None:
        from notifier import client

        start = time.monotonic()
        for position, item in enumerate(self.items):
            delay = start + position / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            notification = client.build(**item.fields())
            first_try = time.monotonic()
            while True:
                try:
                    client.publish_one(notification)
                except Exception:  # the broker is away: same id, same key, again
                    self.publish_errors += 1
                    if time.monotonic() - first_try > self.give_up_after:
                        self.given_up.append(item)
                        break
                    time.sleep(0.2)
                    continue
                self._on_accepted(Accepted(item, time.time()))
                break
        self.finished_at = time.time()

    def _on_accepted(self, accepted: Accepted) -> None:
        with self._lock:
            self.accepted.append(accepted)

    def stop(self) -> None:
        """Nothing to stop once the plan is sent (see ResendingProducer)."""

    def stats(self) -> dict[str, Any]:
        return {"accepted": self.accepted_count, "publish_errors": self.publish_errors,
                "given_up": len(self.given_up),
                "seconds": round(self.finished_at - self.started_at, 2)}


@dataclass
class ResendingProducer(Producer):
    """A producer that keeps what it handed over until it is confirmed stored."""

    #: A notification is looked up this long after its last publish, and published
    #: again if still not stored ``resend_after`` seconds after it.
    check_after: float = 2.0
    resend_after: float = 10.0
    #: Seconds between two passes over the unconfirmed notifications.
    check_every: float = 1.0
    resent: int = 0
    lookups: int = 0
    lookup_errors: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._unconfirmed: dict[str, tuple[Planned, float]] = {}
        self._done = threading.Event()
        self._confirmer = threading.Thread(target=self._confirm, daemon=True,
                                           name="chaos-confirmer")

    def start(self) -> ResendingProducer:
        super().start()
        self._confirmer.start()
        return self

    def _on_accepted(self, accepted: Accepted) -> None:
        super()._on_accepted(accepted)
        with self._lock:
            self._unconfirmed[accepted.item.key] = (accepted.item, time.monotonic())

    @property
    def unconfirmed(self) -> int:
        with self._lock:
            return len(self._unconfirmed)

    def _confirm(self) -> None:
        from notifier import client, records

        while not self._done.wait(self.check_every):
            now = time.monotonic()
            with self._lock:
                due = [(key, item, now - sent) for key, (item, sent) in self._unconfirmed.items()
                       if now - sent >= self.check_after]
            for key, item, waited in due:
                try:
                    self.lookups += 1
                    stored = records.lookup(key)
                except Exception:  # Postgres is away: ask again on the next pass
                    self.lookup_errors += 1
                    break
                if stored is not None:
                    with self._lock:
                        self._unconfirmed.pop(key, None)
                    continue
                if waited < self.resend_after:
                    continue
                try:
                    client.publish_one(client.build(**item.fields()))
                except Exception:
                    self.publish_errors += 1
                    continue
                self.resent += 1
                with self._lock:
                    self._unconfirmed[key] = (item, time.monotonic())

    def stop(self) -> None:
        self._done.set()
        self._confirmer.join(timeout=30)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "resent": self.resent, "lookups": self.lookups,
                "lookup_errors": self.lookup_errors, "unconfirmed_at_end": self.unconfirmed}
