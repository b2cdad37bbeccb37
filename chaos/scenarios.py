"""The scenarios: traffic, one kind of fault while it flows, a bounded drain, the ledger.

Every scenario starts from empty tables and an empty Redis db, with a fresh pipeline
(ingest worker, delivery worker, beat) and a fresh SMTP server, so one scenario's
leftovers never count in the next. The producer sends ``scale`` notifications over
``scale / rate`` seconds; the fault lands while it sends; then the pipeline is given
until ``drain_timeout`` to finish (it stops waiting earlier once nothing has moved for
longer than any recovery timer could take), and every accepted notification is
accounted for (``chaos.ledger``).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis

from chaos import faults, fuzz, hosts, ledger
from chaos.config import ChaosConfig
from chaos.pipeline import Pipeline
from chaos.traffic import Producer, Recipients, ResendingProducer, plan
from tests.smtp_server import SmtpServer

#: Keeps the chaos run's Redis db from looking free to a test run (see ``reset``).
CLAIM_KEY = "notifier-chaos-claim"
TABLES = ("notifications, deliveries, digests, dead_letters, idempotency_keys, recipients,"
          " inbox_messages, aggregation_windows")


@dataclass
class Result:
    name: str
    description: str
    accepted: int = 0
    delivered: int = 0
    suppressed: int = 0
    dead_lettered: int = 0
    lost: int = 0
    recorded_twice: int = 0
    sent_twice_to_server: int = 0
    worker_crashes: int = 0
    kills: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    faults: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        if self.skipped:
            return True
        return (self.error is None and self.lost == 0 and self.recorded_twice == 0
                and self.worker_crashes == 0)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


class Db:
    """An autocommit connection that reconnects (Postgres restarts under it)."""

    def __init__(self, url: str, patience: float = 180.0) -> None:
        self.url = url
        self.patience = patience
        self._conn: psycopg.Connection[Any] | None = None

    def execute(self, sql: str, params: Any = None) -> psycopg.Cursor[Any]:
        deadline = time.monotonic() + self.patience
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=3)
                return self._conn.execute(sql, params)
            except psycopg.OperationalError:
                self.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None


@dataclass
class Run:
    """What a scenario works with."""

    config: ChaosConfig
    name: str
    db: Db
    broker: redis.Redis
    smtp: SmtpServer
    pipeline: Pipeline | None = None
    result: Result | None = None

    def mark(self, what: str, **info: Any) -> dict[str, Any]:
        record = {"fault": what, "at": time.time(), **info}
        assert self.result is not None
        self.result.faults.append(record)
        return record


# --- faults while traffic flows ---------------------------------------------------------

Fault = Callable[[Run, Producer], None]


def no_fault(run: Run, producer: Producer) -> None:
    """Baseline: the same traffic and accounting with nothing broken."""


def kill_ingest(run: Run, producer: Producer) -> None:
    """SIGKILL the ingest worker (and its pool) while it holds ingest messages."""
    assert run.pipeline is not None
    kills = run.config.kills
    for number in range(1, kills + 1):
        producer.wait_accepted(run.config.scale * number // (kills + 1), timeout=120)
        mid_batch = _wait_until(lambda: faults.ingest_holds_messages(run.broker), 10)
        record = run.pipeline.kill("ingest")
        run.mark("SIGKILL ingest worker", mid_batch=mid_batch, **record)


def kill_delivery(run: Run, producer: Producer) -> None:
    """SIGKILL the delivery worker while it is sending e-mail."""
    assert run.pipeline is not None
    kills = run.config.kills
    for number in range(1, kills + 1):
        producer.wait_accepted(run.config.scale * number // (kills + 1), timeout=120)
        mid_batch = _wait_until(
            lambda: faults.emails_in_flight(run.db), 15,  # type: ignore[arg-type]
        )
        record = run.pipeline.kill("deliver")
        run.mark("SIGKILL delivery worker", mid_batch=mid_batch, **record)


def restart_redis(run: Run, producer: Producer) -> None:
    """Shut Redis down in good order (the machine's keeps nothing), keep it down, start
    it again."""
    _stop_redis(run, producer, crash=False)


def crash_redis(run: Run, producer: Producer) -> None:
    """SIGKILL the run's own Redis (no SHUTDOWN: its AOF as last fsynced), keep it down,
    start it again."""
    _stop_redis(run, producer, crash=True)


def _stop_redis(run: Run, producer: Producer, crash: bool) -> None:
    producer.wait_accepted(run.config.scale * 2 // 5, timeout=120)
    others = [] if run.config.own_redis else _others(run)
    held = faults.broker_contents(run.broker)
    started = time.time()
    info = faults.restart_redis(run.config.redis_down, run.config, crash=crash)
    run.mark("Redis crashed" if crash else "Redis restarted", started=started,
             in_broker_before=held, other_clients_interrupted=others, **info)


def restart_postgres(run: Run, producer: Producer) -> None:
    """Stop Postgres (immediate mode: a crash), keep it down, start it again."""
    producer.wait_accepted(run.config.scale * 2 // 5, timeout=120)
    others = _others(run)
    started = time.time()
    info = faults.restart_postgres(run.config.postgres_down, run.config.libpq_url)
    run.mark("Postgres restarted", started=started, other_clients_interrupted=others, **info)


def _others(run: Run) -> list[str]:
    """Other users of the shared servers, waited for (briefly: the traffic is flowing,
    so the wait happens before the traffic starts, see ``_traffic``)."""
    url = run.config.libpq_url
    return faults.other_clients(url, url.rsplit("/", 1)[-1], _redis_db(run.config.broker_url))


def _redis_db(url: str) -> int:
    tail = url.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def smtp_outage(run: Run, producer: Producer) -> None:
    """Stop the SMTP server for ``smtp_outage`` seconds."""
    producer.wait_accepted(run.config.scale * 3 // 10, timeout=120)
    started = time.time()
    info = faults.smtp_outage(run.smtp, run.config.smtp_outage)
    run.mark("SMTP server stopped", started=started, **info)


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return False


# --- the scenarios ----------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    fault: Fault | None
    producer: type[Producer] = Producer
    #: Restarts a server (``redis``, ``postgres``): skipped without ``restart_services``
    #: when it is the machine's shared one.
    restarts: str = ""
    #: Fuzz scenarios: the payloads that stall ingest (``fuzz.STALLS_INGEST``) instead.
    poison: bool = False
    #: The workers some other way than on this machine alone (``chaos.hosts``).
    pipeline: Callable[[Run], Pipeline] | None = None
    #: Why the scenario cannot run here (one line), or None.
    unavailable: Callable[[ChaosConfig], str | None] | None = None

    def restarts_shared(self, config: ChaosConfig) -> bool:
        """Whether it restarts one of the machine's shared servers."""
        return self.restarts == "postgres" or (self.restarts == "redis" and not config.own_redis)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("baseline", "no fault: the accounting itself", no_fault),
    Scenario("kill_ingest", "SIGKILL the ingest worker mid-batch", kill_ingest),
    Scenario("kill_ingest_resend",
             "SIGKILL the ingest worker; producer re-sends what lookup() does not find",
             kill_ingest, ResendingProducer),
    Scenario("kill_delivery", "SIGKILL the delivery worker mid-send", kill_delivery),
    Scenario("redis_restart", "restart Redis (SHUTDOWN); producer: notify() once",
             restart_redis, restarts="redis"),
    Scenario("redis_restart_resend",
             "restart Redis; producer re-sends what lookup() does not find",
             restart_redis, ResendingProducer, restarts="redis"),
    Scenario("redis_crash", "SIGKILL Redis and start it again; producer: notify() once",
             crash_redis, restarts="redis",
             unavailable=lambda config: None if config.own_redis else
             "crashes only a Redis of the run's own (--redis aof|aof-always|none)"),
    Scenario("postgres_restart", "restart Postgres (immediate stop)", restart_postgres,
             restarts="postgres"),
    Scenario("smtp_outage", "stop the SMTP server", smtp_outage),
    Scenario("hosts", "worker hosts in network namespaces, two beats; cut one host off and"
             " back", hosts.cut_host, pipeline=lambda run: hosts.HostPipeline(
                 run.config.pipeline_environment(run.smtp.url()), run.smtp,
                 deliver_concurrency=2, hosts=run.config.hosts, beats=run.config.beats,
                 clocks=dict(spec.split("=", 1) for spec in run.config.host_clocks),
                 pg_options=run.config.host_pg_options),
             unavailable=lambda config: hosts.unavailable()),
    Scenario("fuzz", "bad (and some good) payloads from a foreign producer", None),
    Scenario("fuzz_poison", "the fuzzed payloads that stall ingest, among good ones", None,
             poison=True),
)}


