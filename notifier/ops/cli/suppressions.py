"""``notifier suppressions``: list, add and remove addresses a channel no longer sends to.

The same list ``/v1/suppressions`` edits (``notifier.pipeline.suppressions``): hard
bounces and complaints land there by themselves (``docs/receipts.md``); an operator adds
an address a recipient asked to stop, or removes one that works again.
"""

from __future__ import annotations

import json
from datetime import UTC

import click

from notifier.masking import mask_address, mask_secrets
from notifier.ops.cli.common import EXIT_CONFIG, EXIT_USAGE, fail, friendly_errors, when
from notifier.settings import CHANNEL_NAMES

_CHANNEL = click.Choice(sorted(CHANNEL_NAMES))


@click.group()
def suppressions() -> None:
    """Addresses a channel no longer sends to (bounced, complained, or added by hand)."""


@suppressions.command("list")
@click.option("--channel", type=_CHANNEL)
@click.option("--address", help="A part of the address (as kept: e-mail lowercased).")
@click.option("--source", type=click.Choice(["bounce", "complaint", "soft-bounces", "manual"]))
@click.option("--since", type=click.DateTime(), help="Added at or after (UTC).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def list_suppressions(channel: str | None, address: str | None, source: str | None,
                      since: object, limit: int, as_json: bool) -> None:
    """The newest suppressions, one line each."""
    from datetime import datetime

    from notifier.pipeline.suppressions import SuppressionFilter, entry_view, find_suppressions
    from notifier.storage.db import session_scope

    moment = since.replace(tzinfo=UTC) if isinstance(since, datetime) else None
    with session_scope() as session:
        entries = find_suppressions(
            session, SuppressionFilter(channel, address, source, moment), limit)
    if as_json:
        click.echo(json.dumps([entry_view(entry) for entry in entries], indent=2))
        return
    if not entries:
        click.echo("no suppressions")
    for entry in entries:
        click.echo(f"{when(entry.created_at)}  {entry.channel:<8} {entry.source:<13}"
                   f" {mask_address(entry.address):<32} {mask_secrets(entry.reason)}")


@suppressions.command("add")
@click.argument("channel", type=_CHANNEL)
@click.argument("address")
@click.option("--reason", default="added by an operator", show_default=True)
@friendly_errors
def add_suppression(channel: str, address: str, reason: str) -> None:
    """Stop sending to ADDRESS on CHANNEL: its deliveries end `suppressed`, untried."""
    from notifier.pipeline.suppressions import MAX_ADDRESS, MAX_REASON, normalize, suppress
    from notifier.storage.db import session_scope

    if not address.strip() or len(address) > MAX_ADDRESS or not address.isprintable():
        fail(f"ADDRESS: 1 to {MAX_ADDRESS} printable characters", EXIT_USAGE)
    if not reason.strip() or len(reason) > MAX_REASON or not reason.isprintable():
        fail(f"--reason: 1 to {MAX_REASON} printable characters", EXIT_USAGE)
    with session_scope() as session:
        added = suppress(session, channel, address, reason.strip(), "manual")
    shown = mask_address(normalize(channel, address))
    click.echo(f"suppressed {shown} on {channel}" if added
               else f"{shown} was already suppressed on {channel}")


@suppressions.command("remove")
@click.argument("channel", type=_CHANNEL)
@click.argument("address")
@friendly_errors
def remove_suppression(channel: str, address: str) -> None:
    """Send to ADDRESS on CHANNEL again (its soft bounces are forgotten too)."""
    from notifier.pipeline.suppressions import normalize, unsuppress
    from notifier.storage.db import session_scope

    with session_scope() as session:
        removed = unsuppress(session, channel, address)
    shown = mask_address(normalize(channel, address))
    if not removed:
        fail(f"{shown} is not suppressed on {channel}", EXIT_CONFIG)
    click.echo(f"{shown} is no longer suppressed on {channel}")
