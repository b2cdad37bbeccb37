"""Delivery: claim due deliveries, send them per channel in one batch, record each outcome.

The life of a delivery row (``deliveries.status``)::

    pending ──queue──▶ queued ──claim──▶ sending ──▶ sent ··(receipts)··▶ delivered, ...
                         ▲                  ├──▶ retrying ──(countdown or sweep)──▶ queued
           sweep: lost ──┘                  ├──▶ dead (+ a dead_letters row)
                                            └──▶ suppressed (address suppressed, untried)

Postgres is the record: a task only carries ids. Claiming is one ``UPDATE … FOR UPDATE
SKIP LOCKED`` that only takes rows that are due, so a task published twice (the sweeper
republished it, Redis handed it to a second worker) sends nothing twice. Results are
written in bulk, one statement for all that came in over the last few milliseconds
(``RECORD_EVERY_SECONDS``), so a worker killed mid-batch leaves in doubt the message it
was sending and those few outcomes; whatever is in doubt is resent with the same
idempotency key.

A claim lives as long as its claimant (``Claim``): the batch holds an advisory lock in a
transaction open on a connection of its own, and its rows carry the lock's key. A worker
that dies loses that connection, Postgres ends the transaction, and the rows are free
for the sweep or the next claim at once; a live worker's are never taken, however slow
it is.

Whose problem a failure is decides what it costs (see ``channels.base.DeliveryError``):
a recipient's unusable address or failing endpoint costs that delivery alone, and an
endpoint the recipient controls backs off on a circuit of its own; a provider's failure
counts towards the channel's circuit; our own configuration holds deliveries without
counting attempts and never dead-letters them. A channel that raises, whatever the
exception, costs the one message it was sending.

A channel may have several providers, in order of preference (``channels.get_providers``),
each with a circuit of its own. A provider's failure (one that would count towards its
circuit), or its open circuit, sends the delivery on to the next provider at once, in
the same attempt: an attempt is one trip down the list, and only when every provider
failed does the retry policy apply. The preferred provider gets its traffic back as
soon as its half-open probe succeeds. The row records the provider that sent it.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import select
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import psycopg

from notifier.channels import Provider, channel_class, get_providers, provider_names, variable
from notifier.channels.base import (
    Channel,
    ConfigurationError,
    DeliveryError,
    OutgoingMessage,
    PermanentError,
    RetryableError,
    SendResult,
)
from notifier.pipeline.breaker import CircuitBreaker, EndpointBreakers, EndpointTally, Permit
from notifier.pipeline.dead_letters import (
    FailedDelivery,
    jsonb_safe,
    write_delivery_dead_letters,
)
from notifier.pipeline.outbox import CLAIMANT_GONE, BatchSize, DeliveryTask, queue_deliveries
from notifier.pipeline.ratelimit import RateLimiter, RateRequest
from notifier.pipeline.retry import RetryPolicy, countdown_second, next_attempt
from notifier.pipeline.suppressions import suppressed_among
from notifier.settings import CHANNEL_NAMES, Settings, get_settings
from notifier.storage.db import get_engine, raw_cursor, session_scope
from notifier.storage.models import UNSENT_DELIVERY_STATUSES as UNSENT
from notifier.storage.state import StateRedis, server_seconds, state_redis

if TYPE_CHECKING:
    from psycopg import Cursor

log = logging.getLogger(__name__)

#: A channel that raised on this many messages in a row with nothing answered between
#: is not sent the rest of the batch: they go back to the queue untried (no attempt
#: counted), so a channel that raises on everything (reconnecting each time) cannot
#: spin through a whole batch. Well above the handful of malformed addresses a batch
#: may hold next to each other.
MAX_RAISES_IN_A_ROW = 10


@dataclass
class ClaimedDelivery:
    id: uuid.UUID
    recipient_id: str
    priority: str
    attempts: int
    message: OutgoingMessage | None
    #: Why no message could be built (no address for this channel), if so.
    problem: str | None = None

    @property
    def notification_id(self) -> uuid.UUID | None:
        return self.message.notification_id if self.message else None


@dataclass
class BatchOutcome:
    sent: int = 0
    retrying: int = 0
    dead: int = 0
    #: Held back by the circuit breaker or a rate limit, no attempt counted.
    rescheduled: int = 0
    #: Not attempted: the address is on the suppression list.
    suppressed: int = 0
    #: Deliveries whose retry is due soon enough to ride on a countdown: publish these.
    tasks: list[DeliveryTask] = field(default_factory=list)
    #: Seconds from each sent delivery's row commit to the channel accepting it.
    latencies: list[float] = field(default_factory=list)
    #: (provider, result) -> messages: ``sent``, ``provider_error`` (the provider
    #: failed: its circuit counts it), ``other_error`` (the recipient's, or ours).
    by_provider: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Provider -> deliveries that failed over from it to the next (same attempt).
    failovers: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "retrying": self.retrying, "dead": self.dead,
                "rescheduled": self.rescheduled, "suppressed": self.suppressed}


# --- Sending ------------------------------------------------------------------------


def deliver_batch(
    channel_name: str, delivery_ids: Sequence[str], settings: Settings, state: StateRedis,
    *, batch_size: BatchSize | None = None, stopping: Callable[[], bool] | None = None,
) -> BatchOutcome:
    """Send the due deliveries among ``delivery_ids`` over one connection of the channel.

    ``stopping`` says the worker is shutting down: the batch then returns its unsent
    deliveries after the message in hand. ``batch_size`` sizes the tasks of the short
    retries (see ``outbox.BatchSize``).

    A batch that finds no second connection to claim on while it holds its claim's
    (``ClaimStarved``) gives the claim back, holding nothing, and tries again after a
    random pause, ``delivery_claim_attempts`` times; then its deliveries are queued
    again a few seconds later (``_queue_again``). Nothing was claimed nor sent by then.
    """
    stopping = stopping or _never
    attempts = settings.delivery_claim_attempts
    for attempt in range(1, attempts + 1):
        try:
            return _claim_and_send(channel_name, delivery_ids, settings, state, batch_size,
                                   stopping)
        except ClaimStarved as starved:
            log.info("a %s delivery batch gave its claim back: %s (try %d of %d)",
                     channel_name, starved, attempt, attempts,
                     extra={"channel": channel_name})
        if attempt < attempts and not stopping():
            # Batches that gave up together must not come back together.
            time.sleep(random.uniform(0.1, 1.0) * settings.delivery_claim_wait)
        elif attempt < attempts:
            break
    return _queue_again(channel_name, delivery_ids, settings, batch_size)


def _claim_and_send(
    channel_name: str, delivery_ids: Sequence[str], settings: Settings, state: StateRedis,
    batch_size: BatchSize | None, stopping: Callable[[], bool],
) -> BatchOutcome:
    """One try: both connections are taken from the pool first (the pool's ping may
    wait for a server behind PgBouncer, and holds nothing while it does), then the claim
    is held, then the deliveries are claimed within ``delivery_claim_wait``."""
    outcome = BatchOutcome()
    with Claim() as claim, _Recorder(
        channel_name, settings, outcome, claim, batch_size, stopping,
    ) as recorder:
        claim.hold()
        claimed = _skip_suppressed(channel_name, recorder.take(delivery_ids), recorder)
        if not claimed:
            return outcome
        try:
            providers = get_providers(channel_name, settings)
            recorder.policy = RetryPolicy.for_channel(settings, providers[0].channel.options)
        except Exception as exc:  # any class: our configuration, never the deliveries'
            _hold_unconfigured(channel_name, claimed, exc, recorder, settings, state)
            return outcome
        _send_claimed(providers, claimed, recorder, settings, state)
    return outcome


def _queue_again(
    channel_name: str, delivery_ids: Sequence[str], settings: Settings,
    batch_size: BatchSize | None,
) -> BatchOutcome:
    """Every try of the batch found no second connection: holding nothing now (so this
    may wait for a connection), queue its deliveries again a few seconds from now, as
    new tasks, no attempt counted. Only rows still ``queued`` are taken: one claimed
    meanwhile is someone else's, and one left ``sending`` by a claim that reached
    Postgres after its batch gave up has no claimant: the sweep or the next claim takes
    it (``CLAIMANT_GONE``)."""
    delay = random.uniform(1.0, 2.0) * settings.delivery_claim_wait
    with session_scope() as session:
        tasks = queue_deliveries(raw_cursor(session), delivery_ids, settings,
                                 from_status="queued", delay=delay, batch_size=batch_size)
    queued = sum(len(task.delivery_ids) for task in tasks)
    log.warning("%d deliveries (%s) queued again in %.1fs: no second database connection"
                " came within NOTIFIER_DELIVERY_CLAIM_WAIT (%gs) in %d tries; behind"
                " PgBouncer, its pool is too small for the processes delivering at once"
                " (docs/scaling.md)", queued, channel_name, delay,
                settings.delivery_claim_wait, settings.delivery_claim_attempts,
                extra={"channel": channel_name})
    return BatchOutcome(rescheduled=queued, tasks=tasks)


def _skip_suppressed(
    channel_name: str, claimed: list[ClaimedDelivery], recorder: _Recorder,
) -> list[ClaimedDelivery]:
    """End the deliveries to suppressed addresses ``suppressed``, untried (one query for
    the batch, ``notifier.pipeline.suppressions``); return the others."""
    addresses = {d.id: d.message.address for d in claimed if d.message and d.message.address}
    reasons = suppressed_among(recorder.cursor, channel_name, addresses)
    for delivery in claimed:
        if delivery.id in reasons:
            recorder.suppressed(delivery, reasons[delivery.id])
    return [d for d in claimed if d.id not in reasons]


def _hold_unconfigured(
    channel_name: str, claimed: list[ClaimedDelivery], exc: Exception, recorder: _Recorder,
    settings: Settings, state: StateRedis,
) -> None:
    """The channel cannot be built (not configured, a bad URL that got past the start-up
    check): hold its deliveries and count towards its circuit, so that a fixed
    configuration sends them; while it stays broken they come back every
    ``breaker_open_seconds`` and cost no connection."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if not reason.startswith(variable(channel_name)):
        reason = f"{variable(channel_name)}: {reason.removeprefix(f'{channel_name}: ')}"
    breaker = circuit_breaker(state, channel_name, settings)
    breaker.record(failures=len(claimed), successes=0, probing=False)
    for delivery in claimed:
        recorder.hold_for_configuration(delivery, ConfigurationError(reason))