def reset(run: Run) -> None:
    """Empty tables and an empty Redis db, before any worker starts (flushing under a
    running worker would delete kombu's bindings). Claim keys of the tests survive, and
    the db is never empty, not even for an instant: a test run starting meanwhile takes
    an empty db as free (tests/conftest.py), and its workers would consume our queues."""
    run.db.execute(f"TRUNCATE {TABLES} CASCADE")
    claims = {key: run.broker.get(key) for key in run.broker.scan_iter("*claim*")}
    claims[CLAIM_KEY] = b"chaos"
    with run.broker.pipeline(transaction=True) as atomic:
        atomic.flushdb()
        for key, value in claims.items():
            if value is not None:
                atomic.set(key, value, ex=3600)
        atomic.execute()


def run_scenario(config: ChaosConfig, name: str) -> Result:
    scenario = SCENARIOS[name]
    result = Result(name, scenario.description)
    if scenario.restarts_shared(config) and not config.restart_services:
        result.skipped = "restarting shared services is off (--no-restarts)"
        return result
    why = scenario.unavailable(config) if scenario.unavailable else None
    if why:
        result.skipped = why
        return result
    smtp = SmtpServer()
    smtp.delay = config.smtp_delay
    run = Run(config, name, Db(config.libpq_url), redis.Redis.from_url(config.broker_url),
              smtp, result=result)
    started = time.monotonic()
    try:
        reset(run)
        smtp.start()
        if scenario.fault is None:
            _fuzz(run, scenario.poison)
        else:
            _traffic(run, scenario)
    except Exception:
        result.error = traceback.format_exc()
    finally:
        if run.pipeline is not None:
            run.pipeline.stop()
            _pipeline_figures(run)
        smtp.stop()
        run.db.close()
        run.broker.close()
    result.seconds["total"] = round(time.monotonic() - started, 1)
    return result


