"""``python -m bench``: parse the options, run the scenarios in turn, report.

Each scenario that needs a worker gets a fresh one (see bench.workers). A scenario that
fails is reported and the others still run; the exit status is then 1. One that failed
because Postgres or Redis restarted meanwhile runs once more.

The figures are printed and written to ``bench/results/``: ``latest.json`` (everything,
with the time series and latency quantiles), ``report.md`` (the one report of the run)
and its PNG plots (``bench.plots``: throughput over time, latency distribution,
aggregation).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.config import BenchConfig
from bench.workers import NAIVE, OURS, WorkerSpec, running_worker

if TYPE_CHECKING:
    from bench.scenarios import Bench, Outcome

Step = Callable[["Bench"], "Outcome"]


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--count", type=int, default=defaults.count,
                        help="notifications per pipeline scenario and in the backlog")
    parser.add_argument("--naive-count", type=int, default=defaults.naive_count,
                        help="notifications of the naive baseline")
    parser.add_argument("--empty-count", type=int, default=defaults.empty_count,
                        help="tasks of the empty-task scenario")
    parser.add_argument("--notify-threads", type=int, default=defaults.notify_threads,
                        help="producer threads of the extra unbuffered scenario (<2: skip)")
    parser.add_argument("--criticals", type=int, default=defaults.criticals)
    parser.add_argument("--critical-spacing-ms", type=float,
                        default=defaults.critical_spacing * 1000)
    parser.add_argument("--emails", type=int, default=defaults.emails,
                        help="e-mails per delivery scenario")
    parser.add_argument("--webhooks", type=int, default=defaults.webhooks,
                        help="webhook requests of the pooled delivery scenario")
    parser.add_argument("--naive-webhooks", type=int, default=defaults.naive_webhooks,
                        help="webhook requests of the naive baseline")
    parser.add_argument("--delivery-concurrency", type=int,
                        default=defaults.delivery_concurrency,
                        help="pool processes of the delivery worker")
    parser.add_argument("--delivery-batch-size", type=int,
                        default=defaults.delivery_batch_size,
                        help="deliveries per deliver task (0: NOTIFIER_DELIVERY_BATCH_SIZE)")
    parser.add_argument("--smtp-server", choices=("fast", "aiosmtpd"),
                        default=defaults.smtp_server,
                        help="the local SMTP server: a minimal asyncio one, or aiosmtpd")
    parser.add_argument("--smtp-reply-delay-ms", type=float,
                        default=defaults.smtp_reply_delay_ms,
                        help="hold each reply of the minimal SMTP server back this long,"
                             " standing for a network round trip")
    parser.add_argument("--server-processes", type=int, default=defaults.server_processes,
                        help="processes of each local delivery server (one shared port)")
    parser.add_argument("--delivery-runs", type=int, default=defaults.delivery_runs,
                        help="timed runs of each delivery scenario; the fastest counts")
    parser.add_argument("--failover-attempts", type=int, default=defaults.failover_attempts,
                        help="attempts timed per case of email_failover")
    parser.add_argument("--receipts", type=int, default=defaults.receipts,
                        help="provider events posted by the receipts step")
    parser.add_argument("--callbacks", type=int, default=defaults.callbacks,
                        help="status callbacks sent by the callbacks step")
    parser.add_argument("--aggregation-recipients", type=int,
                        default=defaults.aggregation_recipients,
                        help="recipients of the simulated day part of aggregation_efficiency")
    parser.add_argument("--aggregation-hours", type=float, default=defaults.aggregation_hours,
                        help="hours aggregation_efficiency simulates (simulated clock)")
    parser.add_argument("--flush-waiting", type=int, default=defaults.flush_waiting,
                        help="notifications waiting in windows when flush_latency starts")
    parser.add_argument("--flush-spread", type=float, default=defaults.flush_spread,
                        help="seconds over which flush_latency's windows close")
    parser.add_argument("--flush-interval", type=float, default=defaults.flush_interval,
                        help="seconds between beat's flushes (0: NOTIFIER_FLUSH_INTERVAL,"
                             " 1 s by default)")
    parser.add_argument("--api-workers", type=int, default=defaults.api_workers,
                        help="processes of the notifier api of api_single and api_lists"
                             " (NOTIFIER_API_WORKERS; sse_fanout always runs one)")
    parser.add_argument("--api-connections", type=int, default=defaults.api_connections,
                        help="keep-alive connections of the HTTP load generator")
    parser.add_argument("--api-requests", type=int, default=defaults.api_requests,
                        help="requests of api_single (api_lists sends --count"
                             " notifications)")
    parser.add_argument("--api-list-size", type=int, default=defaults.api_list_size,
                        help="notifications per request of api_lists")
    parser.add_argument("--sse-streams", type=int, default=defaults.sse_streams,
                        help="live inbox streams sse_fanout holds on one API process")
    parser.add_argument("--sse-one-recipient-messages", type=int,
                        default=defaults.sse_one_recipient_messages,
                        help="messages to the one recipient all streams follow in"
                             " sse_fanout's second case")
    parser.add_argument("--poll-interval-ms", type=float,
                        default=defaults.poll_interval * 1000)
    parser.add_argument("--sample-interval-ms", type=float,
                        default=defaults.sample_interval * 1000,
                        help="how often items done are sampled for the throughput plots")
    parser.add_argument("--no-plots", action="store_true",
                        help="write no PNG (the report then links none)")
    parser.add_argument("--no-profile", action="store_true",
                        help="take no CPU profile (py-spy) of the hot paths")
    parser.add_argument("--save-baseline", action="store_true",
                        help="after the report, write this run's figures as the baseline"
                             " (bench/baseline.json) later runs are compared with")
    parser.add_argument("--database-url", default=defaults.database_url)
    parser.add_argument("--broker-url", default=defaults.broker_url,
                        help="redis://... or amqp://... (RabbitMQ: quorum queues)")
    parser.add_argument("--redis-url", default=defaults.redis_url,
                        help="the state Redis; default: the broker if Redis, else"
                             f" {defaults.state_redis_url}")
    parser.add_argument("--only", nargs="+", metavar="SCENARIO", default=[],
                        help=f"run only these: {', '.join(STEP_NAMES)}")
    args = parser.parse_args(argv)
    if args.smtp_reply_delay_ms and args.smtp_server != "fast":
        parser.error("--smtp-reply-delay-ms needs --smtp-server fast")
    unknown = set(args.only) - set(STEP_NAMES)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return BenchConfig(
        database_url=args.database_url, broker_url=args.broker_url, redis_url=args.redis_url,
        count=args.count,
        naive_count=args.naive_count, empty_count=args.empty_count,
        notify_threads=args.notify_threads, criticals=args.criticals,
        critical_spacing=args.critical_spacing_ms / 1000, emails=args.emails,
        webhooks=args.webhooks, naive_webhooks=args.naive_webhooks,
        delivery_concurrency=args.delivery_concurrency,
        delivery_batch_size=args.delivery_batch_size, smtp_server=args.smtp_server,
        server_processes=args.server_processes, delivery_runs=args.delivery_runs,
        failover_attempts=args.failover_attempts, receipts=args.receipts,
        callbacks=args.callbacks,
        smtp_reply_delay_ms=args.smtp_reply_delay_ms,
        aggregation_recipients=args.aggregation_recipients,
        aggregation_hours=args.aggregation_hours, flush_waiting=args.flush_waiting,
        flush_spread=args.flush_spread, flush_interval=args.flush_interval,
        api_workers=args.api_workers, api_connections=args.api_connections,
        api_requests=args.api_requests, api_list_size=args.api_list_size,
        sse_streams=args.sse_streams,
        sse_one_recipient_messages=args.sse_one_recipient_messages,
        poll_interval=args.poll_interval_ms / 1000,
        sample_interval=args.sample_interval_ms / 1000, plots=not args.no_plots,
        profile=not args.no_profile, save_baseline=args.save_baseline,
        only=tuple(args.only),
    )


STEP_NAMES = (
    "raw_copy", "in_process_ingest", "empty_task", "naive", "notify", "notify_threads",
    "buffered", "notify_many", "critical_under_backlog",
    "api_single", "api_lists", "sse_fanout",
    "aggregation_efficiency", "flush_latency",
    "email_naive", "email_reused", "email_pooled", "webhook_naive", "webhook_pooled",
    "email_failover", "receipts", "callbacks", "hosts",
)


def plan(config: BenchConfig) -> dict[str, Step]:
    """The scenarios in the order they run (cheapest and worker-less first)."""
    from bench import aggregation as a
    from bench import api
    from bench import callbacks as cb
    from bench import delivery as d
    from bench import failover as f
    from bench import hosts as h
    from bench import receipts as r
    from bench import scenarios as s

    def with_worker(spec: WorkerSpec, body: Callable[..., Outcome]) -> Step:
        def step(bench: Bench) -> Outcome:
            with running_worker(spec, config) as worker:
                return body(bench, worker)
        return step

    def pipeline(name: str, label: str, sender: s.Sender, count: int) -> Step:
        return with_worker(NAIVE if name == "naive" else OURS,
                           lambda b, w: s.pipeline(b, w, name, label, sender, count))

    threads = config.notify_threads
    steps: dict[str, Step] = {
        "raw_copy": lambda b: s.raw_copy(b, config.count),
        "in_process_ingest": lambda b: s.in_process_ingest(b, config.count),
        "empty_task": with_worker(NAIVE, lambda b, w: s.empty_tasks(b, w, config.empty_count)),
        "naive": pipeline("naive", "naive: 1 task + INSERT + commit each",
                          s.send_naive, config.naive_count),
        "notify": pipeline("notify", "notify(), unbuffered, 1 producer thread",
                           s.send_unbuffered, config.count),
        "notify_threads": pipeline("notify_threads",
                                   f"notify(), unbuffered, {threads} producer threads",
                                   s.threaded(s.send_unbuffered, threads), config.count),
        "buffered": pipeline("buffered", "BufferedProducer().notify() + close()",
                             s.send_buffered, config.count),
        "notify_many": pipeline("notify_many", "notify_many(), 500 per message",
                                s.send_many, config.count),
        "critical_under_backlog": with_worker(OURS, s.critical_under_backlog),
        # The HTTP API: a real `notifier api` beside the worker, driven from a process
        # of its own (bench.api).
        "api_single": with_worker(OURS, api.api_single),
        "api_lists": with_worker(OURS, api.api_lists),
        "sse_fanout": with_worker(OURS, api.sse_fanout),
        # Aggregation: a simulated clock first (no worker), then a real worker and beat.
        "aggregation_efficiency": lambda b: a.aggregation_efficiency(
            b, config.aggregation_recipients, config.aggregation_hours),
        "flush_latency": lambda b: a.flush_latency(
            b, config.flush_waiting, spread=config.flush_spread),
        # Delivery: each starts its own server process and, if pooled, its own worker.
        "email_naive": lambda b: d.email_naive(b, config.emails),
        "email_reused": lambda b: d.email_reused(b, config.emails),
        "email_pooled": lambda b: d.email_pooled(b, config.emails),
        "webhook_naive": lambda b: d.webhook_naive(b, config.naive_webhooks),
        "webhook_pooled": lambda b: d.webhook_pooled(b, config.webhooks),
        # What a failover to a channel's second provider adds to an attempt (issue 15).
        "email_failover": lambda b: f.email_failover(b, config.failover_attempts),
        # Issue 15's receipts (a real API, relay clients posting events) and status
        # callbacks (the worker's code in this process, a local receiver).
        "receipts": lambda b: r.receipts_step(b, config.receipts),
        "callbacks": lambda b: cb.callbacks_step(b, config.callbacks),
        # 1, 2 and 4 worker hosts (network namespaces; root only, else left out).
        "hosts": lambda b: h.hosts_scaling(b),
    }
    if h.unavailable():
        del steps["hosts"]
    if threads < 2:
        del steps["notify_threads"]
    if config.only:
        steps = {name: step for name, step in steps.items() if name in config.only}
    return steps


def run(config: BenchConfig) -> int:
    # Imported only now: notifier reads NOTIFIER_* once, at import.
    import redis

    from bench import baseline, database, report, scenarios
    from notifier.settings import get_settings
    from notifier.storage.migrate import upgrade

    upgrade(config.database_url)
    settings = get_settings()
    notifier_settings = {
        "ingest_batch_size": settings.ingest_batch_size,
        "ingest_flush_interval": settings.ingest_flush_interval,
        "prefetch_multiplier": settings.prefetch_multiplier,
        "client_chunk_size": settings.client_chunk_size,
        "buffer_max_delay": settings.buffer_max_delay,
        "flush_interval": settings.flush_interval,
        "flush_batch_size": settings.flush_batch_size,
    }
    outcomes: dict[str, Outcome] = {}
    failed = False
    with database.connect(config.libpq_url) as conn:
        redis_version = redis.Redis.from_url(config.state_redis_url).info("server")[
            "redis_version"]
        machine = report.machine_info(database.server_version(conn), redis_version)
        clock_offset = database.clock_offset_ms(conn)
        bench = scenarios.Bench(config, conn)
        for name, step in plan(config).items():
            outcome = run_step(name, step, bench)
            if outcome is None:
                failed = True
            else:
                outcomes[name] = outcome
    bench.conn.close()
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report.print_report(outcomes, machine, config, clock_offset, notifier_settings)
    document = report.document(outcomes, machine, config, clock_offset, notifier_settings)
    before = baseline.load()
    document["regressions"] = regressions(document, before)
    path = report.write_json(document)
    plots, note = draw_plots(document, config)
    markdown = report.write_markdown(outcomes, document, plots, note, baseline=before)
    print(f"\nreport: {markdown}\nresults: {path}"
          + "".join(f"\nplot: {png}" for png in plots.values()) + (f"\n{note}" if note else ""))
    if config.save_baseline:
        print(f"baseline written: {baseline.save(document)}")
    return 1 if failed else 0


def regressions(document: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    """Print the figures more than 15 % worse than the baseline's; return their keys."""
    from bench import baseline

    if before is None:
        print(f"\nNo baseline ({baseline.BASELINE_PATH.name}) to compare with; write one"
              " from a quiet run with `python -m bench --save-baseline`.")
        return []
    marked = [c for c in baseline.compare(document, before) if c.regressed]
    print(f"\nAgainst the baseline of {before.get('machine', {}).get('date', '?')}:"
          f" {len(marked)} figure(s) more than {baseline.THRESHOLD:.0%} worse")
    for c in marked:
        print(f"  {c.label}: {c.before:,.1f} -> {c.now:,.1f} {c.unit}"
              f" ({c.worse_by:.0%} worse)")
    return [c.key for c in marked]


