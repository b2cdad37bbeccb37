"""The report's PNG plots, drawn from the run's JSON document (``latest.json``).

* ``throughput.png``: items done over time, the pipeline's ingest scenarios against the
  naive baseline on the same axes (cumulative, and per second on a log scale), then the
  delivery scenarios the same way (naive against pooled);
* ``latency.png``: the distribution (CDF) of every latency measured: critical and
  backlog notifications under backlog, digests from window close to queued, pooled
  deliveries from publish to sent; and the flush's progress against the windows due;
* ``aggregation.png``: notifications in against messages out, per type.

matplotlib (the ``bench`` extra) draws them with its Agg backend: no display needed.
``python -m bench.plots [latest.json]`` draws them again from a saved run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.config import RESULTS_DIR
from bench.series import rates

#: Scenario → (legend, colour, line style). The naive baselines are black.
STYLES = {
    "naive": ("naive: 1 task + INSERT each", "black", "-"),
    "empty_task": ("empty Celery task (ceiling, 1 msg each)", "grey", ":"),
    "notify": ("notify(), unbuffered", "tab:blue", "-"),
    "notify_threads": ("notify(), unbuffered, threads", "tab:cyan", "-"),
    "buffered": ("BufferedProducer", "tab:orange", "-"),
    "notify_many": ("notify_many()", "tab:red", "-"),
    "critical_under_backlog": ("notify_many() backlog + criticals", "tab:purple", "--"),
    "email_naive": ("e-mail: new connection each", "black", "-"),
    "email_reused": ("e-mail: one kept session, 1 process", "tab:olive", "-"),
    "email_pooled": ("e-mail: pooled worker", "tab:green", "-"),
    "webhook_naive": ("webhook: httpx.post each", "dimgrey", "--"),
    "webhook_pooled": ("webhook: pooled worker", "tab:brown", "--"),
    "api_single": ("HTTP API, 1 per request", "tab:pink", "-."),
    "api_lists": ("HTTP API, lists", "tab:gray", "-."),
}
INGEST = ("naive", "empty_task", "notify", "notify_threads", "buffered", "notify_many",
          "critical_under_backlog", "api_single", "api_lists")
DELIVERY = ("email_naive", "email_reused", "email_pooled", "webhook_naive", "webhook_pooled")
#: Latency kinds: (scenario, sample kind, legend, colour, aim in ms or None).
LATENCIES = (
    ("critical_under_backlog", "critical", "critical, enqueue -> committed (under backlog)",
     "tab:red", "critical"),
    ("critical_under_backlog", "backlog", "backlog (normal), enqueue -> committed",
     "tab:purple", None),
    ("flush_latency", "flush", "digest, window close -> delivery queued", "tab:blue",
     "flush"),
    ("email_pooled", "publish_to_sent", "e-mail pooled, publish -> sent", "tab:green", None),
    ("webhook_pooled", "publish_to_sent", "webhook pooled, publish -> sent", "tab:brown",
     None),
    ("api_single", "request", "HTTP API single send, request -> answer", "tab:pink", None),
    ("api_lists", "request", "HTTP API list, request -> answer", "tab:gray", None),
    ("sse_fanout", "sse_many_recipients", "SSE, 1 stream per recipient: row -> event",
     "tab:cyan", None),
    ("sse_fanout", "sse_one_recipient", "SSE, every stream on 1 recipient: row -> event",
     "tab:olive", None),
)
FILES = ("throughput", "latency", "aggregation")


def write_plots(doc: dict[str, Any], directory: Path | None = None) -> dict[str, Path]:
    """Draw every plot the run has data for; returns name → PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = directory or RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    scenarios = doc.get("scenarios", {})
    written = {}
    for name, draw in (("throughput", _throughput), ("latency", _latency),
                       ("aggregation", _aggregation)):
        figure = draw(plt, scenarios, doc)
        if figure is None:
            continue
        figure.suptitle(f"notifier benchmark, {_subtitle(doc)}", fontsize=9)
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written[name] = path
    return written


def _subtitle(doc: dict[str, Any]) -> str:
    machine = doc.get("machine", {})
    load = machine.get("load_average_at_start") or ["?"]
    return (f"{machine.get('date', '?')[:16].replace('T', ' ')} UTC, git"
            f" {machine.get('git_commit')}, {machine.get('cpu_count')} CPUs"
            f" ({machine.get('cpu_model')}), load {load[0]} at start")