def _traffic(run: Run, scenario: Scenario) -> None:
    config, result = run.config, run.result
    assert result is not None and scenario.fault is not None
    recipients = Recipients.for_scale(run.name, config.scale)
    recipients.create()
    for address in recipients.refused_addresses():
        run.smtp.refuse_recipient(address)
    items = plan(run.name, config.scale, recipients, config.seed)
    if scenario.restarts_shared(config) and config.restart_wait:
        url = config.libpq_url
        still = faults.wait_for_quiet_servers(url, url.rsplit("/", 1)[-1],
                                              _redis_db(config.broker_url), config.restart_wait)
        result.details["others_after_waiting"] = still
    if scenario.pipeline is not None:
        run.pipeline = scenario.pipeline(run).start()
    else:
        run.pipeline = Pipeline(config.pipeline_environment(run.smtp.url()), run.smtp).start()

    producer = scenario.producer(items, config.rate).start()
    began = time.monotonic()
    scenario.fault(run, producer)
    result.seconds["fault"] = round(time.monotonic() - began, 1)
    producer.join()
    result.seconds["traffic"] = round(producer.finished_at - producer.started_at, 1)
    accepted = list(producer.accepted)
    drained = drain(run, lambda: ledger.unfinished(run.db, [a.item.id for a in accepted]),
                    producer)
    producer.stop()
    result.details["producer"] = producer.stats()
    result.details["drain"] = drained
    result.seconds["drain"] = drained["seconds"]
    run.pipeline.stop()  # the final state: nothing moves while it is counted

    tally = ledger.tally(run.db, accepted, ledger.smtp_message_ids(run.smtp))  # type: ignore[arg-type]
    result.accepted, result.delivered = tally.accepted, tally.delivered
    result.suppressed, result.dead_lettered = tally.suppressed, tally.dead_lettered
    result.lost, result.recorded_twice = tally.lost, tally.recorded_twice
    result.sent_twice_to_server = tally.sent_twice_to_server
    result.details["ledger"] = tally.as_dict()
    _explain(result, tally)


def _explain(result: Result, tally: ledger.Tally) -> None:
    """Notes a reader needs: where the lost ones were and when they were accepted."""
    if tally.lost:
        where = ", ".join(f"{why}: {n}" for why, n in tally.lost_reasons.items())
        result.notes.append(f"lost: {tally.lost} ({where})")
        starts = sorted(fault.get("started", fault["at"]) for fault in result.faults)
        for number, began in enumerate(starts, 1):
            previous = starts[number - 2] if number > 1 else float("-inf")
            waits = [began - at for at in tally.lost_accepted_at if previous < at <= began]
            if waits:
                result.notes.append(
                    f"{len(waits)} of the lost were accepted {min(waits):.2f}-{max(waits):.2f} s"
                    f" before fault #{number} ({result.faults[number - 1]['fault']})")
        after = [at for at in tally.lost_accepted_at if starts and at > starts[-1]]
        if after:
            result.notes.append(f"{len(after)} of the lost were accepted after the last fault"
                                " began")
    if tally.sent_not_received:
        result.notes.append(f"recorded sent but never received: {tally.sent_not_received}")
    if tally.unexpected:
        result.notes.append("outcomes other than planned: " + ", ".join(
            f"{k}: {v}" for k, v in tally.unexpected.items()))
    if tally.sent_twice_to_server:
        cause = ("a resend after a crash, which the design allows" if result.faults else
                 "with no fault: the sweeper took back deliveries a worker had claimed")
        result.notes.append(
            f"{tally.sent_twice_to_server} e-mail(s) reached the server twice with the same"
            f" Message-ID ({cause})")