def _send_claimed(
    providers: list[Provider], claimed: list[ClaimedDelivery], recorder: _Recorder,
    settings: Settings, state: StateRedis,
) -> None:
    """Send through the first provider whose circuit lets them; what a provider fails
    on (its fault, ``provider_failure``) goes on to the next at once, in the same
    attempt; what every provider failed on takes the last one's error (the retry
    policy applies); what no open circuit let through waits, no attempt counted."""
    route = _Route(providers, state, settings)
    first = route.next()
    if first is None:
        recorder.release(claimed, route.wait(), route.closed_reason())
        return
    ready = _within_rate_limits(claimed, recorder, settings, state)
    for delivery in [d for d in ready if d.message is None]:
        recorder.dead(delivery, PermanentError(delivery.problem or "no message"))
    ready = [d for d in ready if d.message is not None]
    endpoints = _Endpoints.open(first.provider.channel, ready, settings, state)
    if endpoints is not None:
        ready = endpoints.admit(ready, recorder)
    hop: _Hop | None = first
    try:
        while hop is not None and ready:
            passed = _send_through(hop, ready, recorder, endpoints, last=route.last)
            hop = route.next() if passed and not recorder.should_stop() else None
            if hop is not None:
                recorder.outcome.failovers[passed[0].provider] += len(passed)
            ready = [p.delivery for p in passed]
            if hop is None:
                _end_unsent(passed, route, recorder)
    finally:
        recorder.provider = recorder.passing_on = None
        if endpoints is not None:
            endpoints.record()


@dataclass
class _Hop:
    """A provider whose circuit let a batch through, with its permit."""

    provider: Provider
    breaker: CircuitBreaker
    permit: Permit


@dataclass
class _Passed:
    """A delivery a provider did not send, for the next: ``error`` is its failure there,
    None when it was not tried there (the circuit opened under the batch)."""

    delivery: ClaimedDelivery
    provider: str
    error: DeliveryError | None


class _Route:
    """A channel's providers in order of preference, each circuit asked (a permit, one
    Redis round trip) only when deliveries reach it: asking takes a half-open circuit's
    probe, which a provider never reached must not hold."""

    def __init__(self, providers: list[Provider], state: StateRedis, settings: Settings) -> None:
        self.providers = providers
        self.state = state
        self.settings = settings
        self._next = 0
        #: When the earliest circuit found open half-opens (the state Redis's clock).
        self.retry_at: float | None = None

    def next(self) -> _Hop | None:
        """The next provider whose circuit is closed or half-open (its probe now ours)."""
        while self._next < len(self.providers):
            provider = self.providers[self._next]
            self._next += 1
            breaker = provider_breaker(self.state, provider, len(self.providers), self.settings)
            permit = breaker.acquire()
            if permit.allowed:
                return _Hop(provider, breaker, permit)
            self.retry_at = min(self.retry_at or permit.retry_at, permit.retry_at)
        return None

    @property
    def last(self) -> bool:
        """No provider is left after the one in hand."""
        return self._next >= len(self.providers)

    def wait(self) -> float:
        """Seconds until the earliest open circuit half-opens (1 if none was open)."""
        return 1.0 if self.retry_at is None else wait_until(self.state, self.retry_at)

    def closed_reason(self) -> str:
        name = self.providers[0].channel.name
        if len(self.providers) == 1:
            return f"circuit open for {name}"
        return f"circuit open for every provider of {name}"


