"""``notifier queues``: the queue names for a worker's ``-Q``, from the channel registry."""

from __future__ import annotations

import click

from notifier.worker.queues import QUEUES_BY_KIND


@click.command()
@click.option("--all", "kind", flag_value="all", default=True,
              help="Every queue, in the order a worker without -Q consumes them (default).")
@click.option("--ingest", "kind", flag_value="ingest", help="Ingest, most urgent first.")
@click.option("--deliver", "kind", flag_value="deliver",
              help="Deliveries: the critical queue, then one per channel.")
@click.option("--critical", "kind", flag_value="critical",
              help="Critical ingest and critical deliveries.")
def queues(kind: str) -> None:
    """Queue names, comma-separated, most urgent first.

    For a worker: celery -A notifier worker -Q "$(notifier queues --deliver)"
    """
    click.echo(",".join(QUEUES_BY_KIND[kind]))
