"""Prometheus metrics: counted where the work happens, scraped from one endpoint.

Celery's prefork pool runs tasks in child processes, so the counters live in
prometheus-client's multiprocess mode: every process writes its values to files in one
directory, and the endpoint adds them up. That directory must be chosen before
the metrics are made, which is why this module sets ``PROMETHEUS_MULTIPROC_DIR`` at the
top (``NOTIFIER_METRICS_DIR``, else a directory per user under the system's temporary
directory).

What the code counts (ingest, delivery, flush) is recorded here by the Celery tasks.
What is a property of the whole pipeline (queue depths, circuit states, the age of the
oldest waiting notification, batch efficiency over the last hour) is read from Redis
and Postgres when the endpoint is scraped, by :class:`PipelineCollector`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from notifier.settings import Settings, get_settings, metrics_directory


def multiprocess_dir(settings: Settings | None = None) -> str:
    """``NOTIFIER_METRICS_DIR``, else prometheus-client's own variable, else /tmp's."""
    return metrics_directory(settings or get_settings())


# Set, not defaulted: a worker started by a process that had a directory of its own
# (inherited in its environment) must use the one its settings name.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiprocess_dir()
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from prometheus_client import (  # noqa: E402  (after the directory is chosen)
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client import values as _values  # noqa: E402
from prometheus_client.core import GaugeMetricFamily  # noqa: E402

# `celery` itself may have imported prometheus-client already (Flower's command plugin
# does), before the directory was set: choose the multiprocess value class again, for
# the metrics made below.
_values.ValueClass = _values.get_value_class()

#: Latency buckets in seconds: tens of milliseconds (critical) to minutes (retries).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
#: Notification types are the callers' to choose; past this many, new ones count as
#: "other" so that a caller inventing types cannot blow up the series count.
MAX_TYPE_LABELS = 200

NOTIFICATIONS_INGESTED = Counter(
    "notifier_notifications_ingested_total",
    "Notifications stored by ingest.", ["priority", "type"],
)
NOTIFICATIONS_ROUTED = Counter(
    "notifier_notifications_routed_total",
    "What ingest decided for stored notifications: dispatched, pending (in a window),"
    " suppressed.", ["status"],
)
INGEST_LATENCY = Histogram(
    "notifier_ingest_latency_seconds",
    "From the producer's enqueue to the commit of the ingest batch (per message).",
    buckets=LATENCY_BUCKETS,
)
DELIVERIES = Counter(
    "notifier_deliveries_total",
    "Delivery attempts by outcome: sent, retrying, dead, rescheduled (circuit open or rate"
    " limited, no attempt counted), suppressed (address on the suppression list, not"
    " attempted).", ["channel", "outcome"],
)
CALLBACKS = Counter(
    "notifier_callbacks_total",
    "Status callbacks by outcome: sent, retrying, dead (parked: refused or out of"
    " attempts), held (the receiver's circuit open, no attempt counted), skipped.",
    ["outcome"],
)
PROVIDER_RESULTS = Counter(
    "notifier_provider_results_total",
    "Messages each provider of a channel answered, by result: sent, provider_error (its"
    " fault: counts towards its circuit, and fails over to the next provider if there is"
    " one), other_error (the recipient's, or ours).", ["channel", "provider", "result"],
)
FAILOVERS = Counter(
    "notifier_failovers_total",
    "Deliveries a provider passed on to the channel's next provider within the same"
    " attempt (it failed on them, or its circuit opened under the batch).",
    ["channel", "provider"],
)
DELIVERY_LATENCY = Histogram(
    "notifier_delivery_latency_seconds",
    "From the delivery row's commit to the channel accepting it.", ["channel"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "notifier_batch_size",
    "Items per batch: ingest (notifications per transaction), deliver (deliveries per"
    " task), flush (windows per transaction).", ["stage"], buckets=BATCH_BUCKETS,
)
BATCH_SIZE_CHOSEN = Gauge(
    "notifier_batch_size_chosen",
    "The batch size the adaptive sizing chose last, per stage.", ["stage"],
    multiprocess_mode="livemax",
)
DIGESTED_NOTIFICATIONS = Counter(
    "notifier_digested_notifications_total", "Notifications folded into digests."
)
DIGESTS = Counter("notifier_digests_total", "Digests written by the flush.")
DEAD_LETTERS = Counter(
    "notifier_dead_letters_total", "Items parked in dead_letters, by stage.", ["stage"]
)

_types_seen: set[str] = set()


def _type_label(type_: str) -> str:
    if type_ in _types_seen or len(_types_seen) < MAX_TYPE_LABELS:
        _types_seen.add(type_)
        return type_
    return "other"


# --- Recording (called by the tasks) ------------------------------------------------


def record_ingest(
    kinds: dict[tuple[str, str], int], routed: dict[str, int], rejected: int,
    enqueued: Iterable[datetime | None], batch_size: int,
) -> None:
    """One committed ingest batch: what was stored, how it was routed, how long it took."""
    for (priority, type_), count in kinds.items():
        NOTIFICATIONS_INGESTED.labels(priority, _type_label(type_)).inc(count)
    for status, count in routed.items():
        NOTIFICATIONS_ROUTED.labels(status).inc(count)
    if rejected:
        DEAD_LETTERS.labels("ingest").inc(rejected)
    now = datetime.now(UTC)
    for stamp in enqueued:
        if stamp is not None:
            INGEST_LATENCY.observe(max((now - stamp).total_seconds(), 0.0))
    BATCH_SIZE.labels("ingest").observe(batch_size)


def record_delivery(
    channel: str, outcomes: dict[str, int], latencies: Sequence[float], batch_size: int,
    by_provider: Mapping[tuple[str, str], int] | None = None,
    failovers: Mapping[str, int] | None = None,
) -> None:
    for (provider, result), count in (by_provider or {}).items():
        PROVIDER_RESULTS.labels(channel, provider, result).inc(count)
    for provider, count in (failovers or {}).items():
        FAILOVERS.labels(channel, provider).inc(count)
    for outcome, count in outcomes.items():
        if count:
            DELIVERIES.labels(channel, outcome).inc(count)
    if outcomes.get("dead"):
        DEAD_LETTERS.labels("deliver").inc(outcomes["dead"])
    histogram = DELIVERY_LATENCY.labels(channel)
    for seconds in latencies:
        histogram.observe(seconds)
    BATCH_SIZE.labels("deliver").observe(batch_size)


def record_callbacks(outcomes: Mapping[str, int]) -> None:
    """A callback batch's outcomes: sent, retrying, dead (parked), held (circuit open),
    skipped (another task had them)."""
    for outcome, count in outcomes.items():
        if count:
            CALLBACKS.labels(outcome).inc(count)


def record_flush(windows: int, digests: int, digested: int) -> None:
    if windows:
        BATCH_SIZE.labels("flush").observe(windows)
    DIGESTS.inc(digests)
    DIGESTED_NOTIFICATIONS.inc(digested)


def record_batch_size_chosen(stage: str, size: int) -> None:
    BATCH_SIZE_CHOSEN.labels(stage).set(size)


def process_exited(pid: int) -> None:
    """A pool process is gone: drop its live gauges (its counters stay counted)."""
    multiprocess.mark_process_dead(pid)


def remove_files_of_dead_processes(path: str | None = None) -> int:
    """At worker start: drop the live gauges of processes that no longer exist (a
    previous run); their counters stay counted. Returns how many processes that was."""
    path = path or os.environ["PROMETHEUS_MULTIPROC_DIR"]
    pids = set()
    for name in os.listdir(path):
        stem, _, suffix = name.rpartition("_")
        digits = suffix.removesuffix(".db")
        if stem and digits.isdigit():
            pids.add(int(digits))
    dead = [pid for pid in pids if not _alive(pid)]
    for pid in dead:
        multiprocess.mark_process_dead(pid, path)
    return len(dead)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- Scraping -----------------------------------------------------------------------


class PipelineCollector:
    """Gauges read at scrape time from Redis and Postgres: one answer for the pipeline,
    whichever worker serves it."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._queues()
        yield from self._circuits()
        yield from self._database()

    def _queues(self) -> Iterator[GaugeMetricFamily]:
        from notifier.worker.queues import queue_depths

        family = GaugeMetricFamily("notifier_queue_depth", "Messages waiting in each queue.",
                                   labels=["queue"])
        try:
            depths = queue_depths()
        except Exception:  # broker away: the health command reports it; no gauge here
            return
        for queue, depth in depths.items():
            if depth is not None:
                family.add_metric([queue], depth)
        yield family

    def _circuits(self) -> Iterator[GaugeMetricFamily]:
        from notifier.pipeline.delivery import circuit_states

        family = GaugeMetricFamily(
            "notifier_circuit_state",
            "Circuit breaker per channel and provider (provider empty: the channel's own,"
            " for a channel not configured): 0 closed, 1 half-open, 2 open.",
            labels=["channel", "provider"],
        )
        try:
            states = circuit_states()
        except Exception:
            return
        codes = {"closed": 0, "half_open": 1, "half-open": 1, "open": 2}
        for channel, state in states.items():
            circuits = state.get("providers") or {"": state}
            for provider, circuit in circuits.items():
                family.add_metric([channel, provider], codes.get(str(circuit["state"]), 0))
        yield family

    def _database(self) -> Iterator[GaugeMetricFamily]:
        from sqlalchemy import text

        from notifier.pipeline.lag import pipeline_lag
        from notifier.storage.db import session_scope

        try:
            with session_scope() as session:
                lag = pipeline_lag(session)
                received, messages = session.execute(text(_LAST_HOUR_QUERY)).one()
        except Exception:
            return
        yield GaugeMetricFamily(
            "notifier_oldest_waiting_notification_seconds",
            "Age of the oldest notification not yet handed to a channel (pending in a"
            " window, or with a due delivery not yet sent).", value=lag.oldest_pending or 0.0,
        )
        yield GaugeMetricFamily(
            "notifier_oldest_due_delivery_seconds",
            "How long the most overdue unsent delivery has been due.",
            value=lag.delivery_overdue or 0.0,
        )
        yield GaugeMetricFamily(
            "notifier_batch_efficiency",
            "Notifications stored per message created for them in the last hour (digests"
            " and suppression make it exceed 1).",
            value=float(received) / messages if messages else 0.0,
        )


_LAST_HOUR_QUERY = """
SELECT
    (SELECT count(*) FROM notifications WHERE created_at > now() - interval '1 hour'),
    (SELECT count(*) FROM deliveries WHERE created_at > now() - interval '1 hour')
"""


def registry(settings: Settings | None = None) -> CollectorRegistry:
    """Every worker process's counters plus the pipeline's gauges."""
    collected = CollectorRegistry()
    multiprocess.MultiProcessCollector(collected)
    collected.register(PipelineCollector(settings))
    return collected


def exposition(settings: Settings | None = None) -> tuple[bytes, str]:
    """The text a scrape gets, and its content type."""
    return generate_latest(registry(settings)), CONTENT_TYPE_LATEST


def serve(address: str, port: int, settings: Settings | None = None) -> Any:
    """Answer scrapes on ``address:port`` from a daemon thread; returns the server."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=address, registry=registry(settings))
    return server