def run_step(name: str, step: Step, bench: Bench) -> Outcome | None:
    """Run one scenario; if it failed because Postgres or Redis restarted meanwhile (on
    a shared machine), wait for them and run it once more, from scratch."""
    from bench import database

    for attempt in (1, 2):
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        before = server_lives(bench)
        try:
            outcome = step(bench)
        except Exception:
            traceback.print_exc()
            wait_for_servers(bench.config)
            if not bench.conn.closed:
                bench.conn.close()
            bench.conn = database.connect(bench.config.libpq_url)
            restarted = [server for server, life in server_lives(bench).items()
                         if life != before.get(server)]
            if attempt == 1 and restarted:
                print(f"[bench] {name}: {' and '.join(restarted)} restarted during the"
                      " scenario; running it again", file=sys.stderr, flush=True)
                continue
            return None
        if attempt > 1:
            outcome.extra["attempts"] = attempt
        print(f"[bench] {name}: {outcome.committed:,} in {outcome.seconds:.2f} s = "
              f"{outcome.rate:,.0f}/s (step {time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)
        return outcome
    return None


def server_lives(bench: Bench) -> dict[str, str | None]:
    """What changes when a server restarts: Postgres's start time, Redis's run id."""
    import redis

    lives: dict[str, str | None] = {"Postgres": None, "Redis": None}
    try:
        row = bench.conn.execute("SELECT pg_postmaster_start_time()::text").fetchone()
        lives["Postgres"] = row[0] if row else None
    except Exception:
        pass
    try:
        client = redis.Redis.from_url(bench.config.state_redis_url, socket_timeout=5)
        lives["Redis"] = str(client.info("server")["run_id"])
        client.close()
    except Exception:
        pass
    return lives


def wait_for_servers(config: BenchConfig, timeout: float = 180.0) -> None:
    """Until Postgres and Redis both answer (or the timeout passes)."""
    import psycopg
    import redis

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(config.libpq_url, connect_timeout=5) as conn:
                conn.execute("SELECT 1")
            client = redis.Redis.from_url(config.state_redis_url, socket_timeout=5)
            client.ping()
            client.close()
            return
        except Exception:
            time.sleep(1)


def draw_plots(document: dict[str, Any], config: BenchConfig) -> tuple[dict[str, Path], str]:
    """The PNGs, or why there are none (the figures stand without them)."""
    if not config.plots:
        return {}, ""
    try:
        from bench.plots import write_plots

        return write_plots(document), ""
    except ImportError:
        return {}, ("No plots: matplotlib is missing (`pip install -e \".[bench]\"`, which"
                    " `make bench` does).")
    except Exception as error:  # a plot must not cost the run its report
        traceback.print_exc()
        return {}, f"No plots: drawing them failed ({error!r})."


def exit_on_sigterm() -> None:
    """A SIGTERM (``kill``, ``timeout``) ends the run and everything it started.

    The workers and servers the scenarios start run in sessions of their own, so only
    the run can stop them, and Python's default for SIGTERM ends it on the spot, leaving
    them loading the machine for whatever runs next. Raising ``SystemExit`` to run the
    ``finally`` blocks is not enough: a signal that lands in a garbage-collection
    callback has its exception printed and dropped, and the run carries on. So the
    handler stops every descendant itself (SIGTERM, then SIGKILL for what is left after
    ten seconds) and then exits."""
    def stop(signum: int, frame: object) -> None:
        import psutil

        print("[bench] terminated: stopping the processes it started", file=sys.stderr,
              flush=True)
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    config = parse_args(argv)
    config.apply_environment()
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
