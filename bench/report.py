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
AIM_POOLED_EMAIL_VS_NAIVE = 3.0

BULK = ("buffered", "notify_many")
UNBUFFERED = ("notify", "notify_threads")
DELIVERY = ("email_naive", "email_reused", "email_pooled", "webhook_naive", "webhook_pooled")
#: Delivery ratios reported: (name, numerator, denominator).
DELIVERY_RATIOS = (
    ("email_reused / email_naive", "email_reused", "email_naive"),
    ("email_pooled / email_naive", "email_pooled", "email_naive"),
    ("email_pooled / email_reused", "email_pooled", "email_reused"),
    ("webhook_pooled / webhook_naive", "webhook_pooled", "webhook_naive"),
)


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
    ratios = delivery_ratios(outcomes)
    pooled = ratios.get("email_pooled / email_naive")
    if pooled is not None:
        results["email_pooled"] = {
            "aim": f">= {AIM_POOLED_EMAIL_VS_NAIVE:g}x naive e-mail", "value": pooled,
            "met": pooled >= AIM_POOLED_EMAIL_VS_NAIVE,
        }
    critical = outcomes.get("critical_under_backlog")
    if critical:
        p99 = critical.extra["critical_latency_ms"]["p99"]
        results["critical_under_backlog"] = {
            "aim": f"critical p99 <= {AIM_CRITICAL_P99_MS:.0f} ms", "value": round(p99, 1),
            "met": p99 <= AIM_CRITICAL_P99_MS,
        }
    return results


def delivery_ratios(outcomes: dict[str, Outcome]) -> dict[str, float]:
    """Rate ratios of the delivery scenarios, where both sides ran."""
    ratios = {}
    for name, top, bottom in DELIVERY_RATIOS:
        if top in outcomes and bottom in outcomes and outcomes[bottom].rate:
            ratios[name] = round(outcomes[top].rate / outcomes[bottom].rate, 2)
    in_process = _in_process_rate(outcomes)
    if in_process and "email_pooled" in outcomes:
        ratios["email_pooled / deliver_batch in 1 process"] = round(
            outcomes["email_pooled"].rate / in_process, 2)
    naive = outcomes.get("webhook_naive")
    pooled = outcomes.get("webhook_pooled")
    connection_only = naive.extra.get("new_connection_one_client_rate") if naive else None
    if pooled and connection_only:
        ratios["webhook_pooled / webhook new connection, one client"] = round(
            pooled.rate / connection_only, 2)
    return ratios


def _in_process_rate(outcomes: dict[str, Outcome]) -> float | None:
    reused = outcomes.get("email_reused")
    extra = reused.extra.get("in_process_pipeline") if reused else None
    return extra["rate_per_s"] if extra else None


def print_report(
    outcomes: dict[str, Outcome], machine: dict[str, Any], config: BenchConfig,
    clock_offset_ms: float, notifier_settings: dict[str, Any],
) -> None:
    print(_header(machine, config, clock_offset_ms, notifier_settings))
    reached = aims(outcomes)
    _print_throughput(outcomes, reached)
    _print_ceilings(outcomes, reached)
    _print_latency(outcomes, reached)
    _print_delivery(outcomes, reached)
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
        " empty task alike; the delivery worker: -c "
        f"{config.delivery_concurrency}), one fresh worker per scenario; producer: this"
        " process",
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


def _print_delivery(outcomes: dict[str, Outcome], reached: dict[str, dict[str, Any]]) -> None:
    rows = [outcomes[name] for name in DELIVERY if name in outcomes]
    if not rows:
        return
    servers = sorted({o.extra["server"] for o in rows if "server" in o.extra})
    print("\nDelivery (clock: first send -> last e-mail or request received, or for the"
          " worker,\nlast row 'sent'; servers: " + "; ".join(servers) + ")")
    print(f"{'scenario':<56}{'items':>7}{'seconds':>9}{'rate/s':>9}{'conns':>7}"
          f"{'server':>8}{'pg':>6}{'other':>7}{'cpu ms':>8}{'bytes':>7}  runs (rate/s)")
    for outcome in rows:
        extra = outcome.extra
        print(f"{_label(outcome):<56}{outcome.notifications:>7,}{outcome.seconds:>9.2f}"
              f"{outcome.rate:>9,.0f}{extra.get('server_connections', 0):>7,}"
              f"{outcome.cores.get('server', 0):>8.2f}{extra.get('postgres_ours_cores', 0):>6.2f}"
              f"{extra.get('other_cores', 0):>7.2f}"
              f"{extra.get('cpu_ms_per_item', 0):>8.2f}{extra.get('bytes_per_item', 0):>7,}"
              f"  {_runs(extra.get('rates_per_run'))}")
        in_process = extra.get("in_process_pipeline")
        if in_process:
            print(f"  {in_process['label']:<54}{in_process['sent']:>7,}"
                  f"{in_process['seconds']:>9.2f}{in_process['rate_per_s']:>9,.0f}"
                  f"{in_process['server_connections']:>7,}"
                  f"{in_process['cores'].get('server', 0):>8.2f}{'':>13}"
                  f"{in_process['cpu_ms_per_item']:>8.2f}{'':>7}"
                  f"  {_runs(in_process.get('rates_per_run'))}")
        if "warm_up_connections" in extra:
            print(f"  ({extra['tasks']} tasks; the pool's {extra['concurrency']} processes"
                  f" opened {extra['warm_up_connections']} connections while warming up)")
    naive = outcomes.get("webhook_naive")
    if naive and naive.extra.get("new_connection_one_client_rate"):
        print(f"  webhook, new connection each but one httpx client (no new SSL context):"
              f" {naive.extra['new_connection_one_client_rate']:,.0f}/s  runs "
              f"{_runs(naive.extra.get('new_connection_one_client_rates_per_run'))}")
    ratios = delivery_ratios(outcomes)
    if ratios:
        print("  ratios: " + ", ".join(f"{name} {value:g}x" for name, value in ratios.items()))
    for name, aim in reached.items():
        if name in DELIVERY:
            print(f"  aim: {name} {_aim_text(aim, 'x')}")
    print("  (rate: the fastest of the runs; conns: connections the server accepted while"
          " timed;\n   server: cores its processes used; pg: cores of the Postgres backends"
          " of the bench's database;\n   other: cores the rest of the machine used meanwhile"
          " (other people's work); cpu ms: CPU of\n   every party (server and pg included)"
          " per item; bytes: content received per item)")


