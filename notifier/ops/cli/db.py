"""``notifier db``: the database schema."""

from __future__ import annotations

import click

from notifier.ops.cli.common import friendly_errors
from notifier.settings import get_settings, mask_url


@click.group()
def db() -> None:
    """Database schema."""


@db.command()
@click.option("--revision", default="head", show_default=True)
@friendly_errors
def upgrade(revision: str) -> None:
    """Create the database if missing and apply the migrations."""
    from notifier.storage import migrate

    created = migrate.upgrade(revision=revision)
    url = mask_url(get_settings().database_url)
    if created:
        click.echo(f"created database {url}")
    click.echo(f"database at revision {migrate.current_revision()}: {url}")
