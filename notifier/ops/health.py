"""Health checks for probes: is each part of the pipeline up, and is work moving?

``notifier health`` runs these checks at once, each bounded by a timeout, and passes
only when all pass:

* **broker** — reachable;
* **database** — reachable, and its schema at the newest migration this code ships;
* **state** — the state Redis (circuit breakers, rate limits, the heartbeat) answers a
  PING where its commands go now: behind Sentinel, the master the Sentinels name (the
  line says which); a Redis Cluster, every master;
* **workers** — at least the minimum number answer a ``celery control ping``;
* **beat** — beat's heartbeat is recent, and a worker ran it. Beat sends
  ``notifier.heartbeat`` on the critical delivery queue; the publishing process stamps
  the time it sent it into the message and into Redis, the worker that runs it writes
  that time and its own clock to Redis. So a stopped beat ("last tick 94 s ago") is told
  apart from beat ticking with nobody consuming its queue ("no worker ran it");
* **queues** — no queue holds more messages than the limit;
* **pending** — nothing that should be moving has waited longer than the limit: a
  delivery due and not sent, an aggregation window past its due time, a pending
  notification in no window. Notifications waiting in their window, or deliveries held
  for quiet hours, are waiting on purpose and do not count;
* **api** — when ``NOTIFIER_API_URL`` is set: the HTTP API answers ``GET /v1/health``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from notifier.pipeline.lag import pipeline_lag
from notifier.settings import Settings, delivery_queue, mask_url
from notifier.storage.models import UNSENT_DELIVERY_STATUSES, sql_list
from notifier.worker.heartbeat import Heartbeat, read_heartbeat

CHECK_NAMES: tuple[str, ...] = (
    "broker", "database", "state", "workers", "beat", "queues", "pending", "api",
)


def default_checks(settings: Settings) -> tuple[str, ...]:
    """Every check, the API's only where it is configured (``NOTIFIER_API_URL``)."""
    return tuple(name for name in CHECK_NAMES if name != "api" or settings.api_url)


@dataclass(frozen=True)
class Thresholds:
    """What a check accepts; from the settings, each overridable (CLI options)."""

    max_queue_depth: int
    max_pending_age: float
    beat_max_age: float
    min_workers: int
    ping_timeout: float
    timeout: float

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Thresholds:
        thresholds = cls(
            max_queue_depth=settings.health_max_queue_depth,
            max_pending_age=settings.health_max_pending_age,
            beat_max_age=settings.health_beat_max_age,
            min_workers=settings.health_min_workers,
            ping_timeout=settings.health_ping_timeout,
            timeout=settings.health_timeout,
        )
        return replace(thresholds, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    #: One line for a person: "head 0003, 12 ms", "last tick 94 s ago (limit 30 s)".
    summary: str
    elapsed_ms: float = 0.0
    #: The figures behind the summary, for ``--json``.
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthReport:
    checks: list[CheckResult]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(check) for check in self.checks]}


def seconds(value: float) -> str:
    """A duration for a summary line: "0.4 s", "94 s"."""
    return f"{value:.1f} s" if abs(value) < 10 else f"{value:.0f} s"


# --- Running the checks -------------------------------------------------------------


def run_checks(
    settings: Settings, thresholds: Thresholds, names: Iterable[str] | None = None
) -> HealthReport:
    """Run the named checks in parallel; a check still running at the deadline fails.

    The threads are daemons: a check stuck on a dead host cannot hold up the answer or
    the exit of a probe.
    """
    wanted = set(default_checks(settings) if names is None else names)
    chosen = [name for name in CHECK_NAMES if name in wanted]
    _prepare(chosen)
    results: dict[str, CheckResult] = {}
    threads = []
    for name in chosen:
        thread = threading.Thread(
            target=_run_one, args=(name, CHECKS[name], settings, thresholds, results),
            name=f"health-{name}", daemon=True,
        )
        thread.start()
        threads.append(thread)
    limit = 2 * thresholds.timeout + thresholds.ping_timeout + 1
    deadline = time.monotonic() + limit
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return HealthReport([
        results.get(name) or CheckResult(name, False, f"no answer within {seconds(limit)}",
                                         limit * 1000)
        for name in chosen
    ])


