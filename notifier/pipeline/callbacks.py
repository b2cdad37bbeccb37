"""Status callbacks out: each terminal status of each delivery, POSTed to its
notification's ``callback_url`` (docs/callbacks.md).

**Made where the status is set.** The trigger ``callback_event`` (migration 0016) writes
one ``callbacks`` row per (delivery, status) in the transaction that moved a delivery
whose notification has a callback URL to a finished status
(``FINISHED_DELIVERY_STATUSES``: sent, delivered, bounced, complained, undeliverable,
suppressed, dead, cancelled), whichever code moved it: the delivery step's bulk
outcome, a receipt, a cancel. No writer has to remember it, none can write the status
without its event or the event twice, and a delivery without a callback URL costs one
boolean in the trigger's ``WHEN`` (``deliveries.callback``), no call.

**Published by the sweep.** The trigger cannot publish a task, so
:func:`sweep_due_callbacks` (beat's ``notifier.sweep_callbacks``, every
``NOTIFIER_CALLBACK_SWEEP_INTERVAL``) queues what is ``pending`` and publishes it, and
finds again what should be moving and is not: a retry now due, a task the broker lost
(``queued`` past ``NOTIFIER_QUEUED_TIMEOUT``), a batch whose worker died while sending
(``sending`` past ``NOTIFIER_SENDING_TIMEOUT``).

**Sent as webhooks are.** :func:`send_callbacks` claims a task's rows in one statement,
asks each receiving endpoint's circuit (``EndpointBreakers``, the webhook endpoints'
settings), POSTs through ``CallbackSender`` (the HTTP channels' guarded pool and egress
guard; signed by the webhook code with the origin's secret) and writes every outcome in
one statement. A failure that may pass is retried with the delivery backoff
(``RetryPolicy``) until ``NOTIFIER_CALLBACK_MAX_ATTEMPTS``; a refusal (4xx, a forbidden
address) or the last attempt parks it ``dead``. The notification and its deliveries
are never touched: a receiver that keeps failing delays nothing but its callbacks.

**At least once.** A worker that dies after the POST but before writing ``sent`` sends
it again after the lease: every request carries the event's id as ``Idempotency-Key``,
the same on every attempt, for the receiver to drop a repeat.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from notifier.channels.base import (
    OutgoingMessage,
    PermanentError,
    RetryableError,
    SendResult,
    endpoint_of,
)
from notifier.channels.callback import CallbackSender
from notifier.pipeline.breaker import EndpointTally
from notifier.pipeline.delivery import endpoint_breakers, wait_until
from notifier.pipeline.retry import RetryPolicy, next_attempt
from notifier.settings import Settings, delivery_queue
from notifier.storage.callback_secrets import signing_secrets
from notifier.storage.db import raw_cursor, session_scope
from notifier.storage.models import FINISHED_DELIVERY_STATUSES
from notifier.storage.state import StateRedis

if TYPE_CHECKING:
    from psycopg import Cursor

#: Every status a callback reports: the finished ones, one list (``models``).
REPORTED_STATUSES: tuple[str, ...] = FINISHED_DELIVERY_STATUSES
#: Callbacks ride the webhook channel's delivery queue: a callback is a webhook POST,
#: and every deployment's delivery workers already consume it (no queue to add).
CALLBACK_QUEUE: str = delivery_queue("webhook", "normal")
#: The endpoint circuits' namespace (``notifier.endpoint.{callback.<digest>}``).
CIRCUIT = "callback"


@dataclass(frozen=True)
class CallbackTask:
    """One ``notifier.callbacks`` task to publish after the commit."""

    callback_ids: list[str]
    queue: str = CALLBACK_QUEUE


@dataclass
class CallbackOutcome:
    sent: int = 0
    retrying: int = 0
    #: Parked: refused, or out of attempts.
    dead: int = 0
    #: Put back without an attempt (their endpoint's circuit is open).
    held: int = 0
    #: Ids not claimed (another task has them, or they are done).
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "retrying": self.retrying, "dead": self.dead,
                "held": self.held, "skipped": self.skipped}


def sweep_due_callbacks(
    cursor: Cursor[Any], settings: Settings, limit: int = 10_000
) -> list[CallbackTask]:
    """Queue the callbacks that should be moving and are not; publish the tasks after
    the commit. ``pending`` ones were just written by the trigger (this sweep is their
    publisher); the rest as the delivery sweep's (``outbox.sweep_due_deliveries``).
    Rows another sweep or a sender holds are skipped (``SKIP LOCKED``)."""
    cursor.execute(
        """
        UPDATE callbacks SET state = 'queued', updated_at = now(), next_attempt_at = now()
        WHERE id IN (
            SELECT id FROM callbacks
            -- The first condition is the partial index's (ix_callbacks_due): only
            -- callbacks still moving are read, however many were sent.
            WHERE state IN ('pending', 'queued', 'sending', 'retrying')
              AND next_attempt_at <= now() AND (
                  state IN ('pending', 'retrying')
               OR (state = 'queued' AND next_attempt_at <= now() - %(queued)s)
               OR (state = 'sending' AND next_attempt_at <= now() - %(lease)s))
            ORDER BY next_attempt_at
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        )
        RETURNING id
        """,
        {"queued": timedelta(seconds=settings.queued_timeout),
         "lease": timedelta(seconds=settings.sending_timeout), "limit": limit},
    )
    ids = [str(row[0]) for row in cursor.fetchall()]
    size = settings.callback_batch_size
    return [CallbackTask(ids[start:start + size]) for start in range(0, len(ids), size)]


@dataclass(frozen=True)
class _Claimed:
    id: uuid.UUID
    url: str
    attempts: int
    message: OutgoingMessage


def event_of(row: Any) -> dict[str, Any]:
    """A callback's body: bounded (ids, a status, at most 500 characters of detail)."""
    return {
        "id": str(row.id),
        "notification_id": str(row.notification_id),
        "delivery_id": str(row.delivery_id),
        "channel": row.channel,
        "status": row.status,
        "detail": row.detail,
        "occurred_at": row.occurred_at.isoformat(),
    }


