"""``python -m bench``: parse the options, run the scenarios in turn, report.

Each scenario that needs a worker gets a fresh one (see bench.workers). A scenario that
fails is reported and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

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
    parser.add_argument("--poll-interval-ms", type=float,
                        default=defaults.poll_interval * 1000)
    parser.add_argument("--database-url", default=defaults.database_url)
    parser.add_argument("--broker-url", default=defaults.broker_url)
    parser.add_argument("--only", nargs="+", metavar="SCENARIO", default=[],
                        help=f"run only these: {', '.join(STEP_NAMES)}")
    args = parser.parse_args(argv)
    if args.smtp_reply_delay_ms and args.smtp_server != "fast":
        parser.error("--smtp-reply-delay-ms needs --smtp-server fast")
    unknown = set(args.only) - set(STEP_NAMES)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return BenchConfig(
        database_url=args.database_url, broker_url=args.broker_url, count=args.count,
        naive_count=args.naive_count, empty_count=args.empty_count,
        notify_threads=args.notify_threads, criticals=args.criticals,
        critical_spacing=args.critical_spacing_ms / 1000, emails=args.emails,
        webhooks=args.webhooks, naive_webhooks=args.naive_webhooks,
        delivery_concurrency=args.delivery_concurrency,
        delivery_batch_size=args.delivery_batch_size, smtp_server=args.smtp_server,
        server_processes=args.server_processes, delivery_runs=args.delivery_runs,
        smtp_reply_delay_ms=args.smtp_reply_delay_ms,
        poll_interval=args.poll_interval_ms / 1000, only=tuple(args.only),
    )


STEP_NAMES = (
    "raw_copy", "in_process_ingest", "empty_task", "naive", "notify", "notify_threads",
    "buffered", "notify_many", "critical_under_backlog",
    "email_naive", "email_reused", "email_pooled", "webhook_naive", "webhook_pooled",
)


def plan(config: BenchConfig) -> dict[str, Step]:
    """The scenarios in the order they run (cheapest and worker-less first)."""
    from bench import delivery as d
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
        # Delivery: each starts its own server process and, if pooled, its own worker.
        "email_naive": lambda b: d.email_naive(b, config.emails),
        "email_reused": lambda b: d.email_reused(b, config.emails),
        "email_pooled": lambda b: d.email_pooled(b, config.emails),
        "webhook_naive": lambda b: d.webhook_naive(b, config.naive_webhooks),
        "webhook_pooled": lambda b: d.webhook_pooled(b, config.webhooks),
    }
    if threads < 2:
        del steps["notify_threads"]
    if config.only:
        steps = {name: step for name, step in steps.items() if name in config.only}
    return steps


def run(config: BenchConfig) -> int:
    # Imported only now: notifier reads NOTIFIER_* once, at import.
    import redis

    from bench import database, report, scenarios
    from notifier.migrate import upgrade
    from notifier.settings import get_settings

    upgrade(config.database_url)
    settings = get_settings()
    notifier_settings = {
        "ingest_batch_size": settings.ingest_batch_size,
        "ingest_flush_interval": settings.ingest_flush_interval,
        "prefetch_multiplier": settings.prefetch_multiplier,
        "client_chunk_size": settings.client_chunk_size,
        "buffer_max_delay": settings.buffer_max_delay,
    }
    outcomes: dict[str, Outcome] = {}
    failed = False
    with database.connect(config.libpq_url) as conn:
        redis_version = redis.Redis.from_url(config.broker_url).info("server")["redis_version"]
        machine = report.machine_info(database.server_version(conn), redis_version)
        clock_offset = database.clock_offset_ms(conn)
        bench = scenarios.Bench(config, conn)
        for name, step in plan(config).items():
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                outcome = step(bench)
            except Exception:
                traceback.print_exc()
                failed = True
                continue
            outcomes[name] = outcome
            print(f"[bench] {name}: {outcome.committed:,} in {outcome.seconds:.2f} s = "
                  f"{outcome.rate:,.0f}/s (step {time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report.print_report(outcomes, machine, config, clock_offset, notifier_settings)
    path = report.write_json(outcomes, machine, config, clock_offset, notifier_settings)
    markdown = report.write_markdown(outcomes, machine)
    print(f"\nresults: {path}, {markdown}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    config.apply_environment()
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