def _prepare(chosen: list[str]) -> None:
    """Import and set up in this thread what the checks use: the Celery app is not set up
    racing in several threads, and a slow import does not count as a slow answer."""
    if {"broker", "workers", "queues"} & set(chosen):
        from notifier.worker.app import app

        app.finalize(auto=True)
        _ = app.amqp, app.control, app.connection_for_write().transport
    if {"database", "pending"} & set(chosen):
        import alembic.runtime.migration  # noqa: F401
        import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401

        from notifier.storage.migrate import head_revision

        head_revision()
    if {"beat", "state"} & set(chosen):
        import redis  # noqa: F401

        import notifier.storage.state  # noqa: F401


def _run_one(
    name: str, check: Callable[[Settings, Thresholds], CheckResult], settings: Settings,
    thresholds: Thresholds, results: dict[str, CheckResult],
) -> None:
    started = time.perf_counter()
    try:
        result = check(settings, thresholds)
    except Exception as exc:  # a probe reports every failure as a FAIL line, never a trace
        result = CheckResult(name, False, f"{type(exc).__name__}: {_one_line(exc)}")
    elapsed = (time.perf_counter() - started) * 1000
    results[name] = replace(result, elapsed_ms=round(elapsed, 1))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


# --- broker, workers, queues --------------------------------------------------------


def _broker_connection(settings: Settings, thresholds: Thresholds) -> Any:
    """A connected broker connection, or a one-line error at once (no retries)."""
    from kombu.exceptions import OperationalError

    from notifier.worker.app import app

    connection = app.connection_for_write(connect_timeout=thresholds.timeout)
    try:
        connection.ensure_connection(max_retries=0, timeout=thresholds.timeout)
    except (OperationalError, OSError) as exc:
        connection.release()
        raise BrokerUnreachable(
            f"cannot reach {mask_url(settings.broker_url)}: {_one_line(exc)}"
        ) from None
    return connection


class BrokerUnreachable(Exception):
    pass


def check_broker(settings: Settings, thresholds: Thresholds) -> CheckResult:
    started = time.perf_counter()
    try:
        connection = _broker_connection(settings, thresholds)
    except BrokerUnreachable as exc:
        return CheckResult("broker", False, str(exc))
    with connection:
        client = getattr(connection.default_channel, "client", None)
        if client is not None and hasattr(client, "ping"):  # Redis: one more round trip
            client.ping()
    elapsed = (time.perf_counter() - started) * 1000
    url = mask_url(settings.broker_url)
    return CheckResult("broker", True, f"{url}, {elapsed:.0f} ms",
                       details={"url": url, "round_trip_ms": round(elapsed, 1)})


def check_workers(settings: Settings, thresholds: Thresholds) -> CheckResult:
    from notifier.worker.app import app

    try:
        connection = _broker_connection(settings, thresholds)
    except BrokerUnreachable as exc:
        return CheckResult("workers", False, f"cannot ping: {exc}")
    with connection:
        replies = app.control.ping(timeout=thresholds.ping_timeout, connection=connection)
    names = sorted(name for reply in replies for name in reply)
    ok = len(names) >= thresholds.min_workers
    listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    summary = (f"{len(names)} answering within {seconds(thresholds.ping_timeout)}"
               f"{': ' + listed if names else ''} (min {thresholds.min_workers})")
    return CheckResult("workers", ok, summary, details={"workers": names, "count": len(names)})


def check_queues(settings: Settings, thresholds: Thresholds) -> CheckResult:
    from notifier.worker.queues import queue_depths

    try:
        _broker_connection(settings, thresholds).release()
    except BrokerUnreachable as exc:
        return CheckResult("queues", False, str(exc))
    return judge_queue_depths(queue_depths(), thresholds.max_queue_depth)


