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
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import baseline as baseline_module
from bench import profile as profile_module
from bench.api import FANOUT_AIM_MS
from bench.config import CONCURRENCY, RESULTS_DIR, BenchConfig
from bench.cpu import PARTIES
from bench.scenarios import Outcome
from bench.series import quantiles, summary

#: Aims the figures are read against (printed, not asserted). Issue 12 set the targets
#: of the ingest code alone, the bulk paths, critical and flush latency, pooled e-mail.
AIM_INGEST_CODE_RATE = 25_000.0
AIM_BULK_VS_NAIVE = 40.0
AIM_NOTIFY_VS_EMPTY = 0.80
AIM_CRITICAL_P99_MS = 50.0
AIM_POOLED_EMAIL_VS_NAIVE = 3.0
#: The product's promise: "up to 60 % fewer messages" than one per notification.
AIM_MESSAGES_SAVED = 0.60
AIM_FLUSH_P99_MS = 500.0
#: Issue 15: a failover adds at most the connect timeout plus this to an attempt.
AIM_FAILOVER_EXTRA_MS = 50.0
#: Issue 14's HTTP API: single sends per second and their p99, over keep-alive on this
#: 2-core machine; lists at least at the bulk ingest rate (``notify_many``, same run);
#: every live inbox stream gets a new message within FANOUT_AIM_MS.
AIM_API_SINGLE_RATE = 2000.0
AIM_API_SINGLE_P99_MS = 20.0
#: Each target by the scenario whose figure it reads (the report lists the ones a run
#: did not measure, so a partial run cannot look like a met target).
TARGETS = {
    "in_process_ingest": f"ingest code alone >= {AIM_INGEST_CODE_RATE:,.0f}/s",
    "buffered": f">= {AIM_BULK_VS_NAIVE:.0f}x naive",
    "notify_many": f">= {AIM_BULK_VS_NAIVE:.0f}x naive",
    "critical_under_backlog": f"critical p99 <= {AIM_CRITICAL_P99_MS:.0f} ms",
    "flush_latency": f"flush p99 <= {AIM_FLUSH_P99_MS:.0f} ms",
    "email_pooled": f">= {AIM_POOLED_EMAIL_VS_NAIVE:g}x naive e-mail",
    "email_failover": f"failover extra p99 <= connect timeout + {AIM_FAILOVER_EXTRA_MS:g} ms",
    "api_single": f">= {AIM_API_SINGLE_RATE:,.0f} single sends/s, p99 <="
                  f" {AIM_API_SINGLE_P99_MS:g} ms",
    "api_lists": "lists end to end >= notify_many()'s rate",
    "sse_fanout": f"every stream gets each message within {FANOUT_AIM_MS / 1000:g} s",
}
#: Scenarios whose CPU profile the report shows (``bench.profile``).
PROFILED = ("in_process_ingest", "email_pooled", "webhook_pooled", "api_single", "api_lists",
            "sse_fanout")
#: The HTTP API's send scenarios (``bench.api``), each with what it is compared with.
API_SENDS = {"api_single": "notify", "api_lists": "notify_many"}
SSE_CASES = ("many_recipients", "one_recipient")

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
    ingest = outcomes.get("in_process_ingest")
    if ingest:
        results["in_process_ingest"] = {
            "aim": TARGETS["in_process_ingest"], "value": round(ingest.rate),
            "met": ingest.complete and ingest.rate >= AIM_INGEST_CODE_RATE}
    for name in BULK:
        if name in outcomes and naive and naive.rate:
            ratio = outcomes[name].rate / naive.rate
            results[name] = {"aim": TARGETS[name],
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
            "aim": TARGETS["email_pooled"], "value": pooled,
            "met": pooled >= AIM_POOLED_EMAIL_VS_NAIVE,
        }
    failover = outcomes.get("email_failover")
    if failover:
        results["email_failover"] = failover_aim(failover)
    critical = outcomes.get("critical_under_backlog")
    if critical:
        p99 = critical.extra["critical_latency_ms"]["p99"]
        results["critical_under_backlog"] = {
            "aim": TARGETS["critical_under_backlog"], "value": round(p99, 1),
            "met": p99 <= AIM_CRITICAL_P99_MS,
        }
    efficiency = outcomes.get("aggregation_efficiency")
    if efficiency:
        saved = efficiency.extra["messages_saved"]
        results["aggregation_efficiency"] = {
            "aim": f">= {AIM_MESSAGES_SAVED:.0%} fewer messages than naive",
            "value": saved, "met": saved >= AIM_MESSAGES_SAVED,
        }
    results.update(api_aims(outcomes))
    flush = outcomes.get("flush_latency")
    if flush:
        p99 = flush.extra["flush_latency_ms"]["p99"]
        results["flush_latency"] = {
            "aim": f"{TARGETS['flush_latency']} at {flush.notifications:,} waiting",
            "value": p99, "met": p99 is not None and p99 <= AIM_FLUSH_P99_MS
                                 and flush.extra.get("windows_left", 0) == 0,
        }
    return results


