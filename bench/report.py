"""Printing the figures and saving them as JSON, with the aims printed beside them.

The aims are shown, never enforced: a benchmark on a shared 2-core machine informs a
decision, it does not gate a build.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.config import CONCURRENCY, RESULTS_DIR, BenchConfig
from bench.cpu import PARTIES
from bench.scenarios import Outcome

#: Aims the figures are read against (printed, not asserted).
AIM_BULK_VS_NAIVE = 50.0
AIM_NOTIFY_VS_EMPTY = 0.80
AIM_CRITICAL_P99_MS = 50.0

BULK = ("buffered", "notify_many")
UNBUFFERED = ("notify", "notify_threads")


def machine_info(postgres_version: str, redis_version: str) -> dict[str, Any]:
    import celery
    import kombu
    import psycopg

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "postgres": postgres_version,
        "redis": redis_version,
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "psycopg": psycopg.__version__,
        "git_commit": _git_commit(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            check=True, cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def aims(outcomes: dict[str, Outcome]) -> dict[str, dict[str, Any]]:
    """Each aim with the figure it is read against and whether the figure meets it."""
    results: dict[str, dict[str, Any]] = {}
    naive, empty = outcomes.get("naive"), outcomes.get("empty_task")
    for name in BULK:
        if name in outcomes and naive and naive.rate:
            ratio = outcomes[name].rate / naive.rate
            results[name] = {"aim": f">= {AIM_BULK_VS_NAIVE:.0f}x naive",
                             "value": round(ratio, 1), "met": ratio >= AIM_BULK_VS_NAIVE}
    for name in UNBUFFERED:
        if name in outcomes and empty and empty.rate:
            share = outcomes[name].rate / empty.rate
            results[name] = {"aim": f">= {AIM_NOTIFY_VS_EMPTY:.0%} of empty task",
                             "value": round(share, 3), "met": share >= AIM_NOTIFY_VS_EMPTY}
    critical = outcomes.get("critical_under_backlog")
    if critical:
        p99 = critical.extra["critical_latency_ms"]["p99"]
        results["critical_under_backlog"] = {
            "aim": f"critical p99 <= {AIM_CRITICAL_P99_MS:.0f} ms", "value": round(p99, 1),
            "met": p99 <= AIM_CRITICAL_P99_MS,
        }
    return results


def print_report(
    outcomes: dict[str, Outcome], machine: dict[str, Any], config: BenchConfig,
    clock_offset_ms: float, notifier_settings: dict[str, Any],
) -> None:
    print(_header(machine, config, clock_offset_ms, notifier_settings))
    reached = aims(outcomes)
    _print_throughput(outcomes, reached)
    _print_ceilings(outcomes, reached)
    _print_latency(outcomes, reached)
    _print_cpu(outcomes)


def _header(
    machine: dict[str, Any], config: BenchConfig, clock_offset_ms: float,
    settings: dict[str, Any],
) -> str:
    return "\n".join([
        f"notifier benchmark  {machine['date']}  git {machine['git_commit']}",
        f"machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), load average "
        f"{machine['load_average_at_start']} at start, {machine.get('load_average_at_end')}"
        f" at end, Python {machine['python']}, PostgreSQL "
        f"{machine['postgres']}, Redis {machine['redis']}, Celery {machine['celery']}",
        f"workers: prefork, concurrency {CONCURRENCY} for every worker (notifier, naive and"
        " empty task alike), one fresh worker per scenario; producer: this process",
        f"notifier settings: {', '.join(f'{k}={v}' for k, v in settings.items())}",
        f"clock: Postgres - producer = {clock_offset_ms:+.2f} ms (same host, same clock);"
        f" poll every {config.poll_interval * 1000:.0f} ms",
    ])


def _aim_text(aim: dict[str, Any] | None, unit: str) -> str:
    if not aim:
        return ""
    value = f"{aim['value']:.0%}" if unit == "%" else f"{aim['value']:g}{unit}"
    return f"{aim['aim']}: {value} ({'met' if aim['met'] else 'NOT met'})"


def _print_throughput(outcomes: dict[str, Outcome], reached: dict[str, dict[str, Any]]) -> None:
    print("\nThroughput, end to end (first send -> last row committed)")
    print(f"{'scenario':<44}{'notifs':>8}{'seconds':>9}{'send s':>8}{'rate/s':>9}"
          f"{'x naive':>9}  aim")
    naive = outcomes.get("naive")
    for name in ("naive", *UNBUFFERED, *BULK):
        outcome = outcomes.get(name)
        if outcome is None:
            continue
        ratio = f"{outcome.rate / naive.rate:.1f}" if naive and naive.rate else "-"
        unit = "%" if name in UNBUFFERED else "x"
        print(f"{_label(outcome):<44}{outcome.notifications:>8,}{outcome.seconds:>9.2f}"
              f"{outcome.send_seconds:>8.2f}{outcome.rate:>9,.0f}{ratio:>9}  "
              f"{_aim_text(reached.get(name), unit)}")
    if naive and naive.notifications != outcomes.get("notify", naive).notifications:
        print(f"(the naive baseline sends {naive.notifications:,}; rates are per second, so"
              " they compare)")


def _label(outcome: Outcome) -> str:
    suffix = "" if outcome.complete else f" [TIMEOUT: {outcome.committed:,} rows]"
    return outcome.label + suffix


def _print_ceilings(outcomes: dict[str, Outcome], reached: dict[str, dict[str, Any]]) -> None:
    print("\nCeilings")
    for name in ("empty_task", "raw_copy", "in_process_ingest"):
        outcome = outcomes.get(name)
        if outcome:
            print(f"{_label(outcome):<44}{outcome.notifications:>8,}{outcome.seconds:>9.2f}"
                  f"{'':>8}{outcome.rate:>9,.0f}")
    for name in UNBUFFERED:
        aim = reached.get(name)
        if aim:
            print(f"  {outcomes[name].label}: {aim['value']:.0%} of the empty-task rate"
                  f" (aim {AIM_NOTIFY_VS_EMPTY:.0%}: {'met' if aim['met'] else 'NOT met'})")


def _print_latency(outcomes: dict[str, Outcome], reached: dict[str, dict[str, Any]]) -> None:
    outcome = outcomes.get("critical_under_backlog")
    if outcome is None:
        return
    extra = outcome.extra
    critical, backlog = extra["critical_latency_ms"], extra["backlog_latency_ms"]
    print("\nCritical latency under backlog (enqueue -> committed, computed in SQL)")
    print(f"  backlog: {outcome.notifications:,} normal via notify_many, drained in "
          f"{outcome.seconds:.2f} s = {outcome.rate:,.0f}/s"
          + ("" if outcome.complete else f" [TIMEOUT: {outcome.committed:,} rows]"))
    print(f"  critical: {extra['criticals']} sent one by one, {extra['critical_spacing_ms']:g} ms"
          f" apart, over {extra['criticals_send_seconds']:.2f} s, after the backlog was sent")
    for moment in ("first", "last"):
        state = extra[f"at_{moment}_critical"]
        print(f"  backlog at {moment} critical: {state['rows_pending']:,} rows to commit,"
              f" {state['messages_in_redis']:,} messages in Redis,"
              f" {state['messages_in_worker']:,} held unacknowledged by the worker")
    print(f"  critical latency ms: p50 {critical['p50']:.1f}  p99 {critical['p99']:.1f}  max "
          f"{critical['max']:.1f}  (n={critical['count']})   aim "
          f"{_aim_text(reached.get('critical_under_backlog'), ' ms')}")
    print(f"  backlog latency ms:  p50 {backlog['p50']:.1f}  p99 {backlog['p99']:.1f}  max "
          f"{backlog['max']:.1f}  (n={backlog['count']})")
    print(f"  criticals committed after the last backlog row: "
          f"{extra['criticals_committed_after_backlog']} of {critical['count']}")


def _print_cpu(outcomes: dict[str, Outcome]) -> None:
    rows = [o for o in outcomes.values() if o.cores]
    if not rows:
        return
    print("\nCPU: cores kept busy, averaged over each scenario (2 in all; postgres counts"
          " every backend on the server)")
    print(f"{'scenario':<44}" + "".join(f"{party:>10}" for party in PARTIES))
    for outcome in rows:
        print(f"{outcome.label:<44}"
              + "".join(f"{outcome.cores.get(party, 0):>10.2f}" for party in PARTIES))


def write_json(
    outcomes: dict[str, Outcome], machine: dict[str, Any], config: BenchConfig,
    clock_offset_ms: float, notifier_settings: dict[str, Any], path: Path | None = None,
) -> Path:
    path = path or RESULTS_DIR / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": machine,
        "config": {**asdict(config), "concurrency": CONCURRENCY},
        "notifier_settings": notifier_settings,
        "clock_offset_ms": round(clock_offset_ms, 3),
        "scenarios": {
            name: {**asdict(outcome), "rate_per_s": round(outcome.rate, 1),
                   "complete": outcome.complete}
            for name, outcome in outcomes.items()
        },
        "aims": aims(outcomes),
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path