def judge_queue_depths(depths: Mapping[str, int | None], limit: int) -> CheckResult:
    known = {name: depth for name, depth in depths.items() if depth is not None}
    over = {name: depth for name, depth in known.items() if depth > limit}
    details = {"depths": dict(depths), "total": sum(known.values()), "limit": limit}
    if over:
        listed = ", ".join(f"{name} {depth}" for name, depth in
                           sorted(over.items(), key=lambda item: -item[1]))
        return CheckResult("queues", False, f"{listed} (limit {limit} per queue)",
                           details=details)
    if not any(known.values()):
        return CheckResult("queues", True, f"empty (limit {limit} per queue)", details=details)
    deepest = max(known, key=lambda name: known[name])
    return CheckResult(
        "queues", True,
        f"deepest {deepest} {known[deepest]}, {details['total']} in all"
        f" (limit {limit} per queue)",
        details=details,
    )


# --- database, pending --------------------------------------------------------------


def _engine(settings: Settings, thresholds: Thresholds) -> Any:
    import math

    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from notifier.storage.db import connect_args

    return create_engine(
        settings.database_url, poolclass=NullPool,
        connect_args={
            **connect_args(settings, "notifier health"),
            "connect_timeout": max(2, math.ceil(thresholds.timeout)),  # libpq's minimum
        },
    )


def _database_error(settings: Settings, exc: BaseException, connected: bool) -> str:
    from notifier.storage.db import describe_db_error

    if connected:
        return f"query failed: {describe_db_error(exc)}"
    return f"cannot connect to {mask_url(settings.database_url)}: {describe_db_error(exc)}"


def _query_database(
    settings: Settings, thresholds: Thresholds, query: Callable[[Any], Any]
) -> tuple[Any, str | None]:
    """(the query's result, None) or (None, one line saying what failed)."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    engine = _engine(settings, thresholds)
    connected = False
    try:
        with engine.connect() as connection:
            connected = True
            # For this transaction alone (a startup ``options`` would not pass PgBouncer).
            connection.execute(text("SELECT set_config('statement_timeout', :ms, true)"),
                               {"ms": f"{int(thresholds.timeout * 1000)}ms"})
            return query(connection), None
    except DBAPIError as exc:
        return None, _database_error(settings, exc, connected)
    finally:
        engine.dispose()


def check_database(settings: Settings, thresholds: Thresholds) -> CheckResult:
    from alembic.runtime.migration import MigrationContext

    from notifier.storage.migrate import head_revision

    head = head_revision()
    started = time.perf_counter()
    current, error = _query_database(
        settings, thresholds,
        lambda connection: MigrationContext.configure(connection).get_current_revision(),
    )
    if error:
        return CheckResult("database", False, error)
    elapsed = (time.perf_counter() - started) * 1000
    details = {"revision": current, "head": head}
    if current == head:
        return CheckResult("database", True, f"head {head}, {elapsed:.0f} ms", details=details)
    state = f"at {current}" if current else "no migrations applied"
    return CheckResult(
        "database", False, f"{state}, head is {head}: run `notifier db upgrade`", details=details
    )


@dataclass(frozen=True)
class StuckWork:
    """How long the oldest work that should be moving has waited (seconds; None: none).

    Waiting on purpose is left out: a notification inside its aggregation window, a
    delivery held until quiet hours end or a retry's backoff is over.
    """

    #: A delivery due (next_attempt_at passed) and not sent: pending, queued, retrying
    #: or scheduled. Its channel and status.
    delivery_overdue: float | None
    delivery_channel: str | None
    delivery_status: str | None
    #: Deliveries overdue by more than the limit.
    deliveries_over_limit: int
    #: An aggregation window past its due time, not flushed yet.
    window_overdue: float | None
    windows_over_limit: int
    #: A notification ``pending`` in no window (nothing will move it).
    unrouted_age: float | None
    #: Notifications waiting in windows on purpose, and their windows: not counted.
    waiting_in_windows: int
    windows: int

    @property
    def oldest(self) -> tuple[str, float] | None:
        ages = [(what, age) for what, age in (
            ("delivery", self.delivery_overdue), ("window", self.window_overdue),
            ("notification", self.unrouted_age),
        ) if age is not None and age > 0]
        return max(ages, key=lambda item: item[1]) if ages else None


# The parts of stuck work that the pipeline lag (``notifier.pipeline.lag.pipeline_lag``)
# does not answer: how many are over the limit, and what waits on purpose.
_STUCK_SQL = f"""
SELECT
    (SELECT count(*) FROM deliveries
     WHERE status IN ({sql_list(UNSENT_DELIVERY_STATUSES)})
       AND next_attempt_at < now() - make_interval(secs => :limit)),
    (SELECT count(*) FROM aggregation_windows
     WHERE due_at < now() - make_interval(secs => :limit)),
    -- Found through the end of the window_id index, where NULLs sort: the scan of all
    -- pending notifications runs only when one is in no window (never, normally).
    CASE WHEN (SELECT window_id IS NULL FROM notifications WHERE status = 'pending'
               ORDER BY window_id DESC LIMIT 1)
         THEN extract(epoch FROM now() - (
             SELECT min(created_at) FROM notifications
             WHERE status = 'pending' AND window_id IS NULL))
    END,
    ww.waiting, ww.windows