def send_callbacks(
    callback_ids: list[str], settings: Settings, state: StateRedis,
    sender: CallbackSender | None = None,
) -> CallbackOutcome:
    """Claim, POST and record one task's callbacks (see the module's docstring)."""
    outcome = CallbackOutcome()
    claimed, signing = _claim(callback_ids)
    outcome.skipped = len(callback_ids) - len(claimed)
    if not claimed:
        return outcome
    breakers = endpoint_breakers(state, CIRCUIT, settings)
    by_endpoint: dict[str, list[_Claimed]] = defaultdict(list)
    for callback in claimed:
        by_endpoint[endpoint_of(callback.url) or ""].append(callback)
    endpoints = sorted(by_endpoint)
    permits = dict(zip(endpoints, breakers.acquire(endpoints), strict=True))
    admitted: list[_Claimed] = []
    held: list[tuple[uuid.UUID, float]] = []
    tallies: dict[str, EndpointTally] = {}
    for endpoint in endpoints:
        permit, callbacks = permits[endpoint], by_endpoint[endpoint]
        if permit.decision == "closed":
            admitted += callbacks
            continue
        if permit.probing:  # one callback probes the endpoint; the rest wait a moment
            tallies[endpoint] = EndpointTally(probing=True)
            admitted.append(callbacks[0])
            held += [(c.id, 1.0) for c in callbacks[1:]]
        else:
            wait = wait_until(state, permit.retry_at)
            held += [(c.id, wait) for c in callbacks]
    results: dict[uuid.UUID, SendResult] = {}
    if admitted:
        sender = sender or CallbackSender(settings.callback_timeout,
                                          settings.allow_private_targets)
        for result in sender.send_signed([c.message for c in admitted], signing):
            results[result.delivery_id] = result
    policy = RetryPolicy(base=settings.retry_base, factor=settings.retry_factor,
                         cap=settings.retry_cap, max_attempts=settings.callback_max_attempts)
    rows: list[tuple[str, str, float, str | None]] = []
    for callback in admitted:
        result = results.get(callback.id) or SendResult(
            callback.id, RetryableError("callback: not answered by the sender"))
        endpoint = endpoint_of(callback.url) or ""
        tally = tallies.setdefault(endpoint, EndpointTally())
        attempts = callback.attempts + 1
        if result.error is None:
            tally.successes += 1
            outcome.sent += 1
            rows.append((str(callback.id), "sent", 0.0, None))
            continue
        error = result.error
        if isinstance(error, RetryableError):
            tally.failures += 1
        retry = None if isinstance(error, PermanentError) else next_attempt(
            policy, attempts, getattr(error, "retry_after", None))
        if retry is None:
            outcome.dead += 1
            rows.append((str(callback.id), "dead", 0.0, str(error)[:1000]))
        else:
            outcome.retrying += 1
            rows.append((str(callback.id), "retrying", retry.delay, str(error)[:1000]))
        if len(outcome.errors) < 5:
            outcome.errors.append(str(error))
    for tally in tallies.values():  # a probe never answered counts as failed
        if tally.probing and not (tally.failures or tally.successes):
            tally.failures = 1
    breakers.record(tallies)
    outcome.held = len(held)
    _record(rows, held)
    return outcome