def _send_through(
    hop: _Hop, ready: list[ClaimedDelivery], recorder: _Recorder,
    endpoints: _Endpoints | None, *, last: bool,
) -> list[_Passed]:
    """Send through one provider (a probe first when its circuit is half-open) and count
    for its circuit; returns what goes on to the next provider (none when ``last``: the
    failures are recorded, and a batch held by the circuit is released as before)."""
    channel, breaker = hop.provider.channel, hop.breaker
    recorder.provider = hop.provider.name
    passed: list[_Passed] = []
    recorder.passing_on = None if last else passed
    if hop.permit.probing:
        probe, ready = ready[:1], ready[1:]
        tally = _send(channel, probe, recorder, endpoints)
        state_after = breaker.record(failures=tally.failures, successes=tally.successes,
                                     probing=True)
        if state_after != "closed" and ready:
            if last:
                retry_at = breaker.acquire().retry_at
                recorder.release(ready, wait_until(breaker.client, retry_at),
                                 f"circuit open for {breaker.channel}")
                return passed
            return passed + [_Passed(d, hop.provider.name, None) for d in ready]
    if ready:
        tally = _send(channel, ready, recorder, endpoints)
        breaker.record(failures=tally.failures, successes=tally.successes, probing=False)
    return passed


def _end_unsent(passed: list[_Passed], route: _Route, recorder: _Recorder) -> None:
    """Deliveries no provider is left for: one that failed somewhere takes that error
    (one attempt counted, the retry policy applies); one never tried waits for the
    earliest circuit to half-open, no attempt counted."""
    recorder.passing_on = recorder.provider = None  # counted per provider already
    untried = [p.delivery for p in passed if p.error is None]
    for p in passed:
        if p.error is not None:
            recorder.result(p.delivery, SendResult(p.delivery.id, p.error))
    if untried and recorder.should_stop():
        recorder.release(untried, 0.0, recorder.stop_reason())
    elif untried:
        recorder.release(untried, route.wait(), route.closed_reason())


def _within_rate_limits(
    claimed: list[ClaimedDelivery], recorder: _Recorder, settings: Settings,
    state: StateRedis,
) -> list[ClaimedDelivery]:
    """The deliveries that may go now; the others are released to their window's reset."""
    limiter = RateLimiter(state, settings)
    waits = limiter.take([
        RateRequest(d.recipient_id, critical=d.priority == "critical") for d in claimed
    ])
    clock = server_seconds(state) if any(waits) else 0.0
    for delivery, until in zip(claimed, waits, strict=True):
        if until:
            recorder.release([delivery], max(until - clock, 0.0),
                             f"rate limit of {delivery.recipient_id}")
    return [d for d, until in zip(claimed, waits, strict=True) if not until]


def wait_until(state: StateRedis, until: float) -> float:
    """Seconds from now to ``until``, a time on the state Redis's clock (a breaker's or a
    rate window's end): a wait, so that the row's due time is taken from Postgres's
    clock and no host's clock comes into it (``docs/scaling.md``, Clocks)."""
    return max(until - server_seconds(state), 0.0)


class _Endpoints:
    """The batch's view of the circuits of recipient-controlled endpoints: which
    deliveries go where, which may go now, and what each endpoint did.

    Exists only for channels whose targets are recipients' own endpoints; costs two
    round trips per batch (read every circuit, record the outcomes: a script call per
    endpoint, pipelined), none per message.
    """

    def __init__(self, breakers: EndpointBreakers, of: dict[uuid.UUID, str]) -> None:
        self.breakers = breakers
        #: Delivery id -> its endpoint (deliveries without one are not here).
        self.of = of
        self.tallies: dict[str, EndpointTally] = {}

    @classmethod
    def open(
        cls, channel: Channel, ready: list[ClaimedDelivery], settings: Settings,
        state: StateRedis,
    ) -> _Endpoints | None:
        if channel.target_is_provider or not ready:
            return None
        of = {}
        for delivery in ready:
            endpoint = _endpoint(channel, delivery)
            if endpoint is not None:
                of[delivery.id] = endpoint
        if not of:
            return None
        return cls(endpoint_breakers(state, channel.name, settings), of)

    def admit(self, ready: list[ClaimedDelivery], recorder: _Recorder) -> list[ClaimedDelivery]:
        """The deliveries whose endpoint may be tried now; the others are put back
        until their endpoint's circuit half-opens (no attempt counted). A half-open
        endpoint gets one delivery, its probe."""
        endpoints = sorted(set(self.of.values()))
        permits = dict(zip(endpoints, self.breakers.acquire(endpoints), strict=True))
        admitted: list[ClaimedDelivery] = []
        held: dict[tuple[str, float], list[ClaimedDelivery]] = defaultdict(list)
        for delivery in ready:
            endpoint = self.of.get(delivery.id)
            permit = permits[endpoint] if endpoint else None
            if endpoint is None or permit is None or permit.decision == "closed":
                admitted.append(delivery)
            elif permit.probing and endpoint not in self.tallies:
                self.tallies[endpoint] = EndpointTally(probing=True)
                admitted.append(delivery)
            else:  # open, or half-open with its probe already chosen (Redis's clock)
                held[(str(endpoint), -1.0 if permit.probing else permit.retry_at)].append(
                    delivery)
        clock = server_seconds(self.breakers.client) if held else 0.0
        for (endpoint, until), deliveries in held.items():
            wait = 1.0 if until < 0 else max(until - clock, 0.0)
            recorder.release(deliveries, wait, f"circuit open for endpoint {endpoint}")
        return admitted

    def count(self, delivery: ClaimedDelivery, result: SendResult) -> None:
        """An endpoint fails by answering with an error that may pass later (5xx, 429,
        a timeout); a refusal (4xx) is an answer and says nothing about its health."""
        endpoint = self.of.get(delivery.id)
        if endpoint is None:
            return
        tally = self.tallies.setdefault(endpoint, EndpointTally())
        if result.sent:
            tally.successes += 1
        elif isinstance(result.error, RetryableError):
            tally.failures += 1

    def record(self) -> None:
        """One round trip for the batch. A probe that was never sent (the batch was
        returned first) counts as failed: the endpoint stays open for another period
        rather than being closed on no evidence."""
        for tally in self.tallies.values():
            if tally.probing and not (tally.failures or tally.successes):
                tally.failures = 1
        self.breakers.record(self.tallies)


def _endpoint(channel: Channel, delivery: ClaimedDelivery) -> str | None:
    """The delivery's endpoint; None if the channel cannot say (it then fails alone)."""
    try:
        return channel.endpoint(delivery.message) if delivery.message else None
    except Exception:  # a hostile address must not stop the batch here either
        log.warning("%s channel could not name the endpoint of delivery %s", channel.name,
                    delivery.id, exc_info=True)
        return None