FROM (SELECT coalesce(sum(item_count), 0) AS waiting, count(*) AS windows
      FROM aggregation_windows) AS ww
"""


def stuck_work(connection: Connection | Session, limit: float) -> StuckWork:
    """The oldest work that should be moving, by kind (each an index lookup), in one
    transaction (one ``now()``)."""
    from sqlalchemy import text

    lag = pipeline_lag(connection)
    row = connection.execute(text(_STUCK_SQL), {"limit": limit}).one()
    return StuckWork(
        delivery_overdue=lag.delivery_overdue, delivery_channel=lag.delivery_channel,
        delivery_status=lag.delivery_status, deliveries_over_limit=int(row[0]),
        window_overdue=lag.window_overdue, windows_over_limit=int(row[1]),
        unrouted_age=_float(row[2]), waiting_in_windows=int(row[3]), windows=int(row[4]),
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def check_pending(settings: Settings, thresholds: Thresholds) -> CheckResult:
    stuck, error = _query_database(
        settings, thresholds,
        lambda connection: stuck_work(connection, thresholds.max_pending_age),
    )
    if error:
        return CheckResult("pending", False, error)
    return judge_stuck_work(stuck, thresholds.max_pending_age)


def judge_stuck_work(stuck: StuckWork, limit: float) -> CheckResult:
    details = {**asdict(stuck), "limit": limit}
    waiting = (f"; {stuck.waiting_in_windows} waiting in {stuck.windows} windows"
               if stuck.windows else "")
    oldest = stuck.oldest
    if oldest is None:
        return CheckResult("pending", True, f"nothing overdue (limit {seconds(limit)}){waiting}",
                           details=details)
    what, age = oldest
    if what == "delivery":
        text = (f"a delivery ({stuck.delivery_channel}, {stuck.delivery_status}) due"
                f" {seconds(age)} ago")
        if stuck.deliveries_over_limit > 1:
            text += f", {stuck.deliveries_over_limit} due for over {seconds(limit)}"
    elif what == "window":
        text = f"an aggregation window due {seconds(age)} ago, not flushed"
        if stuck.windows_over_limit > 1:
            text += f", {stuck.windows_over_limit} overdue by over {seconds(limit)}"
    else:
        text = f"a notification pending in no window for {seconds(age)}"
    if age > limit:
        return CheckResult("pending", False, f"{text} (limit {seconds(limit)})", details=details)
    return CheckResult("pending", True, f"oldest overdue: {text} (limit {seconds(limit)}){waiting}",
                       details=details)


# --- beat ---------------------------------------------------------------------------


def judge_heartbeat(heartbeat: Heartbeat, limit: float, now: float) -> CheckResult:
    details = {**asdict(heartbeat), "limit": limit}
    tick = heartbeat.last_tick
    if tick is None:
        return CheckResult("beat", False,
                           "no tick recorded: is `celery -A notifier beat` running?",
                           details=details)
    tick_age = now - tick
    details["tick_age"] = round(tick_age, 3)
    if tick_age > limit:
        return CheckResult("beat", False,
                           f"last tick {seconds(tick_age)} ago (limit {seconds(limit)})",
                           details=details)
    queue = delivery_queue("", "critical")
    if heartbeat.ran_at is None or now - heartbeat.ran_at > limit:
        never = ("no worker ever ran its heartbeat" if heartbeat.ran_at is None else
                 f"no worker ran its heartbeat for {seconds(now - heartbeat.ran_at)}")
        return CheckResult(
            "beat", False,
            f"ticking (last tick {seconds(tick_age)} ago) but {never} (limit {seconds(limit)}):"
            f" is a worker consuming {queue}?",
            details=details,
        )
    lag = ""
    if heartbeat.sent_at is not None:
        details["lag"] = round(heartbeat.ran_at - heartbeat.sent_at, 3)
        lag = f", run {details['lag'] * 1000:.0f} ms after sending"
    return CheckResult(
        "beat", True,
        f"last tick {seconds(tick_age)} ago{lag} by {heartbeat.worker}"
        f" (limit {seconds(limit)})",
        details=details,
    )


def check_beat(settings: Settings, thresholds: Thresholds) -> CheckResult:
    from notifier.storage.state import connect, server_seconds

    client = None
    try:
        client = connect(settings, timeout=thresholds.timeout)
        heartbeat = read_heartbeat(client)
        now = server_seconds(client)  # the clock the heartbeat was written on
    except Exception as exc:  # a Redis error, or a cluster with no node to start from
        return CheckResult("beat", False, f"cannot read the heartbeat from"
                           f" {mask_url(settings.state_redis_url)}: {_one_line(exc)}")
    finally:
        if client is not None:
            client.close()
    return judge_heartbeat(heartbeat, thresholds.beat_max_age, now)


# --- the state Redis ----------------------------------------------------------------


def check_state(settings: Settings, thresholds: Thresholds) -> CheckResult:
    """PING the state Redis the way the workers reach it (through Sentinel, or every
    master of a cluster), so a probe fails when they could not record a circuit."""
    from redis.cluster import RedisCluster

    from notifier.storage.state import connect, describe

    url = mask_url(settings.state_redis_url)
    started = time.perf_counter()
    client = None
    try:
        client = connect(settings, timeout=thresholds.timeout)
        where = describe(client)
        if isinstance(client, RedisCluster):
            client.ping(target_nodes=RedisCluster.PRIMARIES)
        else:
            client.ping()
    except Exception as exc:  # a Redis error, no Sentinel answering, no cluster node
        return CheckResult("state", False, f"cannot reach {url}: {_one_line(exc)}")
    finally:
        if client is not None:
            client.close()
    elapsed = (time.perf_counter() - started) * 1000
    return CheckResult("state", True, f"{url}{f': {where}' if where else ''}, {elapsed:.0f} ms",
                       details={"url": url, "server": where, "round_trip_ms": round(elapsed, 1)})


def check_api(settings: Settings, thresholds: Thresholds) -> CheckResult:
    """``GET <NOTIFIER_API_URL>/v1/health`` answers 200 within the timeout."""
    import httpx

    if not settings.api_url:
        return CheckResult("api", False, "NOTIFIER_API_URL is not set")
    url = settings.api_url.rstrip("/") + "/v1/health"
    shown = mask_url(url)
    started = time.perf_counter()
    try:
        response = httpx.get(url, timeout=thresholds.timeout)
    except httpx.HTTPError as exc:
        return CheckResult("api", False, f"cannot reach {shown}: {_one_line(exc)}")
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        return CheckResult("api", False, f"{shown} answered {response.status_code}",
                           details={"url": shown, "status": response.status_code})
    return CheckResult("api", True, f"{shown}, {elapsed:.0f} ms",
                       details={"url": shown, "round_trip_ms": round(elapsed, 1)})


CHECKS: dict[str, Callable[[Settings, Thresholds], CheckResult]] = {
    "broker": check_broker,
    "database": check_database,
    "state": check_state,
    "workers": check_workers,
    "beat": check_beat,
    "queues": check_queues,
    "pending": check_pending,
    "api": check_api,
}
