"""``notifier status``: counts, queue depths, oldest waiting work, circuits."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from notifier.ops.cli.common import friendly_errors


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def status(as_json: bool) -> None:
    """Counts by status, queue depths and the oldest waiting notification."""
    from notifier.ops.queries import pipeline_status
    from notifier.pipeline.delivery import circuit_states
    from notifier.storage.db import check_database, session_scope
    from notifier.worker.queues import queue_depths

    check_database()
    with session_scope() as session:
        report = pipeline_status(session)
    report["queues"] = queue_depths()
    report["circuits"] = circuit_states()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    _print_status(report)


def _print_status(report: dict[str, Any]) -> None:
    click.echo("notifications: " + _counts(report["notifications"]))
    click.echo("deliveries:    " + _counts(report["deliveries"]))
    click.echo("dead letters:  " + _counts(report["dead_letters"]))
    click.echo(f"duplicates dropped (keys within the dedup window): "
               f"{report['duplicates_dropped']}")
    age = report["oldest_pending_age_seconds"]
    click.echo("oldest pending: " + ("none" if age is None else f"{age:.1f}s ago"))
    click.echo("queues:        " + _counts(report["queues"]))
    click.echo("circuits:      " + ", ".join(
        f"{name} {_circuit(circuit)}" for name, circuit in report["circuits"].items()
    ))
    for name, circuit in report["circuits"].items():
        if len(circuit.get("providers") or {}) > 1:
            click.echo(f"  {name} providers: " + ", ".join(
                f"{provider} {_circuit(state)}"
                for provider, state in circuit["providers"].items()
            ))


def _circuit(circuit: dict[str, Any]) -> str:
    if circuit["state"] == "open" and circuit["open_until"]:
        return f"OPEN (retry in {max(0.0, circuit['open_until'] - time.time()):.0f}s)"
    if circuit["state"] == "half_open":
        return "HALF-OPEN (probing)"
    failures = circuit["recent_failures"]
    return f"closed ({failures} recent failures)" if failures else "closed"


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value}" for name, value in counts.items()) or "none"