def api_aims(outcomes: dict[str, Outcome]) -> dict[str, dict[str, Any]]:
    """Issue 14's aims for the HTTP API, from the scenarios of ``bench.api``."""
    results: dict[str, dict[str, Any]] = {}
    single = outcomes.get("api_single")
    if single:
        rate = single.extra["requests_per_s"]
        p99 = single.extra["request_latency_ms"]["p99"]
        results["api_single"] = {
            "aim": TARGETS["api_single"], "value": rate, "p99_ms": p99,
            "met": (single.complete and _all_accepted(single) and p99 is not None
                    and rate >= AIM_API_SINGLE_RATE and p99 <= AIM_API_SINGLE_P99_MS)}
    lists, bulk = outcomes.get("api_lists"), outcomes.get("notify_many")
    if lists and bulk and bulk.rate:
        ratio = round(lists.rate / bulk.rate, 2)
        results["api_lists"] = {"aim": TARGETS["api_lists"], "value": ratio,
                                "met": lists.complete and _all_accepted(lists) and ratio >= 1}
    fanout = outcomes.get("sse_fanout")
    if fanout:
        cases = [fanout.extra[name] for name in SSE_CASES]
        expected = sum(case["expected"] for case in cases)
        within = sum(case["within_1s"] for case in cases)
        share = round(within / expected, 4) if expected else 0.0
        results["sse_fanout"] = {
            "aim": f"{TARGETS['sse_fanout']} ({fanout.extra['streams']:,} streams)",
            "value": share,
            "met": bool(expected) and within == expected
                   and all(case["open"] == case["streams"] for case in cases)}
    return results


def _all_accepted(outcome: Outcome) -> bool:
    """Every request of an API scenario was answered, and answered 202."""
    extra = outcome.extra
    return not extra["errors"] and extra["statuses"] == {"202": extra["requests"]}


def _promise_text(outcome: Outcome) -> str:
    """The product's promise read against the mix and against each type."""
    rows = sorted(per_type_efficiency(outcome), key=lambda row: row["saved"])
    saved = outcome.extra["messages_saved"]
    text = (f"The promise, \"up to {AIM_MESSAGES_SAVED:.0%} fewer messages\": over the whole"
            f" mix {saved:.1%} ({'met' if saved >= AIM_MESSAGES_SAVED else 'not met'})")
    if rows:
        reach = [row["type"] for row in rows if row["saved"] >= AIM_MESSAGES_SAVED]
        text += (f"; per type from {rows[0]['saved']:.1%} ({rows[0]['type']}) to"
                 f" {rows[-1]['saved']:.1%} ({rows[-1]['type']}), "
                 + (f"{', '.join(reach)} reaching it" if reach else "none reaching it"))
    return text + "."


def per_type_efficiency(outcome: Outcome) -> list[dict[str, Any]]:
    """Per type: notifications in, messages out, share saved, notifications per message."""
    rows = []
    for name, counts in outcome.extra["per_type"].items():
        sent, received = counts["out"], counts["in"]
        rows.append({"type": name, "in": received, "out": sent,
                     "saved": round(1 - sent / received, 3) if received else 0.0,
                     "per_message": round(received / sent, 2) if sent else 0.0})
    return rows


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
    _print_aggregation(outcomes, reached)
    _print_delivery(outcomes, reached)
    _print_failover(outcomes, reached)
    for line in receipts_callbacks_lines(outcomes):
        print(line)
    for line in api_lines(outcomes, reached):
        print(line)
    _print_cpu(outcomes)
    _print_profiles(outcomes)


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
        held = state["messages_in_worker"]
        print(f"  backlog at {moment} critical: {state['rows_pending']:,} rows to commit,"
              f" {state['messages_in_broker']:,} messages in the broker,"
              + (" held by the worker: not readable over AMQP" if held is None else
                 f" {held:,} held unacknowledged by the worker"))
    print(f"  critical latency ms: p50 {critical['p50']:.1f}  p99 {critical['p99']:.1f}  max "
          f"{critical['max']:.1f}  (n={critical['count']})   aim "
          f"{_aim_text(reached.get('critical_under_backlog'), ' ms')}")
    print(f"  backlog latency ms:  p50 {backlog['p50']:.1f}  p99 {backlog['p99']:.1f}  max "
          f"{backlog['max']:.1f}  (n={backlog['count']})")
    print(f"  criticals committed after the last backlog row: "
          f"{extra['criticals_committed_after_backlog']} of {critical['count']}")