def _runs(rates: list[float] | None) -> str:
    return " / ".join(f"{rate:,.0f}" for rate in rates or [])


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
        "delivery_ratios": delivery_ratios(outcomes),
        "aims": aims(outcomes),
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def write_markdown(
    outcomes: dict[str, Outcome], machine: dict[str, Any], path: Path | None = None,
) -> Path:
    """The figures as Markdown tables (``bench/results/latest.md``), ready for the README."""
    path = path or RESULTS_DIR / "latest.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Figures of {machine['date']} (git {machine['git_commit']}): {machine['cpu_count']}"
        f" CPUs ({machine['cpu_model']}), Python {machine['python']}, PostgreSQL"
        f" {machine['postgres']}, Redis {machine['redis']}, Celery {machine['celery']};"
        f" load average {machine['load_average_at_start'][0]:g} at start,"
        f" {(machine.get('load_average_at_end') or ['?'])[0]} at end.",
    ]
    others = [o for name, o in outcomes.items() if name not in DELIVERY]
    if others:
        lines += ["", "| scenario | items | seconds | rate / s |", "|---|---:|---:|---:|"]
        lines += [f"| {_label(o)} | {o.notifications:,} | {o.seconds:.2f} | {o.rate:,.0f} |"
                  for o in others]
    lines += _markdown_delivery(outcomes)
    reached = aims(outcomes)
    if reached:
        lines += ["", "Aims: " + "; ".join(
            f"{name} {aim['aim']}: {aim['value']:g} ({'met' if aim['met'] else 'not met'})"
            for name, aim in reached.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def _markdown_delivery(outcomes: dict[str, Outcome]) -> list[str]:
    rows = [outcomes[name] for name in DELIVERY if name in outcomes]
    if not rows:
        return []
    lines = ["", "| delivery scenario | items | rate / s | x naive | CPU ms / item |"
                 " connections opened | runs (rate / s) |", "|---|---:|---:|---:|---:|---:|---|"]
    for outcome in rows:
        naive = outcomes.get(outcome.name.split("_")[0] + "_naive")
        ratio = f"{outcome.rate / naive.rate:.2f}" if naive and naive.rate else ""
        extra = outcome.extra
        lines.append(f"| {_label(outcome)} | {outcome.notifications:,} | {outcome.rate:,.0f} |"
                     f" {ratio} | {extra.get('cpu_ms_per_item', 0):.2f} |"
                     f" {extra.get('server_connections', 0):,} |"
                     f" {_runs(extra.get('rates_per_run'))} |")
        in_process = extra.get("in_process_pipeline")
        if in_process:
            naive_rate = naive.rate if naive and naive.rate else 0
            ratio = f"{in_process['rate_per_s'] / naive_rate:.2f}" if naive_rate else ""
            lines.append(f"| {in_process['label']} | {in_process['sent']:,} |"
                         f" {in_process['rate_per_s']:,.0f} | {ratio} |"
                         f" {in_process['cpu_ms_per_item']:.2f} |"
                         f" {in_process['server_connections']:,} |"
                         f" {_runs(in_process.get('rates_per_run'))} |")
    naive = outcomes.get("webhook_naive")
    if naive and naive.rate and naive.extra.get("new_connection_one_client_rate"):
        rate = naive.extra["new_connection_one_client_rate"]
        lines.append(f"| webhook: new connection each, one httpx client, 1 process |"
                     f" {naive.notifications:,} | {rate:,.0f} | {rate / naive.rate:.2f} | |"
                     f" {naive.notifications:,} |"
                     f" {_runs(naive.extra.get('new_connection_one_client_rates_per_run'))} |")
    servers = sorted({o.extra["server"] for o in rows if "server" in o.extra})
    lines += ["", "Rate: the fastest of the runs. Servers: " + "; ".join(servers)
              + ", each in processes of their own."]
    return lines