@dataclass
class _Tally:
    #: Results that count towards the channel's circuit (the provider failed).
    failures: int = 0
    successes: int = 0


def _send(
    channel: Channel, deliveries: list[ClaimedDelivery], recorder: _Recorder,
    endpoints: _Endpoints | None = None,
) -> _Tally:
    """Send and record each result as it comes; returns what counts for the circuit.

    When the channel raises, the message it was sending (the first not yet answered:
    channels answer in order) fails alone, retryable and not counted against the
    channel; the channel is closed (a session may be mid-command) and the rest go out
    through a new ``send_batch`` call.
    """
    tally = _Tally()
    waiting = {d.id: d for d in deliveries}
    raised_in_a_row = 0
    while waiting:
        answered, exc = _send_round(channel, waiting, recorder, tally, endpoints)
        if exc is None:
            break
        raised_in_a_row = 1 if answered else raised_in_a_row + 1
        _blame_first_waiting(channel, waiting, exc, recorder)
        if waiting and recorder.should_stop():
            recorder.release(waiting.values(), 0.0, recorder.stop_reason())
            waiting.clear()
        elif waiting and raised_in_a_row >= MAX_RAISES_IN_A_ROW:
            recorder.release(
                waiting.values(), 1.0,
                f"returned unsent: the {channel.name} channel raised on {raised_in_a_row}"
                " messages in a row",
            )
            waiting.clear()
    for delivery in waiting.values():  # the channel answered fewer than it was given
        error = RetryableError(f"{channel.name} channel gave no result for this message")
        error.provider_failure = False
        recorder.result(delivery, SendResult(delivery.id, error))
    return tally


def _send_round(
    channel: Channel, waiting: dict[uuid.UUID, ClaimedDelivery], recorder: _Recorder,
    tally: _Tally, endpoints: _Endpoints | None,
) -> tuple[int, Exception | None]:
    """One ``send_batch`` call over the waiting deliveries, each result recorded as it
    comes (and taken out of ``waiting``). Returns how many were answered and what the
    channel raised, if it did; only the channel's own code is guarded here, so a failure
    to record is not mistaken for the channel's."""
    answered = 0
    try:
        results = iter(channel.send_batch([d.message for d in waiting.values() if d.message]))
    except Exception as exc:
        return answered, exc
    try:
        while waiting:
            try:
                result = next(results)
            except StopIteration:
                break
            except Exception as exc:
                return answered, exc
            delivery = waiting.pop(result.delivery_id, None)
            if delivery is None:
                log.warning("%s channel answered for a delivery it was not given: %s",
                            channel.name, result.delivery_id)
                continue
            answered += 1
            recorder.result(delivery, result)
            _count(tally, result)
            if endpoints is not None:
                endpoints.count(delivery, result)
            if waiting and recorder.should_stop():
                recorder.release(waiting.values(), 0.0, recorder.stop_reason())
                waiting.clear()
    finally:
        _close_quietly(results)
    return answered, None


def _count(tally: _Tally, result: SendResult) -> None:
    if result.sent:
        tally.successes += 1
    elif result.error is not None and result.error.provider_failure:
        tally.failures += 1


def _blame_first_waiting(
    channel: Channel, waiting: dict[uuid.UUID, ClaimedDelivery], exc: Exception,
    recorder: _Recorder,
) -> None:
    """Fail the message the channel was sending when it raised, and reset the channel."""
    if not waiting:
        log.error("%s channel raised after its last result", channel.name, exc_info=exc)
    else:
        culprit = waiting.pop(next(iter(waiting)))
        reason = " ".join(str(exc).split())[:200]
        error = RetryableError(
            f"{channel.name} channel raised {type(exc).__name__} on this message: {reason}"
        )
        error.provider_failure = False
        log.error("%s channel raised on delivery %s; the rest of the batch goes on",
                  channel.name, culprit.id, exc_info=exc, extra=recorder.about(culprit))
        recorder.result(culprit, SendResult(culprit.id, error))
    try:
        channel.close()
    except Exception:
        log.warning("%s channel failed to close after raising", channel.name, exc_info=True)