def _print_aggregation(outcomes: dict[str, Outcome], reached: dict[str, dict[str, Any]]) -> None:
    efficiency, flush = outcomes.get("aggregation_efficiency"), outcomes.get("flush_latency")
    if efficiency:
        extra = efficiency.extra
        print("\nAggregation efficiency (simulated clock; naive: one message per notification)")
        print(f"  {efficiency.label}: {extra['messages_out']:,} messages out"
              f" ({extra['digest_messages']:,} digests) instead of"
              f" {extra['naive_messages_out']:,}: {extra['messages_saved']:.1%} fewer,"
              f" {extra['notifications_per_message']:g} notifications per message"
              f" (replayed in {efficiency.seconds:.1f} s)   aim"
              f" {_aim_text(reached.get('aggregation_efficiency'), '%')}")
        print(f"  {'type':<20}{'in':>8}{'out':>8}{'saved':>8}{'per msg':>9}")
        for row in per_type_efficiency(efficiency):
            print(f"  {row['type']:<20}{row['in']:>8,}{row['out']:>8,}{row['saved']:>8.1%}"
                  f"{row['per_message']:>9.2f}")
        print(f"  {_promise_text(efficiency)}")
    if flush:
        extra, lag = flush.extra, flush.extra["flush_latency_ms"]
        print("\nFlush latency (window close -> digest delivery queued; a real worker's flush"
              f" loop, armed by a real beat ticking every {extra['flush_interval_s']:g} s)")
        print(f"  {flush.label}: {extra['digests_queued']:,} digests queued,"
              f" {flush.committed:,} notifications digested, last window flushed"
              f" {flush.seconds:.1f} s after the first closed"
              + (f" [{extra['windows_left']:,} windows LEFT]" if extra["windows_left"] else ""))
        print(f"  flush latency ms: p50 {_num(lag['p50'])}  p99 {_num(lag['p99'])}  max"
              f" {_num(lag['max'])}  (n={lag['count']})   aim"
              f" {_aim_text(reached.get('flush_latency'), ' ms')}")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def failover_aim(outcome: Outcome) -> dict[str, Any]:
    """The worst case's p99 extra beyond what the aim allows it (the connect timeout for
    a blackholed provider, nothing for the others): met at or below 50 ms."""
    extra, timeout_ms = outcome.extra["extra_ms"], outcome.extra["connect_timeout_s"] * 1000
    over = [figures["p99"] - (timeout_ms if case == "blackholed" else 0.0)
            for case, figures in extra.items() if figures.get("p99") is not None]
    worst = max(over) if over else None
    return {"aim": TARGETS["email_failover"], "value": None if worst is None else round(worst, 1),
            "met": worst is not None and worst <= AIM_FAILOVER_EXTRA_MS}


def failover_lines(outcome: Outcome) -> list[str]:
    """One line per case: an attempt's p50/p99 and the extra over a direct attempt."""
    extra = outcome.extra
    lines = []
    for case, figures in extra["attempts_ms"].items():
        more = extra["extra_ms"].get(case, {})
        lines.append(
            f"{case:<14}{figures['count']:>6}{_num(figures['p50']):>9}{_num(figures['p99']):>9}"
            f"{_num(more.get('p50')):>12}{_num(more.get('p99')):>12}")
    return lines


def receipts_callbacks_lines(outcomes: dict[str, Outcome]) -> list[str]:
    """Issue 15's receipts processed and status callbacks sent per second."""
    receipts, callbacks = outcomes.get("receipts"), outcomes.get("callbacks")
    if not receipts and not callbacks:
        return []
    lines = ["\nReceipts and status callbacks"]
    if receipts:
        latency = receipts.extra.get("latency_ms", {})
        lines.append(f"receipts processed  {receipts.rate:>9,.1f}/s  ({receipts.committed} of"
                     f" {receipts.notifications} applied; request p50 {latency.get('p50')} ms,"
                     f" p99 {latency.get('p99')} ms; {receipts.label})")
    if callbacks:
        lines.append(f"callbacks sent      {callbacks.rate:>9,.1f}/s  ({callbacks.committed} of"
                     f" {callbacks.notifications}, {callbacks.extra.get('received')} received;"
                     f" the trigger wrote them in {callbacks.extra.get('trigger_ms')} ms;"
                     f" {callbacks.label})")
    return lines