def _fuzz(run: Run, poison: bool) -> None:
    config, result = run.config, run.result
    assert result is not None
    began = time.monotonic()
    count = config.fuzz_poison_count if poison else config.fuzz_count
    messages = fuzz.generate(count, config.seed, poison=poison)
    result.seconds["generate"] = round(time.monotonic() - began, 1)
    run.pipeline = Pipeline(config.pipeline_environment(run.smtp.url()), run.smtp).start()
    began = time.monotonic()
    sent = fuzz.send(messages, config.broker_url)
    result.seconds["traffic"] = round(time.monotonic() - began, 1)
    drained = drain(run, lambda: {"unresolved": fuzz.unresolved(run.db, sent.sent)})
    result.details["drain"] = drained
    result.seconds["drain"] = drained["seconds"]
    run.pipeline.stop()

    tally = fuzz.tally(run.db, sent)
    result.accepted = tally.items
    result.delivered = tally.stored
    result.dead_lettered = tally.dead_lettered
    result.lost, result.recorded_twice = tally.lost, tally.recorded_twice
    result.details["fuzz"] = tally.as_dict()
    if tally.bad_accepted:
        result.notes.append(f"bad items stored anyway: {tally.bad_accepted}")
    if tally.good_dead_lettered:
        result.notes.append(
            f"good items dead-lettered with a refused neighbour: {tally.good_dead_lettered}")
    if tally.reason_misses_field:
        result.notes.append(
            f"dead letters whose reason does not name the field: {tally.reason_misses_field}")
    if tally.lenient_outcomes:
        result.notes.append(f"contract-lenient inputs: {tally.lenient_outcomes}")
    if tally.refused_by_producer:
        result.notes.append(f"refused by the producer's encoder: {tally.refused_by_producer}")
    if tally.lost:
        result.notes.append(f"lost by kind: {tally.lost_kinds}")


def drain(
    run: Run, unfinished: Callable[[], dict[str, int]], producer: Producer | None = None
) -> dict[str, Any]:
    """Wait until nothing is unfinished (twice in a row, 2 s apart), or nothing has
    moved for longer than any recovery timer takes, or ``drain_timeout``."""
    from notifier.settings import get_settings

    settings = get_settings()
    quiet = (settings.visibility_timeout + settings.unacked_restore_interval
             + settings.queued_timeout + 2 * settings.sweep_interval + 10)
    started = time.monotonic()
    deadline = started + run.config.drain_timeout
    best, progressed, settled = None, started, False
    state: dict[str, int] = {}
    while True:
        state = dict(unfinished())
        if isinstance(producer, ResendingProducer):
            state["unconfirmed"] = producer.unconfirmed
        now = time.monotonic()
        moving = {k: v for k, v in state.items() if k not in ("deliveries_sent", "dead_letters")}
        remaining = sum(moving.values())
        if not remaining:
            if settled:
                outcome = "drained"
                break
            settled = True
            time.sleep(2.0)  # a late duplicate would land now
            continue
        settled = False
        if best is None or remaining < best:  # progress: less left than ever before
            best, progressed = remaining, now
        only_missing = not state.get("waiting_in_window") and not state.get(
            "deliveries_unfinished")
        if only_missing and now - progressed > quiet:
            outcome = f"stopped waiting: no progress for {quiet:.0f} s"
            break
        if now > deadline:
            outcome = f"timed out after {run.config.drain_timeout:.0f} s"
            break
        time.sleep(0.5)
    return {"outcome": outcome, "seconds": round(time.monotonic() - started, 1),
            "state": state}


def _pipeline_figures(run: Run) -> None:
    assert run.pipeline is not None and run.result is not None
    result = run.result
    result.worker_crashes = run.pipeline.worker_crashes()
    result.kills = len(run.pipeline.kills)
    result.details["logs"] = run.pipeline.log_counts()
    result.details["crashes"] = [crash.__dict__ for crash in run.pipeline.crashes]
    result.details["failed_starts"] = run.pipeline.failed_starts
    figures = run.pipeline.figures(run.db)
    result.notes += figures.pop("notes", [])
    result.details.update(figures)
    result.details["log_files"] = run.pipeline.keep_logs(
        run.config.results_dir / "logs", run.name)