def _claim(callback_ids: list[str]) -> tuple[list[_Claimed], dict[str, Any]]:
    """Take the task's ``queued`` rows (``sending``, due again after the lease) and
    their origins' secrets, in one short transaction: no lock is held while sending."""
    with session_scope() as session:
        cursor = raw_cursor(session)
        cursor.execute(
            """
            UPDATE callbacks SET state = 'sending', next_attempt_at = now(),
                updated_at = now()
            WHERE id = ANY(%s::uuid[]) AND state = 'queued'
            RETURNING id, delivery_id, notification_id, channel, status, detail, url,
                      attempts, occurred_at
            """,
            (callback_ids,),
        )
        rows = cursor.fetchall()
        claimed = []
        for values in rows:
            row = _Row(*values)
            message = OutgoingMessage(
                delivery_id=row.id, recipient_id="", address=row.url, type=row.status,
                priority="", title="", body="", data=event_of(row),
                notification_id=row.notification_id,
            )
            claimed.append(_Claimed(row.id, row.url, row.attempts, message))
        origins = {endpoint_of(c.url) for c in claimed} - {None}
        signing = signing_secrets(session, [o for o in origins if o]) if origins else {}
    return claimed, signing


@dataclass(frozen=True)
class _Row:
    id: uuid.UUID
    delivery_id: uuid.UUID
    notification_id: uuid.UUID
    channel: str
    status: str
    detail: str | None
    url: str
    attempts: int
    occurred_at: datetime


def _record(
    rows: list[tuple[str, str, float, str | None]], held: list[tuple[uuid.UUID, float]]
) -> None:
    """Every outcome of the batch in one statement: sent, retrying (its wait from
    Postgres's clock), dead; held ones go back to ``retrying`` with no attempt counted.
    Only rows still ``sending`` are written: one the sweeper took back after the lease
    is another task's now."""
    entries = [(i, s, delay, err, 1) for i, s, delay, err in rows]
    entries += [(str(i), "retrying", wait, None, 0) for i, wait in held]
    if not entries:
        return
    ids, states, delays, errors, counted = (list(c) for c in zip(*entries, strict=True))
    with session_scope() as session:
        raw_cursor(session).execute(
            """
            UPDATE callbacks c SET state = o.state, attempts = c.attempts + o.counted,
                last_error = CASE WHEN o.counted = 1 THEN o.error ELSE c.last_error END,
                next_attempt_at = now() + make_interval(secs => o.delay),
                sent_at = CASE WHEN o.state = 'sent' THEN clock_timestamp() END,
                updated_at = now()
            FROM unnest(%s::uuid[], %s::text[], %s::float8[], %s::text[], %s::int[])
                 AS o(id, state, delay, error, counted)
            WHERE c.id = o.id AND c.state = 'sending'
            """,
            (ids, states, delays, errors, counted),
        )