def _print_failover(outcomes: dict[str, Outcome], reached: dict[str, dict[str, Any]]) -> None:
    failover = outcomes.get("email_failover")
    if not failover:
        return
    print(f"\nFailover (one deliver_batch of 1 e-mail per attempt; primary connect timeout"
          f" {failover.extra['connect_timeout_s']:g} s; ms)")
    print(f"{'case':<14}{'tries':>6}{'p50':>9}{'p99':>9}{'extra p50':>12}{'extra p99':>12}")
    for line in failover_lines(failover):
        print(line)
    print(f"  aim: {_aim_text(reached.get('email_failover'), ' ms')} (the worst case's p99"
          " extra beyond its connect timeout)")


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
          " every backend on the server); us/item: CPU of every party per item done;"
          " ceiling: the rate that CPU allows on this machine's cores")
    print(f"{'scenario':<44}" + "".join(f"{party:>10}" for party in PARTIES)
          + f"{'us/item':>9}{'ceiling/s':>11}")
    for outcome in rows:
        per_item = cpu_per_item(outcome)
        print(f"{outcome.label:<44}"
              + "".join(f"{outcome.cores.get(party, 0):>10.2f}" for party in PARTIES)
              + (f"{per_item[0]:>9,.0f}{per_item[1]:>11,.0f}" if per_item else ""))


def cpu_per_item(outcome: Outcome) -> tuple[float, float] | None:
    """(microseconds of CPU per item done, every party together; the rate at which that
    CPU would keep all of this machine's cores busy). A scenario whose rate is close to
    its ceiling is CPU-bound here: only less CPU per item makes it faster, whatever the
    design; one far below it waits (on locks, round trips, a single busy process)."""
    if not outcome.cores or outcome.committed <= 0 or outcome.seconds <= 0:
        return None
    micros = sum(outcome.cores.values()) * outcome.seconds / outcome.committed * 1e6
    if micros <= 0:
        return None
    return micros, (os.cpu_count() or 1) * 1e6 / micros


def _print_profiles(outcomes: dict[str, Outcome], top: int = 5) -> None:
    found = [outcomes[name].extra["profile"] for name in PROFILED
             if name in outcomes and outcomes[name].extra.get("profile")]
    if found:
        print("\nCPU profiles (py-spy, samples holding the GIL; the report lists more)")
    for profile in found:
        if not profile["samples"]:
            print(f"  {profile['what']}: {profile['note']}")
            continue
        print(f"  {profile['what']} ({profile['samples']:,} samples), top by self share:")
        for name, share in profile["self_share"][:top]:
            print(f"    {share:>6.1%}  {name}")


def scenario_document(outcome: Outcome) -> dict[str, Any]:
    """One scenario as JSON: its figures, its series, its latencies summarised (count,
    p50, p99, max) and as 201 quantiles (enough to redraw their distribution)."""
    fields = asdict(outcome)
    samples = fields.pop("samples")
    fields["series"] = [list(point) for point in outcome.series]
    fields["latency_ms"] = {
        kind: {**summary(values), "quantiles": quantiles(values)}
        for kind, values in samples.items()
    }
    return {**fields, "rate_per_s": round(outcome.rate, 1), "complete": outcome.complete}


def document(
    outcomes: dict[str, Outcome], machine: dict[str, Any], config: BenchConfig,
    clock_offset_ms: float, notifier_settings: dict[str, Any],
) -> dict[str, Any]:
    """Everything one run measured, as ``latest.json`` holds it and the plots read it."""
    return {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "machine": machine,
        "config": {**asdict(config), "concurrency": CONCURRENCY},
        "notifier_settings": notifier_settings,
        "clock_offset_ms": round(clock_offset_ms, 3),
        "scenarios": {name: scenario_document(outcome) for name, outcome in outcomes.items()},
        "delivery_ratios": delivery_ratios(outcomes),
        "aims": aims(outcomes),
    }


def write_json(document: dict[str, Any], path: Path | None = None) -> Path:
    path = path or RESULTS_DIR / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    return path


def machine_line(machine: dict[str, Any]) -> str:
    """The machine and software a run came from, in one sentence."""
    end = machine.get("load_average_at_end") or ["?"]
    return (f"{machine['date']} (git {machine['git_commit']}), host {machine['host']}:"
            f" {machine['cpu_count']} CPUs ({machine['cpu_model']}), Python"
            f" {machine['python']}, PostgreSQL {machine['postgres']}, Redis"
            f" {machine['redis']}, Celery {machine['celery']}, kombu {machine['kombu']},"
            f" psycopg {machine['psycopg']}; load average (1 min) "
            f"{machine['load_average_at_start'][0]:g} at start, {end[0]:g} at end")


