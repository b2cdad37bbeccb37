"""When a failed delivery is tried again, and when it stops being tried.

A delivery that failed in a way that may pass (``RetryableError``) is tried again after
a backoff, until the policy's attempts run out; then it is dead-lettered. A short wait
rides on a task published with a countdown; a long one is kept in Postgres
(``next_attempt_at``) for the sweeper, so no broker holds a message for hours.

Exponential backoff spreads retries out so a provider that is struggling is not kept
down by our retries; jitter keeps the retries of many deliveries that failed together
from arriving together again. Each channel may override the policy in its URL
(``smtp://host?retry_max_attempts=3``), because providers differ in how long they need.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from notifier.channels.base import RETRY_OPTIONS, retry_overrides
from notifier.settings import Settings


@dataclass(frozen=True)
class RetryPolicy:
    base: float
    factor: float
    cap: float
    max_attempts: int

    @classmethod
    def for_channel(cls, settings: Settings, options: Mapping[str, str]) -> RetryPolicy:
        """The settings' policy with the channel URL's ``retry_*`` options over it (read
        and checked by the channel layer, ``notifier.channels.base.retry_overrides``)."""
        values: dict[str, float] = {option: getattr(settings, option) for option in RETRY_OPTIONS}
        values |= retry_overrides(options)
        return cls(
            base=values["retry_base"], factor=max(1.0, values["retry_factor"]),
            cap=values["retry_cap"], max_attempts=int(values["retry_max_attempts"]),
        )

    def ceiling(self, attempt: int) -> float:
        """The longest wait after the ``attempt``-th failed attempt (1-based)."""
        return min(self.cap, self.base * self.factor ** max(0, attempt - 1))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempt``-th failure: between half the ceiling and
        the ceiling ("equal jitter"), so waits still grow while retries spread out."""
        ceiling = self.ceiling(attempt)
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)

    def exhausted(self, attempts: int) -> bool:
        return attempts >= self.max_attempts


@dataclass(frozen=True)
class Retry:
    """The next attempt of a delivery that failed in a way that may pass."""

    #: Seconds from the failure: the backoff, or longer if the provider asked for it.
    #: A wait, not a time: it becomes ``next_attempt_at`` on Postgres's clock.
    delay: float


def next_attempt(
    policy: RetryPolicy, attempts: int, retry_after: float | None
) -> Retry | None:
    """When a delivery that has failed ``attempts`` times goes again; None: it has run
    out of attempts and goes to the dead letters."""
    if policy.exhausted(attempts):
        return None
    return Retry(max(policy.delay(attempts), retry_after or 0.0))


def countdown_second(delay: float, clock: float, countdown_max: float) -> int | None:
    """The whole second of the worker's monotonic ``clock`` (read when the delivery was
    put back) a delivery put back for ``delay`` seconds is published for, with a
    countdown, if its wait is at most ``countdown_max`` (one task per second of due time
    carries every retry due in it); None: the wait is longer, and the sweeper publishes
    it from ``next_attempt_at`` when it is due. A local clock for a local duration: the
    countdown is the rest of the wait when the task is published."""
    if delay > countdown_max:
        return None
    return math.ceil(clock + delay)