def _throughput(plt: Any, scenarios: dict[str, Any], doc: dict[str, Any]) -> Any:
    ingest = [n for n in INGEST if scenarios.get(n, {}).get("series")]
    delivery = [n for n in DELIVERY if scenarios.get(n, {}).get("series")]
    rows = [group for group in (ingest, delivery) if group]
    if not rows:
        return None
    figure, axes = plt.subplots(len(rows), 2, figsize=(13, 4.6 * len(rows)), squeeze=False)
    for (total, rate), group in zip(axes, rows, strict=True):
        what = "rows committed" if group is ingest else "items received by the server"
        for name in group:
            series = scenarios[name]["series"]
            label, colour, style = STYLES[name]
            label = f"{label} ({scenarios[name]['rate_per_s']:,.0f}/s)"
            total.plot([t for t, _ in series], [n for _, n in series], style, color=colour,
                       label=label, linewidth=1.4)
            times, values = rates(series)
            if times:
                rate.plot(times, values, style, color=colour, label=label, linewidth=1.2)
        title = "Ingest" if group is ingest else "Delivery"
        total.set_title(f"{title}: {what}, cumulative")
        total.set_xlabel("seconds since the first send")
        total.set_ylabel(what)
        total.grid(alpha=0.3)
        total.legend(fontsize=7)
        rate.set_title(f"{title}: {what} per second (0.5 s steps)")
        rate.set_xlabel("seconds since the first send")
        rate.set_ylabel("per second (log)")
        rate.set_yscale("log")
        rate.grid(alpha=0.3, which="both")
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    return figure


def _latency(plt: Any, scenarios: dict[str, Any], doc: dict[str, Any]) -> Any:
    kinds = [k for k in LATENCIES
             if scenarios.get(k[0], {}).get("latency_ms", {}).get(k[1], {}).get("quantiles")]
    flush = scenarios.get("flush_latency", {})
    if not kinds and not flush.get("series"):
        return None
    from bench.report import AIM_CRITICAL_P99_MS, AIM_FLUSH_P99_MS

    figure, (cdf, progress) = plt.subplots(1, 2, figsize=(13, 6.2))
    aims = {"critical": AIM_CRITICAL_P99_MS, "flush": AIM_FLUSH_P99_MS}
    for scenario, kind, label, colour, aim in kinds:
        figures = scenarios[scenario]["latency_ms"][kind]
        points = figures["quantiles"]
        shares = [i / (len(points) - 1) for i in range(len(points))]
        cdf.plot([max(p, 0.01) for p in points], shares, color=colour, linewidth=1.5,
                 label=f"{label}: p50 {figures['p50']:,.0f}, p99 {figures['p99']:,.0f} ms"
                       f" (n={figures['count']:,})")
        if aim:
            cdf.axvline(aims[aim], color=colour, linestyle=":", linewidth=1)
    cdf.set_xscale("log")
    cdf.set_xlabel(f"latency, ms (log); dotted: the p99 aims (critical"
                   f" {AIM_CRITICAL_P99_MS:g} ms, flush {AIM_FLUSH_P99_MS:g} ms)")
    cdf.set_ylabel("share of items at or below")
    cdf.set_title("Latency distribution (CDF)")
    cdf.axhline(0.99, color="grey", linewidth=0.6, linestyle="--")
    cdf.grid(alpha=0.3, which="both")
    cdf.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    if flush.get("series"):
        extra = flush["extra"]
        series = flush["series"]
        windows, spread = extra["windows"], extra["spread_seconds"]
        end = max(series[-1][0], spread) if series else spread
        progress.plot([0, spread, end], [0, windows, windows], ":", color="grey",
                      label="windows closed (due)")
        progress.plot([t for t, _ in series], [n for _, n in series], color="tab:blue",
                      label="windows flushed (digests queued)")
        progress.set_title(f"Flush: {flush['notifications']:,} waiting in {windows:,} windows,"
                           f" beat every {extra['flush_interval_s']:g} s")
        progress.set_xlabel("seconds since the first window closed")
        progress.set_ylabel("windows")
        progress.grid(alpha=0.3)
        progress.legend(fontsize=8)
    else:
        progress.set_visible(False)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    return figure


def _aggregation(plt: Any, scenarios: dict[str, Any], doc: dict[str, Any]) -> Any:
    efficiency = scenarios.get("aggregation_efficiency")
    if not efficiency:
        return None
    per_type = efficiency["extra"]["per_type"]
    names = sorted(per_type, key=lambda n: -per_type[n]["in"])
    received = [per_type[n]["in"] for n in names]
    sent = [per_type[n]["out"] for n in names]
    figure, axis = plt.subplots(figsize=(11, 4.6))
    positions = range(len(names))
    axis.bar([p - 0.2 for p in positions], received, 0.4, color="grey",
             label="naive: one message per notification")
    axis.bar([p + 0.2 for p in positions], sent, 0.4, color="tab:green",
             label="notifier: messages (digests + immediate)")
    for p, got, out in zip(positions, received, sent, strict=True):
        if got:
            axis.annotate(f"-{1 - out / got:.0%}", (p + 0.2, out), ha="center",
                          va="bottom", fontsize=8)
    axis.set_xticks(list(positions), names, rotation=15, fontsize=8)
    extra = efficiency["extra"]
    axis.set_title(f"Aggregation: {efficiency['label']}: {extra['messages_saved']:.1%} fewer"
                   f" messages overall ({extra['notifications_per_message']:g} notifications"
                   " per message)", fontsize=9)
    axis.set_ylabel("count")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    return figure


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else RESULTS_DIR / "latest.json"
    for name, png in write_plots(json.loads(path.read_text()), path.parent).items():
        print(f"{name}: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