def _close_quietly(results: object) -> None:
    """Close a generator stopped early, so the channel tidies up its session."""
    close = getattr(results, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:
        log.warning("a channel's batch failed to close", exc_info=True)


def endpoint_breakers(state: StateRedis, channel: str, settings: Settings) -> EndpointBreakers:
    return EndpointBreakers(
        state, channel, threshold=settings.endpoint_breaker_threshold,
        window=settings.endpoint_breaker_window,
        open_seconds=settings.endpoint_breaker_open_seconds,
        probe_timeout=settings.sending_timeout,
    )


def circuit_breaker(state: StateRedis, channel: str, settings: Settings) -> CircuitBreaker:
    return CircuitBreaker(
        state, channel, threshold=settings.breaker_failure_threshold,
        window=settings.breaker_window, open_seconds=settings.breaker_open_seconds,
        probe_timeout=settings.sending_timeout,
    )


def provider_breaker(
    state: StateRedis, provider: Provider, providers: int, settings: Settings
) -> CircuitBreaker:
    """A provider's circuit: the channel's own when it has one provider (the keys it
    always had), ``<channel>/<provider name>`` among several."""
    return circuit_breaker(state, circuit_name(provider.channel.name, provider.name, providers),
                           settings)


def circuit_name(channel: str, provider: str, providers: int) -> str:
    return channel if providers == 1 else f"{channel}/{provider}"


# --- Claiming -----------------------------------------------------------------------


class Claim:
    """A batch's hold on the deliveries it claims, for as long as its worker lives.

    One transaction, open on a connection of its own from before the claim until every
    outcome is written, holds ``pg_advisory_xact_lock_shared(key)``; the claimed rows
    carry the key (``claim_key``). Nothing else happens on that connection, so the lock
    blocks no outcome write (advisory locks do not touch rows), and no session state is
    left behind (the lock and the settings end with the transaction: PgBouncer's
    transaction pooling keeps the connection for the transaction, then reuses it).

    A worker that dies (SIGKILL, OOM) closes the connection; so does a host that
    crashes, once Postgres's TCP keepalives notice; Postgres then ends the transaction
    and the lock goes: the sweep and any claim take the rows (``CLAIMANT_GONE``). A
    worker that is merely slow keeps its connection and so its rows, however slow: the
    transaction has no idle timeout (``idle_in_transaction_session_timeout`` and, from
    Postgres 17, ``transaction_timeout`` are off for it alone), since a timeout would
    hand a live worker's rows to another and send them twice. If the connection is
    lost while the worker lives (``pg_terminate_backend``, Postgres restarted), the
    batch stops after the message in hand (``lost``): its rows are someone else's now.

    The key is random (63 bits): a key shared by chance between two live claims costs
    nothing (the lock is shared), and between a live claim and a dead one only delays
    the dead one's rows until the live one ends.

    A batch so holds two connections at once: this one, and its recorder's, on which
    the rows are claimed and the outcomes written (each outcome committed as it comes,
    which a transaction-level lock cannot outlive on one connection). Behind PgBouncer
    with fewer server connections than claims need, every batch can hold this one while
    its recorder waits for a server that only another batch's end would free. So the
    claim waits at most ``delivery_claim_wait`` for it (``_Recorder.take``), then is
    given back: a batch that has claimed rows always gets its later connections, since
    of N server connections at most N - 1 can be held by batches that have claimed
    (each claimed while one more was free) and any other is held by a batch that gives
    it back within the wait. Entering takes the connection from the pool; ``hold``
    begins the transaction.
    """

    def __init__(self) -> None:
        self.key = secrets.randbits(63)
        self._lost = False
        self.held = False

    def __enter__(self) -> Claim:
        self.connection = get_engine().raw_connection()
        self.driver = cast("psycopg.Connection[Any]", self.connection.driver_connection)
        return self

    def hold(self) -> None:
        """Begin the transaction and take the lock (waiting, if behind PgBouncer, for a
        server connection while holding nothing)."""
        try:
            self.driver.autocommit = True  # the transaction is ours: BEGIN in the same trip
            timeouts = "SET LOCAL idle_in_transaction_session_timeout = 0;"
            if self.driver.info.server_version >= 170000:
                timeouts += " SET LOCAL transaction_timeout = 0;"
            # No parameters: one simple-protocol message, so one round trip for it all.
            self.driver.execute(
                f"BEGIN; {timeouts} SELECT pg_advisory_xact_lock_shared({self.key})")
        except BaseException:
            self._lost = True  # thrown away on exit
            raise
        self.held = True

    def __exit__(self, *exc_info: object) -> None:
        """End the transaction (the lock goes with it): every outcome is written."""
        try:
            if self.held and not self.lost():
                self.driver.execute("COMMIT")
        except psycopg.Error:
            self._lost = True
            log.info("the claim's connection was lost at the end of its batch", exc_info=True)
        finally:
            if self._lost:
                self.connection.invalidate()
            else:
                self.driver.autocommit = False
                self.connection.close()

    def lost(self) -> bool:
        """Whether the claim's connection is gone (its rows are free for others).

        Costs no round trip: nothing is ever asked on the connection during the batch,
        so anything it has to read (Postgres's farewell, the socket's end) means it has
        ended; only then is it asked, to be sure."""
        if self._lost:
            return True
        try:
            poll = select.poll()  # not select(): a worker may hold more than 1024 files
            poll.register(self.driver.fileno(), select.POLLIN)
            if poll.poll(0):
                self.driver.execute("SELECT 1")
        except (psycopg.Error, OSError):
            self._lost = True
            log.warning("the claim's Postgres connection was lost mid-batch: the batch"
                        " stops after the message in hand and its deliveries are resumed"
                        " elsewhere")
        return self._lost


class ClaimStarved(Exception):
    """A batch's claim got no second connection within ``delivery_claim_wait``."""


class _Deadline:
    """Cuts a connection off under the call in hand once ``seconds`` have passed.

    A timer thread shuts the socket down (``shutdown``, not ``close``: the descriptor
    stays psycopg's), so the blocked call fails at once; ``passed`` says whether it did
    so, and is final once the block is left (the timer and the block's end take one
    lock, so a call that returned in time is never cut afterwards).
    """

    def __init__(self, driver: psycopg.Connection[Any], seconds: float) -> None:
        self._fileno = driver.fileno()
        self._lock = threading.Lock()
        self._over = False
        self.passed = False
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._over = True
        self._timer.cancel()

    def _cut(self) -> None:
        with self._lock:
            if self._over:
                return
            self.passed = True
            try:
                with socket.socket(fileno=os.dup(self._fileno)) as connection:
                    connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed: the call fails anyway
                pass


def claim_deliveries(
    cursor: Cursor[Any], channel_name: str, delivery_ids: Sequence[str], settings: Settings,
    claim_key: int,
) -> list[ClaimedDelivery]:
    """Take the due, unsent deliveries among the ids, with what is needed to send them,
    for the claim whose lock has ``claim_key`` (see ``Claim``). A row a dead worker
    claimed (its lock free) is taken again at once: on RabbitMQ its task comes back to
    another worker as soon as the first one's connection drops."""
    cursor.execute(
        f"""
        WITH claimed AS (
            UPDATE deliveries d SET status = 'sending', updated_at = now(),
                claim_key = %(key)s
            WHERE d.id IN (
                SELECT id FROM deliveries
                WHERE id = ANY(%(ids)s::uuid[]) AND channel = %(channel)s
                  AND ((status = ANY(%(unsent)s) AND next_attempt_at <= now() + %(early)s)
                       OR (status = 'sending' AND {CLAIMANT_GONE}))
                ORDER BY id
                FOR UPDATE SKIP LOCKED
            )
            RETURNING d.id, d.notification_id, d.digest_id, d.recipient_id, d.priority,
                      d.attempts
        )
        SELECT c.id, c.notification_id, c.digest_id, c.recipient_id, c.priority, c.attempts,
               coalesce(n.type, g.type), coalesce(n.title, g.title), coalesce(n.body, g.body),
               n.data, g.notification_ids, r.name, r.email, r.phone, r.addresses
        FROM claimed c
        LEFT JOIN notifications n ON n.id = c.notification_id
        LEFT JOIN digests g ON g.id = c.digest_id
        LEFT JOIN recipients r ON r.id = c.recipient_id
        ORDER BY c.id
        """,
        {
            "ids": list(delivery_ids), "channel": channel_name, "unsent": list(UNSENT),
            "early": timedelta(seconds=1), "key": claim_key,
            "lease": timedelta(seconds=settings.sending_timeout),
        },
    )
    address_field = channel_class(channel_name).address_field
    return [_claimed(row, channel_name, address_field) for row in cursor.fetchall()]


def _claimed(row: tuple[Any, ...], channel: str, address_field: str | None) -> ClaimedDelivery:
    (delivery_id, notification_id, digest_id, recipient_id, priority, attempts, type_,
     title, body, data, digest_items, name, email, phone, addresses) = row
    address = address_of(address_field, channel, email, phone, addresses or {})
    delivery = ClaimedDelivery(delivery_id, recipient_id, priority, attempts, message=None)
    if address_field and not address:
        delivery.problem = f"recipient {recipient_id!r} has no {address_field} address"
        return delivery
    if digest_id is not None:
        data = {"digest": True, "item_count": len(digest_items or []),
                "notification_ids": [str(i) for i in digest_items or []]}
    delivery.message = OutgoingMessage(
        delivery_id=delivery_id, recipient_id=recipient_id, address=address, type=type_,
        priority=priority, title=title, body=body, data=data or {}, recipient_name=name,
        notification_id=notification_id, digest_id=digest_id,
    )
    return delivery


def address_of(
    address_field: str | None, channel: str, email: str | None, phone: str | None,
    addresses: dict[str, Any],
) -> str | None:
    """The recipient's address on a channel: its column (email, phone) or ``addresses``."""
    if address_field is None:
        return None
    column = {"email": email, "phone": phone}.get(address_field)
    value = column or addresses.get(address_field) or addresses.get(channel)
    return str(value) if value else None


def _never() -> bool:
    return False


# --- Recording ----------------------------------------------------------------------

#: Outcomes are written in bulk, one statement for all that came in since the last
#: write, as soon as this long has passed since it (or this many wait): a fast channel's
#: outcomes then cost a share of a statement each, while a slow channel's (each result
#: arriving later than this after the previous write) are written one by one, at once,
#: as before. What a killed worker leaves in doubt is the message in hand plus the
#: outcomes of at most this long (and at most this many): resent, with the same
#: idempotency key, as soon as the dead worker's claim is gone (``Claim``).
RECORD_EVERY_SECONDS = 0.05
RECORD_AT_MOST = 50

#: One write of many outcomes: each row's new status, attempts (added, or set for a
#: dead one), error, how long before the write it was known, and for a row put back,
#: its wait from then: its due time is Postgres's ``now()`` less the one plus the
#: other, so every due time is on Postgres's clock whatever the worker's says. Only rows
#: still ``sending`` under this batch's claim change (a row resumed elsewhere after the
#: claim's connection was lost is not ours any more). ``synchronous_commit`` is off for
#: this transaction alone (never for the session: a pooler such as PgBouncer would hand
#: that on to others):
#: a commit then costs no disk flush, and all it risks is losing the last few outcomes
#: if Postgres itself crashes, which means a resend, never a loss. (The status is tested
#: through ``coalesce`` so that the planner finds each row by its id: the index on
#: status would walk every row in flight whenever the statistics think them few.)
_RECORD = """
WITH async_commit AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))
UPDATE deliveries d SET
    status = v.status,
    attempts = coalesce(v.attempts_set, d.attempts + v.attempts_add),
    next_attempt_at = coalesce(now() + make_interval(secs => v.delay - v.ago),
                               d.next_attempt_at),
    last_error = v.error,
    sent_at = CASE WHEN v.status = 'sent' THEN now() - make_interval(secs => v.ago)
                   ELSE d.sent_at END,
    provider = coalesce(v.provider, d.provider),
    updated_at = now()
FROM unnest(%(ids)s::uuid[], %(statuses)s::text[], %(adds)s::int[], %(sets)s::int[],
            %(delays)s::float8[], %(errors)s::text[], %(agos)s::float8[],
            %(providers)s::text[])
         AS v(id, status, attempts_add, attempts_set, delay, error, ago, provider),
     async_commit
WHERE d.id = v.id AND coalesce(d.status, '') = 'sending' AND d.claim_key = %(key)s
RETURNING d.id, extract(epoch FROM d.sent_at - d.created_at)
"""


@dataclass
class _Pending:
    """One outcome waiting to be written (see ``RECORD_EVERY_SECONDS``)."""

    delivery: ClaimedDelivery
    status: str
    #: When it was known (``time.monotonic()``): a sent row's ``sent_at`` is that long
    #: before the write, on Postgres's clock.
    at: float
    attempts_add: int = 0
    #: Sent: the provider that sent it (``deliveries.provider``).
    provider: str | None = None
    #: A dead delivery's attempts, set rather than added.
    attempts_set: int | None = None
    #: Put back: seconds from ``at`` until it is due again.
    delay: float | None = None
    error: str | None = None
    dead_letter: FailedDelivery | None = None


class _Recorder:
    """Records each outcome in bulk (see ``RECORD_EVERY_SECONDS``), on a connection of
    its own in autocommit mode; whatever is still waiting is written when the batch
    ends, also when it ends by an exception (each outcome is a fact: a message sent)."""

    def __init__(
        self, channel: str, settings: Settings, outcome: BatchOutcome, claim: Claim,
        batch_size: BatchSize | None = None, stopping: Callable[[], bool] | None = None,
    ) -> None:
        self.channel = channel
        self.claim = claim
        self.settings = settings
        self.outcome = outcome
        self.batch_size = batch_size
        self.stopping = stopping or _never
        self.policy = RetryPolicy.for_channel(settings, {})
        self._pending: list[_Pending] = []
        #: Whole seconds of ``time.monotonic()`` -> the retries due then (a countdown).
        self._short_retries: dict[int, list[uuid.UUID]] = defaultdict(list)
        self._sent_notifications: list[uuid.UUID] = []
        self._failed_notifications: list[uuid.UUID] = []
        #: Notifications with a delivery ended untried on the suppression list, and why.
        self._suppressed_notifications: dict[uuid.UUID, str] = {}
        self._configuration_errors: dict[str, list[str]] = defaultdict(list)
        self._started = self._written = time.monotonic()
        #: The connection was cut under a claim that waited too long (``take``).
        self._cut_off = False
        #: The provider sending now (``_send_through``): a sent row records it.
        self.provider: str | None = None
        #: While a further provider may take them: where a provider's failures go
        #: instead of being recorded (``_send_claimed``).
        self.passing_on: list[_Passed] | None = None

    def should_stop(self) -> bool:
        """Return the rest of the batch: the worker is stopping, the batch has run past
        its time budget (a slow provider must not hold a worker's shutdown), or the
        claim was lost (its rows may be resumed elsewhere already)."""
        return self.stopping() or (
            time.monotonic() - self._started > self.settings.delivery_batch_max_seconds
        ) or self.claim.lost()

    def stop_reason(self) -> str:
        if self.claim.lost():
            return "returned unsent: the claim's Postgres connection was lost"
        if self.stopping():
            return "returned unsent: the worker is shutting down"
        budget = self.settings.delivery_batch_max_seconds
        return f"returned unsent: the batch ran past {budget:g}s"

    def __enter__(self) -> _Recorder:
        self.connection = get_engine().raw_connection()
        self.driver = cast("psycopg.Connection[Any]", self.connection.driver_connection)
        self.driver.autocommit = True
        self.cursor = self.driver.cursor()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._cut_off:  # it claimed nothing: nothing to write
            self.connection.invalidate()
            return
        try:
            if exc_info[0] is None:
                self._finish()
            else:
                self._write_quietly()
        finally:
            self.driver.autocommit = False
            self.connection.close()

    def take(self, delivery_ids: Sequence[str]) -> list[ClaimedDelivery]:
        """Claim the batch's deliveries for its claim (``claim_deliveries``), within
        ``delivery_claim_wait``, or raise ``ClaimStarved`` having claimed nothing
        this batch will send. The claim's connection is held meanwhile (``Claim``).

        How long a client waits for a server connection behind PgBouncer is not the
        client's to set (``query_wait_timeout`` is the pooler's, for every client), and
        PgBouncer forwards a cancel request only for a client that has a server: one
        for a client still queued is dropped ("cancel request for idle client", seen
        on Debian 12's 1.18). So ``_Deadline`` shuts the socket down under the waiting
        call; PgBouncer forgets a queued client that hangs up, and its statement never
        reaches Postgres. One that reached Postgres just then may still commit: its
        rows carry this claim's key, whose lock goes when the batch gives the claim
        back, so they are free for the next claim or the sweep, and were never sent.
        """
        claimed: list[ClaimedDelivery] = []
        with _Deadline(self.driver, self.settings.delivery_claim_wait) as deadline:
            try:
                with self.transaction() as cursor:
                    claimed = claim_deliveries(cursor, self.channel, delivery_ids,
                                               self.settings, self.claim.key)
            except psycopg.Error:
                if not deadline.passed:
                    raise
        if deadline.passed:  # final once the deadline is left
            self._cut_off = True
            raise ClaimStarved(
                f"no second database connection within {self.settings.delivery_claim_wait:g}s"
                " (NOTIFIER_DELIVERY_CLAIM_WAIT)")
        return claimed

    @contextmanager
    def transaction(self) -> Iterator[Cursor[Any]]:
        """A transaction on the recorder's connection whose commit flushes nothing to
        disk (``SET LOCAL``: the session keeps its setting; see ``_RECORD``)."""
        with self.driver.transaction():
            self.cursor.execute("SET LOCAL synchronous_commit = off")
            yield self.cursor

    def result(self, delivery: ClaimedDelivery, result: SendResult) -> None:
        if self.provider is not None:
            self._count_provider(result)
        if result.sent:
            self.sent(delivery)
        elif (self.passing_on is not None and result.error is not None
              and result.error.provider_failure):
            self.passing_on.append(_Passed(delivery, self.provider or "", result.error))
        elif isinstance(result.error, ConfigurationError):
            self.hold_for_configuration(delivery, result.error)
        elif isinstance(result.error, RetryableError):
            self.retry(delivery, result.error)
        else:
            self.dead(delivery, result.error or PermanentError("unknown failure"))

    def _count_provider(self, result: SendResult) -> None:
        kind = "sent" if result.sent else (
            "provider_error" if result.error and result.error.provider_failure
            else "other_error")
        self.outcome.by_provider[(self.provider or "", kind)] += 1

    def sent(self, delivery: ClaimedDelivery) -> None:
        self._add(_Pending(delivery, "sent", time.monotonic(), attempts_add=1,
                           provider=self.provider))
        self.outcome.sent += 1
        if delivery.notification_id:
            self._sent_notifications.append(delivery.notification_id)

    def retry(self, delivery: ClaimedDelivery, error: RetryableError) -> None:
        attempts = delivery.attempts + 1
        retry = next_attempt(self.policy, attempts, error.retry_after)
        if retry is None:
            self.dead(delivery, error, f"gave up after {attempts} attempts: {error}")
            return
        self._hold(delivery, retry.delay, str(error), counts_attempt=True)
        self.outcome.retrying += 1
        log.info("delivery %s (%s) failed, attempt %d, retrying in %.1fs: %s", delivery.id,
                 self.channel, attempts, retry.delay, error, extra=self.about(delivery))

    def hold_for_configuration(self, delivery: ClaimedDelivery, error: DeliveryError) -> None:
        """Our configuration failed, not the delivery: put it back for
        ``breaker_open_seconds`` with no attempt counted, so it can never run out of
        attempts (nor be dead-lettered) over a mistake only the operator can fix. The
        error is logged once per batch and reason (``_finish``)."""
        self._hold(delivery, self.settings.breaker_open_seconds, str(error),
                   counts_attempt=False)
        self.outcome.rescheduled += 1
        self._configuration_errors[str(error)].append(str(delivery.id))

    def release(self, deliveries: Iterable[ClaimedDelivery], wait: float, why: str) -> None:
        """Put deliveries back, untried, for ``wait`` seconds."""
        wait = max(wait, 0.0)
        held = []
        for delivery in deliveries:
            self._hold(delivery, wait, why, counts_attempt=False)
            self.outcome.rescheduled += 1
            held.append(str(delivery.id))
        if held:
            log.info("%d deliveries (%s) put back for %.1f s: %s", len(held), self.channel,
                     wait, why, extra={"channel": self.channel, "delivery_ids": held})

    def _hold(
        self, delivery: ClaimedDelivery, delay: float, why: str, *, counts_attempt: bool
    ) -> None:
        """Put back for ``delay`` seconds: a wait, its due time taken from Postgres's
        clock when written (``_RECORD``); a short one also rides on a countdown."""
        at = time.monotonic()
        self._add(_Pending(delivery, "retrying", at, delay=delay, error=why,
                           attempts_add=1 if counts_attempt else 0))
        second = countdown_second(delay, at, self.settings.retry_countdown_max)
        if second is not None:
            self._short_retries[second].append(delivery.id)

    def dead(
        self, delivery: ClaimedDelivery, error: DeliveryError, reason: str | None = None
    ) -> None:
        """Park the delivery in dead_letters with its content, written in the same
        transaction as its status."""
        attempts = delivery.attempts + (0 if delivery.message is None else 1)
        letter = FailedDelivery(
            delivery.id, self.channel, delivery.recipient_id, delivery.priority, attempts,
            reason or str(error), type(error).__name__, delivery.message,
        )
        self._add(_Pending(delivery, "dead", time.monotonic(), attempts_set=attempts,
                           error=str(error), dead_letter=letter))
        self.outcome.dead += 1
        if delivery.notification_id:
            self._failed_notifications.append(delivery.notification_id)
        log.warning("delivery %s (%s) is dead: %s", delivery.id, self.channel, reason or error,
                    extra=self.about(delivery))

    def suppressed(self, delivery: ClaimedDelivery, reason: str) -> None:
        """End it untried: its address is on the suppression list."""
        self._add(_Pending(delivery, "suppressed", time.monotonic(), error=reason))
        self.outcome.suppressed += 1
        if delivery.notification_id:
            self._suppressed_notifications[delivery.notification_id] = reason

    def about(self, delivery: ClaimedDelivery) -> dict[str, Any]:
        """What a log line about one delivery names (see ``notifier.logs``)."""
        about: dict[str, Any] = {"delivery_id": str(delivery.id), "channel": self.channel}
        if delivery.notification_id:
            about["notification_id"] = str(delivery.notification_id)
        elif delivery.message and delivery.message.digest_id:
            about["digest_id"] = str(delivery.message.digest_id)
        return about

    # --- writing the outcomes ---------------------------------------------------------

    def _add(self, pending: _Pending) -> None:
        """Keep the outcome; write every waiting one if the last write is
        ``RECORD_EVERY_SECONDS`` old or ``RECORD_AT_MOST`` wait."""
        self._pending.append(pending)
        if (len(self._pending) >= RECORD_AT_MOST
                or time.monotonic() - self._written >= RECORD_EVERY_SECONDS):
            self.write()

    def write(self) -> None:
        """Write every waiting outcome: one statement (with the dead letters, if any,
        in its transaction). Should the batch's statement fail for a reason that is not
        Postgres being away (a value it refuses), each is written alone, so that one
        bad outcome costs itself alone (it stays ``sending``: resent once the batch ends)."""
        pending, self._pending = self._pending, []
        self._written = time.monotonic()
        if not pending:
            return
        try:
            self._write(pending)
        except psycopg.OperationalError:
            raise
        except Exception:
            if len(pending) == 1:
                raise
            log.exception("%d outcomes (%s) could not be written together; writing each"
                          " alone", len(pending), self.channel)
            for one in pending:
                try:
                    self._write([one])
                except psycopg.OperationalError:
                    raise
                except Exception:
                    log.exception("the outcome of delivery %s (%s) could not be written",
                                  one.delivery.id, self.channel, extra=self.about(one.delivery))

    def _write(self, pending: list[_Pending]) -> None:
        letters = [p.dead_letter for p in pending if p.dead_letter is not None]
        now = time.monotonic()
        parameters = {
            "ids": [p.delivery.id for p in pending],
            "statuses": [p.status for p in pending],
            "adds": [p.attempts_add for p in pending],
            "sets": [p.attempts_set for p in pending],
            "delays": [p.delay for p in pending],
            "errors": [None if p.error is None else _storable(p.error) for p in pending],
            "agos": [max(now - p.at, 0.0) for p in pending],
            "providers": [p.provider for p in pending],
            "key": self.claim.key,
        }
        if letters:
            with self.transaction() as cursor:
                written = self._update(cursor, parameters, pending)
                write_delivery_dead_letters(
                    cursor, [letter for letter in letters if letter.id in written])
        else:
            self._update(self.cursor, parameters, pending)

    def _update(
        self, cursor: Cursor[Any], parameters: dict[str, Any], pending: list[_Pending]
    ) -> set[uuid.UUID]:
        """The statement itself; the sent rows' latencies go to the outcome."""
        cursor.execute(_RECORD, parameters)
        written: dict[uuid.UUID, Any] = dict(cursor.fetchall())
        sent = (written.get(p.delivery.id) for p in pending if p.status == "sent")
        self.outcome.latencies += [max(float(s), 0.0) for s in sent if s is not None]
        return set(written)

    def _write_quietly(self) -> None:
        """The batch failed: still write what is known, if Postgres takes it."""
        try:
            self.write()
        except Exception:
            log.exception("outcomes of a failed %s batch not written; their deliveries"
                          " are resent once the batch's claim ends", self.channel)

    def _finish(self) -> None:
        """Every outcome still waiting, the notifications' own status, the short retries
        to publish, and one error line per configuration problem that held deliveries."""
        self.write()
        for reason, held in self._configuration_errors.items():
            log.error("%d deliveries (%s) held: our configuration is wrong: %s", len(held),
                      self.channel, reason, extra={"channel": self.channel,
                                                   "delivery_ids": held})
        if not (self._sent_notifications or self._failed_notifications
                or self._suppressed_notifications or self._short_retries):
            return
        with self.transaction() as cursor:
            if self._sent_notifications:
                cursor.execute(
                    "UPDATE notifications SET status = 'delivered',"
                    " updated_at = clock_timestamp()"
                    " WHERE id = ANY(%s) AND status IN ('dispatched', 'failed')",
                    (self._sent_notifications,),
                )
            if self._failed_notifications:
                cursor.execute(
                    "UPDATE notifications SET status = 'failed', updated_at = clock_timestamp()"
                    " WHERE id = ANY(%s) AND status = 'dispatched'",
                    (self._failed_notifications,),
                )
            if self._suppressed_notifications:
                # Only once every delivery of it was suppressed: one on another channel
                # may still go out (then it ends delivered, as with any other).
                suppressed = self._suppressed_notifications
                cursor.execute(
                    "UPDATE notifications AS n SET status = 'suppressed',"
                    " status_reason = r.reason, updated_at = clock_timestamp()"
                    " FROM unnest(%s::uuid[], %s::text[]) AS r(id, reason)"
                    " WHERE n.id = r.id AND n.status = 'dispatched' AND NOT EXISTS ("
                    "   SELECT 1 FROM deliveries d WHERE d.notification_id = n.id"
                    "   AND d.status <> 'suppressed')",
                    (list(suppressed), list(suppressed.values())),
                )
            for second, ids in sorted(self._short_retries.items()):
                self.outcome.tasks += queue_deliveries(
                    cursor, ids, self.settings, from_status="retrying",
                    delay=max(second - time.monotonic(), 0.0), batch_size=self.batch_size,
                )


def _storable(text: str) -> str:
    """Error text as a text column holds it (no NUL, no lone surrogate): a channel may
    quote anything a server answered."""
    return cast(str, jsonb_safe(text))


def circuit_states(settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    """Each channel's circuit breaker as every worker sees it (state kept in Redis), with
    each provider's under ``providers``. Among several providers, the channel's state is
    its best provider's (it sends while one can), its failures and times opened are
    theirs summed, and it opens until the first of them half-opens."""
    settings = settings or get_settings()
    return {name: _channel_circuit(name, settings) for name in sorted(CHANNEL_NAMES)}


def _channel_circuit(name: str, settings: Settings) -> dict[str, Any]:
    names = provider_names(name, settings)
    if len(names) <= 1:
        described = circuit_breaker(state_redis(), name, settings).describe()
        return {**described, "providers": {n: described for n in names}}
    providers = {
        n: circuit_breaker(state_redis(), circuit_name(name, n, len(names)), settings).describe()
        for n in names
    }
    circuits = list(providers.values())
    rank = {"closed": 0, "half_open": 1, "open": 2}
    best = min(circuits, key=lambda c: rank.get(str(c["state"]), 2))
    opens = [float(cast(float, c["open_until"])) for c in circuits
             if c["state"] == "open" and c["open_until"]]
    return {
        "state": best["state"],
        "recent_failures": sum(cast(int, c["recent_failures"]) for c in circuits),
        "open_until": min(opens) if best["state"] == "open" and opens else None,
        "times_opened": sum(cast(int, c["times_opened"]) for c in circuits),
        "providers": providers,
    }
