"""``notifier stats``: figures over a time window."""

from __future__ import annotations

import json
from typing import Any

import click

from notifier.ops.cli.common import EXIT_USAGE, fail, friendly_errors, when


@click.command()
@click.option("--since", default="1h", show_default=True,
              help="The window, back from now: 15m, 2h, 1d, 1h30m, 90s.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def stats(since: str, as_json: bool) -> None:
    """Throughput, outcomes, latency percentiles and batching over a window (Postgres)."""
    from notifier.ops.stats import collect_stats
    from notifier.pipeline.rules import parse_duration
    from notifier.storage.db import session_scope

    try:
        window = parse_duration(since)
    except ValueError as exc:
        fail(f"--since: {exc}", EXIT_USAGE)
    with session_scope() as session:
        figures = collect_stats(session, window)
    if as_json:
        click.echo(json.dumps(figures.as_dict(), indent=2, default=str))
        return
    _print_stats(figures, since)


def _print_stats(figures: Any, since: str) -> None:
    ingest, until = figures.ingest, figures.until
    span = f"{when(figures.since)} → {until:%H:%M:%S}" if figures.since.date() == until.date() \
        else f"{when(figures.since)} → {when(until)}"
    click.echo(f"last {since}: {span} UTC\n")
    priorities = ", ".join(f"{name} {count:,}" for name, count in ingest.by_priority.items())
    click.echo(f"{'ingested':<15}{ingest.total:,} ({_rate(ingest.per_second)})"
               + (f"   {priorities}" if priorities else ""))
    click.echo(f"{'':<15}suppressed {ingest.suppressed:,}, rejected at ingest {ingest.rejected:,}")
    click.echo(f"{'ingest latency':<15}{_percentiles(ingest.latency)}"
               f"   (enqueued → stored, {ingest.latency.count:,} stamped)\n")
    for title, rows in (("deliveries", figures.by_channel), ("by priority", figures.by_priority)):
        _delivery_table(title, {**rows, "all": figures.deliveries} if rows else {})
    if len(figures.by_provider) > len(figures.by_channel):  # some channel has several
        _delivery_table("by provider", figures.by_provider)
    batching = figures.batching
    if batching.messages:
        plural = "s" if batching.digests != 1 else ""
        digests = (f"; {batching.digests:,} digest{plural} of {batching.digest_size:.1f}"
                   " on average" if batching.digests else "; no digests")
        click.echo(f"{'batching':<15}{batching.notifications:,} notifications in"
                   f" {batching.messages:,} messages: {batching.per_message:.2f} per message"
                   f"{digests}")
    else:
        click.echo(f"{'batching':<15}no messages sent")
    _table_sizes(figures.tables)


def _table_sizes(tables: dict[str, Any]) -> None:
    """Each table's estimated rows and total size (what retention keeps in check)."""
    click.echo(f"\n{'tables':<21}{'rows (est.)':>12}{'size':>11}")
    for name, size in tables.items():
        rows = "?" if size.rows is None else f"{size.rows:,}"
        click.echo(f"{name:<21}{rows:>12}{_bytes(size.bytes):>11}")
    if any(size.rows is None for size in tables.values()):
        click.echo("(?: not estimated until autovacuum or ANALYZE first visits the table)")


def _bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value, unit = count / 1024, "kB"
    for larger in ("MB", "GB", "TB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.1f} {unit}"


_DELIVERY_COLUMNS = ("sent", "retried", "retrying", "dead", "sent/s", "delivered", "errors",
                     "p50", "p95", "p99")


def _delivery_table(title: str, rows: dict[str, Any]) -> None:
    width = max([13, *(len(name) + 2 for name in rows)])  # provider names run longer
    click.echo(f"{title:<{width}}" + "".join(f"{name:>10}" for name in _DELIVERY_COLUMNS))
    if not rows:
        click.echo(f"{'none':<{width}}\n")
        return
    for name, f in rows.items():
        cells = (f"{f.sent:,}", f"{f.sent_after_retry:,}", f"{f.retrying:,}", f"{f.dead:,}",
                 f"{f.per_second:.2f}", _percent(f.delivered_rate), _percent(f.error_rate),
                 _latency(f.latency.p50), _latency(f.latency.p95), _latency(f.latency.p99))
        click.echo(f"{name:<{width}}" + "".join(f"{cell:>10}" for cell in cells))
    click.echo("")


def _percentiles(latency: Any) -> str:
    return (f"p50 {_latency(latency.p50)}, p95 {_latency(latency.p95)},"
            f" p99 {_latency(latency.p99)}")


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if abs(seconds) < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s" if abs(seconds) < 100 else f"{seconds:,.0f} s"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f} %"


def _rate(per_second: float) -> str:
    return f"{per_second:,.2f}/s"