def write_markdown(
    outcomes: dict[str, Outcome], doc: dict[str, Any], plots: dict[str, Path] | None = None,
    plot_note: str = "", path: Path | None = None, baseline: dict[str, Any] | None = None,
) -> Path:
    """The one report of a run (``bench/results/report.md``): machine, settings, aims,
    the figures against the baseline (``bench.baseline``), every table, the CPU profiles,
    and the plots beside it."""
    path = path or RESULTS_DIR / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    machine, config = doc["machine"], doc["config"]
    reached = doc["aims"]
    lines = [
        "# notifier benchmark report", "",
        f"Run: `{doc['command']}`, {machine_line(machine)}.", "",
        "Settings: every worker prefork with concurrency"
        f" {config['concurrency']} (the delivery worker {config['delivery_concurrency']}),"
        " a fresh one per scenario; the producer is the benchmark process on the same"
        f" machine; {config['count']:,} notifications per pipeline scenario, naive"
        f" baseline {config['naive_count']:,}, empty task {config['empty_count']:,},"
        f" {config['criticals']} critical, {config['emails']:,} e-mails,"
        f" {config['webhooks']:,} webhooks (naive {config['naive_webhooks']:,}), delivery"
        f" runs {config['delivery_runs']} (fastest counts), aggregation"
        f" {config['aggregation_recipients']:,} recipients x"
        f" {config['aggregation_hours']:g} h simulated, flush latency"
        f" {config['flush_waiting']:,} waiting over {config['flush_spread']:g} s. Notifier:"
        f" {', '.join(f'{k}={v}' for k, v in doc['notifier_settings'].items())}.",
    ]
    again = [name for name, o in outcomes.items() if o.extra.get("attempts", 1) > 1]
    if again:
        lines += ["", f"Run a second time, from scratch, because Postgres or Redis restarted"
                  f" during the first (another session's chaos test): {', '.join(again)}."]
    lines += markdown_aims(reached)
    lines += baseline_module.markdown(
        baseline_module.compare(doc, baseline) if baseline else [], baseline)
    lines += _markdown_ingest(outcomes, reached)
    lines += _markdown_latency(outcomes)
    lines += _markdown_aggregation(outcomes)
    lines += _markdown_delivery(outcomes)
    lines += _markdown_failover(outcomes)
    receipts_callbacks = receipts_callbacks_lines(outcomes)
    if receipts_callbacks:
        lines += ["", "## Receipts and status callbacks", "", "```",
                  *receipts_callbacks[1:], "```"]
    lines += markdown_api(outcomes, reached)
    lines += _markdown_cpu(outcomes)
    lines += markdown_profiles(doc, baseline)
    if plots or plot_note:
        lines += ["", "## Plots", ""]
        for name, plot in (plots or {}).items():
            lines += [f"![{name}]({plot.name})", ""]
        if plot_note:
            lines.append(plot_note)
    path.write_text("\n".join(lines) + "\n")
    return path


def markdown_aims(reached: dict[str, dict[str, Any]]) -> list[str]:
    """Every aim the run measured, met or not, then each target it did not measure."""
    missing = [name for name in TARGETS if name not in reached]
    if not reached and not missing:
        return []
    lines = ["", "## Aims", "", "| scenario | aim | figure | met |", "|---|---|---:|---|"]
    lines += [f"| {name} | {aim['aim']} | {_aim_value(name, aim)} |"
              f" {'yes' if aim['met'] else '**no**'} |" for name, aim in reached.items()]
    lines += [f"| {name} | {TARGETS[name]} | - | not measured in this run |"
              for name in missing]
    return lines


def markdown_profiles(doc: dict[str, Any], baseline: dict[str, Any] | None) -> list[str]:
    """The CPU profiles of the hot paths, beside the baseline's shares."""
    scenarios = doc["scenarios"]
    found = [name for name in PROFILED
             if scenarios.get(name, {}).get("extra", {}).get("profile")]
    if not found:
        return []
    before = (baseline or {}).get("profiles", {})
    lines = ["", "## CPU profiles of the hot paths", "",
             "Taken with py-spy on an extra, untimed pass of each scenario; a share is of"
             " the samples where a thread held the GIL (Python at work, not waits for"
             " Postgres or a server). Raw stacks: `bench/results/profile-<scenario>.txt`."]
    for name in found:
        lines += profile_module.markdown(scenarios[name]["extra"]["profile"], before.get(name))
    return lines


def _aim_value(name: str, aim: dict[str, Any]) -> str:
    value = aim["value"]
    if value is None:
        return "-"
    if name == "in_process_ingest":
        return f"{value:,.0f}/s"
    if name == "api_single":
        return f"{value:,.0f}/s, p99 {_num(aim.get('p99_ms'))} ms"
    if name == "api_lists":
        return f"{value:g}x notify_many()"
    if name == "sse_fanout":
        return f"{value:.1%} within {FANOUT_AIM_MS / 1000:g} s"
    if name in UNBUFFERED or name == "aggregation_efficiency":
        return f"{value:.1%}"
    if "ms" in aim["aim"]:
        return f"{value:,.1f} ms"
    return f"{value:g}x"


