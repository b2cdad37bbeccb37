"""``python -m chaos``: break the pipeline while traffic flows, then account for it all.

Creates and migrates its own database (notifier_chaos), uses its own Redis db, and runs
each scenario on a fresh pipeline. Restarting Redis and Postgres restarts the machine's
shared servers: every other client on this machine is interrupted too (--no-restarts
skips those scenarios). Exit status 1 when a scenario lost or doubled something, saw a
worker crash, or failed to run.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from chaos.config import REDIS_MODES, ChaosConfig
from chaos.faults import own_redis
from chaos.scenarios import SCENARIOS


def parse_args(argv: list[str] | None = None) -> ChaosConfig:
    defaults = ChaosConfig()
    parser = argparse.ArgumentParser(
        prog="python -m chaos", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", default=[],
                        help=f"run only these: {', '.join(SCENARIOS)}")
    parser.add_argument("--scale", type=int, default=defaults.scale,
                        help="notifications per traffic scenario")
    parser.add_argument("--fuzz-count", type=int, default=defaults.fuzz_count,
                        help="messages of the fuzz scenario")
    parser.add_argument("--fuzz-poison-count", type=int, default=defaults.fuzz_poison_count,
                        help="messages of the fuzz_poison scenario (a quarter poison)")
    parser.add_argument("--smtp-outage", type=float, default=defaults.smtp_outage,
                        help="seconds the SMTP server is down")
    parser.add_argument("--redis-down", type=float, default=defaults.redis_down)
    parser.add_argument("--redis", choices=REDIS_MODES, default=defaults.redis,
                        help="the broker's Redis: the machine's shared server, or one of"
                             " the run's own with AOF (fsync every second or always) or no"
                             " persistence (then --broker-url is ignored)")
    parser.add_argument("--postgres-down", type=float, default=defaults.postgres_down)
    parser.add_argument("--kills", type=int, default=defaults.kills,
                        help="SIGKILLs per kill scenario")
    parser.add_argument("--rate", type=float, default=defaults.rate,
                        help="notifications per second the producer aims at")
    parser.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout,
                        help="longest wait for the pipeline to finish after the faults")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--hosts", type=int, default=defaults.hosts,
                        help="worker hosts (network namespaces) of the hosts scenario")
    parser.add_argument("--beats", type=int, default=defaults.beats,
                        help="beats running at once in the hosts scenario")
    parser.add_argument("--host-cut", type=float, default=defaults.host_cut,
                        help="seconds host 1 is cut off in the hosts scenario")
    parser.add_argument("--host-clock", nargs="+", default=[], metavar="HOST=OFFSET",
                        help="set a host's clock off in the hosts scenario (host2=+2s)")
    parser.add_argument("--host-pg-options", default=defaults.host_pg_options,
                        metavar="'-c NAME=VALUE ...'",
                        help="Postgres session settings of the hosts' sessions (PGOPTIONS),"
                             " e.g. '-c idle_in_transaction_session_timeout=5s'")
    parser.add_argument("--no-restarts", action="store_true",
                        help="skip the scenarios that restart Redis or Postgres")
    parser.add_argument("--restart-wait", type=float, default=defaults.restart_wait,
                        help="seconds to wait for other users of Redis/Postgres to finish"
                             " before restarting them (then restart anyway)")
    parser.add_argument("--database-url", default=defaults.database_url)
    parser.add_argument("--broker-url", default=defaults.broker_url)
    args = parser.parse_args(argv)
    for spec in args.host_clock:
        if not re.fullmatch(r"host\d+=[+-]\d+(\.\d+)?[smhd]?", spec):
            parser.error(f"--host-clock: expected HOST=OFFSET such as host2=+2s, got {spec!r}")
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return ChaosConfig(
        database_url=args.database_url, broker_url=args.broker_url, scale=args.scale,
        fuzz_count=args.fuzz_count, fuzz_poison_count=args.fuzz_poison_count,
        smtp_outage=args.smtp_outage,
        redis_down=args.redis_down, postgres_down=args.postgres_down, kills=args.kills,
        rate=args.rate, drain_timeout=args.drain_timeout, seed=args.seed,
        only=tuple(args.only), restart_services=not args.no_restarts,
        restart_wait=args.restart_wait, hosts=args.hosts, beats=args.beats,
        host_cut=args.host_cut, host_clocks=tuple(args.host_clock),
        host_pg_options=args.host_pg_options, redis=args.redis,
    )


def run(config: ChaosConfig) -> int:
    # Imported only now: notifier reads NOTIFIER_* once, at import.
    from chaos import report
    from chaos.scenarios import Db, run_scenario
    from notifier.storage.migrate import upgrade

    upgrade(config.database_url)
    names = [name for name in SCENARIOS if not config.only or name in config.only]
    database = Db(config.libpq_url)
    machine = report.machine_info(database, config.broker_url)
    database.close()
    results = []
    for name in names:
        print(f"[chaos] {name}: {SCENARIOS[name].description} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        result = run_scenario(config, name)
        results.append(result)
        verdict = "ok" if result.ok else "FAIL"
        print(f"[chaos] {name}: {verdict}, accepted {result.accepted:,}, lost {result.lost},"
              f" recorded twice {result.recorded_twice}, crashes {result.worker_crashes}"
              f" ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        if result.error:
            print(result.error, file=sys.stderr)
    report.print_report(results, machine)
    path = report.write_json(results, machine, config)
    print(f"\nresults: {path}")
    return 0 if all(result.ok for result in results) else 1


def main(argv: list[str] | None = None) -> int:
    with own_redis(parse_args(argv)) as config:
        config.apply_environment()
        return run(config)


if __name__ == "__main__":
    sys.exit(main())
