"""``notifier metrics``: one Prometheus scrape, or a server of them."""

from __future__ import annotations

import time

import click

from notifier.ops.cli.common import friendly_errors
from notifier.settings import get_settings


@click.command()
@click.option("--serve", is_flag=True, help="Answer scrapes until stopped (Ctrl-C).")
@click.option("--address", help="Bind address with --serve [NOTIFIER_METRICS_ADDRESS].")
@click.option("--port", type=int, help="Port with --serve [NOTIFIER_METRICS_PORT, else 9808].")
@friendly_errors
def metrics(serve: bool, address: str | None, port: int | None) -> None:
    """Prometheus metrics of the workers on this host and of the pipeline.

    Without --serve, prints one scrape. Workers write their counters to
    NOTIFIER_METRICS_DIR; run this on the same host, or set NOTIFIER_METRICS_PORT so
    each worker serves its own.
    """
    from notifier.worker import metrics as prometheus

    settings = get_settings()
    if not serve:
        body, _ = prometheus.exposition(settings)
        click.echo(body.decode(), nl=False)
        return
    address = address or settings.metrics_address
    port = port or settings.metrics_port or 9808
    prometheus.serve(address, port, settings)
    click.echo(f"serving metrics on http://{address}:{port}/metrics", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