def _markdown_ingest(outcomes: dict[str, Outcome], reached: dict[str, Any]) -> list[str]:
    rows = [name for name in ("naive", *UNBUFFERED, *BULK) if name in outcomes]
    ceilings = [n for n in ("empty_task", "raw_copy", "in_process_ingest") if n in outcomes]
    if not rows and not ceilings:
        return []
    naive = outcomes.get("naive")
    lines = ["", "## Ingest throughput (first send -> last row committed)", "",
             "| scenario | notifications | seconds | send s | rate / s | x naive | aim |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name in rows + ceilings:
        o = outcomes[name]
        ratio = f"{o.rate / naive.rate:.1f}" if naive and naive.rate and name in rows else ""
        aim = reached.get(name)
        aim_text = (f"{aim['aim']}: {_aim_value(name, aim)}"
                    f" ({'met' if aim['met'] else 'not met'})") if aim else ""
        prefix = "ceiling: " if name in ceilings else ""
        lines.append(f"| {prefix}{_label(o)} | {o.notifications:,} | {o.seconds:.2f} |"
                     f" {o.send_seconds:.2f} | {o.rate:,.0f} | {ratio} | {aim_text} |")
    return lines


def _markdown_latency(outcomes: dict[str, Outcome]) -> list[str]:
    outcome = outcomes.get("critical_under_backlog")
    if outcome is None:
        return []
    extra = outcome.extra
    critical, backlog = extra["critical_latency_ms"], extra["backlog_latency_ms"]
    first = extra["at_first_critical"]
    return [
        "", "## Critical latency under backlog (enqueue -> committed)", "",
        f"{outcome.notifications:,} normal notifications sent with notify_many, drained in"
        f" {outcome.seconds:.2f} s ({outcome.rate:,.0f}/s); then {extra['criticals']}"
        f" critical ones one by one, {extra['critical_spacing_ms']:g} ms apart. At the"
        f" first critical, {first['rows_pending']:,} backlog rows were still to commit.",
        "", "| | n | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|",
        f"| critical | {critical['count']} | {critical['p50']:.1f} | {critical['p99']:.1f} |"
        f" {critical['max']:.1f} |",
        f"| backlog (normal) | {backlog['count']:,} | {backlog['p50']:.1f} |"
        f" {backlog['p99']:.1f} | {backlog['max']:.1f} |",
        "", f"Critical rows committed after the last backlog row:"
        f" {extra['criticals_committed_after_backlog']} of {critical['count']}.",
    ]


def _markdown_aggregation(outcomes: dict[str, Outcome]) -> list[str]:
    efficiency, flush = outcomes.get("aggregation_efficiency"), outcomes.get("flush_latency")
    lines: list[str] = []
    if efficiency:
        extra = efficiency.extra
        lines += [
            "", "## Aggregation efficiency (simulated clock)", "",
            f"{efficiency.label} (mixed types in bursts, 10 s ticks, the real ingest and"
            f" flush code): {extra['messages_out']:,} messages instead of"
            f" {extra['naive_messages_out']:,} (naive: one per notification), of which"
            f" {extra['digest_messages']:,} digests: **{extra['messages_saved']:.1%} fewer"
            f" messages**, {extra['notifications_per_message']:g} notifications per message.",
            "", "| type | notifications | messages | saved | notifications / message |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [f"| {r['type']} | {r['in']:,} | {r['out']:,} | {r['saved']:.1%} |"
                  f" {r['per_message']:.2f} |" for r in per_type_efficiency(efficiency)]
        lines.append(f"| all | {efficiency.notifications:,} | {extra['messages_out']:,} |"
                     f" {extra['messages_saved']:.1%} | {extra['notifications_per_message']:.2f} |")
        lines += ["", _promise_text(efficiency)]
    if flush:
        extra, lag = flush.extra, flush.extra["flush_latency_ms"]
        left = extra["windows_left"]
        lines += [
            "", "## Flush latency (window close -> digest delivery queued)", "",
            f"{flush.label}; a real worker's flush loop armed by a real beat (tick every"
            f" {extra['flush_interval_s']:g} s, {extra['flush_batch_size']} windows per"
            f" transaction). {extra['digests_queued']:,} digests queued; the last window"
            f" was flushed {flush.seconds:.1f} s after the first closed"
            + (f"; **{left:,} windows were left at the timeout**" if left else "") + ".",
            "", "| n | p50 ms | p99 ms | max ms |", "|---:|---:|---:|---:|",
            f"| {lag['count']:,} | {_num(lag['p50'])} | {_num(lag['p99'])} |"
            f" {_num(lag['max'])} |",
        ]
    return lines


def _markdown_cpu(outcomes: dict[str, Outcome]) -> list[str]:
    rows = [o for o in outcomes.values() if o.cores]
    if not rows:
        return []
    lines = ["", "## CPU (cores kept busy, averaged over each scenario; 2 in all)", "",
             "µs/item: the CPU of every party per item done; ceiling: the rate at which that"
             " CPU keeps every core of this machine busy (a rate close to it is CPU-bound"
             " here; one far below it waits).", "",
             "| scenario | " + " | ".join(PARTIES) + " | µs/item | ceiling/s |",
             "|---|" + "---:|" * (len(PARTIES) + 2)]
    for o in rows:
        per_item = cpu_per_item(o)
        tail = f" {per_item[0]:,.0f} | {per_item[1]:,.0f} |" if per_item else "  |  |"
        lines.append(f"| {o.label} | " + " | ".join(f"{o.cores.get(p, 0):.2f}" for p in PARTIES)
                     + " |" + tail)
    return lines


def _markdown_failover(outcomes: dict[str, Outcome]) -> list[str]:
    failover = outcomes.get("email_failover")
    if not failover:
        return []
    extra = failover.extra
    lines = ["", "## Failover between providers (one deliver_batch of 1 e-mail per attempt)",
             "", "| case | attempts | p50 ms | p99 ms | extra p50 ms | extra p99 ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for case, figures in extra["attempts_ms"].items():
        more = extra["extra_ms"].get(case, {})
        lines.append(f"| {case} | {figures['count']} | {_num(figures['p50'])} |"
                     f" {_num(figures['p99'])} | {_num(more.get('p50'))} |"
                     f" {_num(more.get('p99'))} |")
    lines += ["", f"direct: one provider, up; refused: the preferred provider's port closed;"
              f" blackholed: it drops SYNs (connect timeout {extra['connect_timeout_s']:g} s);"
              " circuit_open: its circuit open, passed over. Extra: less direct's."]
    return lines


def _markdown_delivery(outcomes: dict[str, Outcome]) -> list[str]:
    rows = [outcomes[name] for name in DELIVERY if name in outcomes]
    if not rows:
        return []
    lines = ["", "## Delivery (first send -> last e-mail or request received, or for the"
             " worker, last row sent)",
             "", "| delivery scenario | items | rate / s | x naive | CPU ms / item |"
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
    ratios = delivery_ratios(outcomes)
    if ratios:
        lines += ["", "Ratios: " + ", ".join(f"{name} {value:g}x"
                                             for name, value in ratios.items()) + "."]
    for outcome in rows:
        lag = outcome.samples.get("publish_to_sent")
        if lag:
            figures = summary(lag)
            lines += ["", f"{_label(outcome)}, publish -> sent per delivery (every task"
                      f" published at once, so mostly the wait in the queue): p50"
                      f" {_num(figures['p50'])} ms, p99 {_num(figures['p99'])} ms, max"
                      f" {_num(figures['max'])} ms (n={figures['count']:,})."]
    return lines


# -- the HTTP API (issue 14, bench.api) ----------------------------------------------------


def _cores_text(cores: dict[str, float]) -> str:
    worker = cores.get("consumer", 0) + cores.get("pool", 0)
    return (f"api {cores.get('api', 0):.2f}, load generator {cores.get('loadgen', 0):.2f},"
            f" worker {worker:.2f}, Postgres {cores.get('postgres', 0):.2f}, Redis"
            f" {cores.get('redis', 0):.2f}")


def api_cpu_ms_per_request(outcome: Outcome) -> float | None:
    """CPU the API's processes spent per request while the load ran, in ms."""
    extra = outcome.extra
    if not extra.get("answered"):
        return None
    cores = float(extra["send_cores"].get("api", 0))
    return round(cores * outcome.send_seconds / int(extra["answered"]) * 1000, 2)


def comparison_text(outcomes: dict[str, Outcome], name: str) -> str:
    """The API scenario's end-to-end rate against its producer twin of the same run."""
    outcome, twin = outcomes[name], outcomes.get(API_SENDS[name])
    if twin is None or not twin.rate:
        return (f"{name}: {outcome.rate:,.0f}/s end to end; {API_SENDS[name]} did not run"
                " (add it to --only to compare)")
    return (f"{name}: {outcome.rate:,.0f}/s end to end against {twin.label}"
            f" {twin.rate:,.0f}/s in the same run ({outcome.rate / twin.rate:.2f}x); while"
            f" sending {outcome.extra['notifications_per_s_http']:,.0f} notifications/s"
            f" over HTTP against {twin.committed / twin.send_seconds:,.0f}/s handed to the"
            " broker by the producer")


def api_lines(outcomes: dict[str, Outcome], reached: dict[str, Any]) -> list[str]:
    """The HTTP API's figures as the printed report shows them."""
    lines: list[str] = []
    sends = [name for name in API_SENDS if name in outcomes]
    if sends:
        lines += ["", "HTTP API: POST /v1/notifications over keep-alive (a real notifier api,"
                      " a real worker; the load generator in a process of its own)"]
    for name in sends:
        o, extra = outcomes[name], outcomes[name].extra
        lat = extra["request_latency_ms"]
        lines += [
            f"  {_label(o)}",
            f"    {extra['answered']:,} of {extra['requests']:,} requests"
            f" ({', '.join(f'{k}: {v:,}' for k, v in extra['statuses'].items())}) in"
            f" {o.send_seconds:.2f} s: {extra['requests_per_s']:,.0f} requests/s,"
            f" {extra['notifications_per_s_http']:,.0f} notifications/s; latency ms p50"
            f" {_num(lat['p50'])} p99 {_num(lat['p99'])} max {_num(lat['max'])};"
            f" API CPU {_num(api_cpu_ms_per_request(o))} ms/request",
            f"    end to end (first request -> last row committed): {o.rate:,.0f}/s;"
            f" cores while sending: {_cores_text(extra['send_cores'])}",
            f"    {comparison_text(outcomes, name)}",
        ]
        if extra["errors"] or extra["sample_error"]:
            lines.append(f"    errors: {extra['errors'][:2]} {extra['sample_error'][:200]}")
        if name in reached:
            lines.append(f"    aim: {reached[name]['aim']}: {_aim_value(name, reached[name])}"
                         f" ({'met' if reached[name]['met'] else 'NOT met'})")
    fanout = outcomes.get("sse_fanout")
    if fanout:
        lines += ["", f"Live inbox: {fanout.extra['streams']:,} SSE streams on one API process;"
                      " row stamped (in the delivery's transaction) -> event read"]
        for name in SSE_CASES:
            case = fanout.extra[name]
            lat, sent = case["latency_ms"], case["send_to_event_ms"]
            lines.append(
                f"  {case['case']}: {case['open']:,} open, {case['messages']:,} message(s),"
                f" {case['received']:,} of {case['expected']:,} events"
                f" ({case['within_1s']:,} within {FANOUT_AIM_MS / 1000:g} s); ms p50"
                f" {_num(lat['p50'])} p99 {_num(lat['p99'])} max {_num(lat['max'])};"
                f" notify_many -> event p99 {_num(sent['p99'])}; API RSS"
                f" {case['api_rss_mib']:g} MiB; cores {_cores_text(case['cores'])}")
            trouble = case["open_errors"] + case["broken"] + case["ended"]
            if trouble:
                lines.append(f"    trouble: {trouble[:3]}")
        if "sse_fanout" in reached:
            aim = reached["sse_fanout"]
            lines.append(f"  aim: {aim['aim']}: {_aim_value('sse_fanout', aim)}"
                         f" ({'met' if aim['met'] else 'NOT met'})")
    return lines


def markdown_api(outcomes: dict[str, Outcome], reached: dict[str, Any]) -> list[str]:
    """The HTTP API's tables in the report."""
    lines: list[str] = []
    sends = [name for name in API_SENDS if name in outcomes]
    if sends:
        lines += ["", "## HTTP API: sends over keep-alive", "",
                  "A real `notifier api` and a real worker; the load generator"
                  " (`bench.http_load`) in a process of its own, each connection one request"
                  " at a time. Latency: request written -> answer read. End to end: first"
                  " request -> last row committed.", "",
                  "| scenario | requests | requests / s | notifications / s (HTTP) | p50 ms |"
                  " p99 ms | max ms | end to end / s | API CPU ms / request |"
                  " cores while sending |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name in sends:
            o, extra = outcomes[name], outcomes[name].extra
            lat = extra["request_latency_ms"]
            lines.append(
                f"| {_label(o)} | {extra['answered']:,} | {extra['requests_per_s']:,.0f} |"
                f" {extra['notifications_per_s_http']:,.0f} | {_num(lat['p50'])} |"
                f" {_num(lat['p99'])} | {_num(lat['max'])} | {o.rate:,.0f} |"
                f" {_num(api_cpu_ms_per_request(o))} | {_cores_text(extra['send_cores'])} |")
        lines += [""] + [f"- {comparison_text(outcomes, name)}." for name in sends]
    fanout = outcomes.get("sse_fanout")
    if fanout:
        lines += ["", f"## Live inbox: {fanout.extra['streams']:,} SSE streams on one API"
                      " process", "",
                  "New in-app messages through the whole pipeline (`notify_many`, a real"
                  " worker, the in-app channel's `pg_notify`, the API's feed); latency: the"
                  " row's `created_at` (stamped in the delivery's transaction) -> the event"
                  " read by the client (`bench.sse_client`).", "",
                  "| case | streams open | messages | events / expected | within 1 s |"
                  " p50 ms | p99 ms | max ms | notify_many -> event p99 ms | API RSS MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in SSE_CASES:
            case = fanout.extra[name]
            lat = case["latency_ms"]
            lines.append(
                f"| {case['case']} | {case['open']:,} | {case['messages']:,} |"
                f" {case['received']:,} / {case['expected']:,} | {case['within_1s']:,} |"
                f" {_num(lat['p50'])} | {_num(lat['p99'])} | {_num(lat['max'])} |"
                f" {_num(case['send_to_event_ms']['p99'])} | {case['api_rss_mib']:g} |")
    return lines
