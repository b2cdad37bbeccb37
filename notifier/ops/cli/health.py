"""``notifier health``: checks for probes."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from notifier.ops.cli.common import friendly_errors
from notifier.settings import get_settings

EXIT_UNHEALTHY = 1


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--check", "checks", multiple=True,
              type=click.Choice(["broker", "database", "state", "workers", "beat", "queues",
                                 "pending", "api"]),
              help="Run only this check; repeat for more (default: all; api only when"
                   " NOTIFIER_API_URL is set).")
@click.option("--max-queue-depth", type=click.IntRange(min=0),
              help="Most messages one queue may hold [NOTIFIER_HEALTH_MAX_QUEUE_DEPTH].")
@click.option("--max-pending-age", type=click.FloatRange(min=0, min_open=True),
              help="Seconds overdue work may wait [NOTIFIER_HEALTH_MAX_PENDING_AGE].")
@click.option("--beat-max-age", type=click.FloatRange(min=0, min_open=True),
              help="Seconds since beat's last heartbeat [NOTIFIER_HEALTH_BEAT_MAX_AGE].")
@click.option("--min-workers", type=click.IntRange(min=0),
              help="Workers that must answer the ping [NOTIFIER_HEALTH_MIN_WORKERS].")
@click.option("--ping-timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds to collect ping answers [NOTIFIER_HEALTH_PING_TIMEOUT].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds to connect and query [NOTIFIER_HEALTH_TIMEOUT].")
@friendly_errors
def health(as_json: bool, checks: tuple[str, ...], **overrides: Any) -> None:
    """Check broker, database, state Redis, workers, beat, queue depths, overdue work and
    the HTTP API (when NOTIFIER_API_URL is set).

    One line per check; exits 0 when every check passes and 1 otherwise.
    """
    from notifier.ops.health import Thresholds, default_checks, run_checks

    settings = get_settings()
    report = run_checks(settings, Thresholds.from_settings(settings, **overrides),
                        checks or default_checks(settings))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        width = max(len(check.name) for check in report.checks)
        for check in report.checks:
            click.echo(f"{'ok' if check.ok else 'FAIL':<4} {check.name:<{width}}  {check.summary}")
    if not report.ok:
        sys.exit(EXIT_UNHEALTHY)
