"""``notifier inbox``: a recipient's in-app messages."""

from __future__ import annotations

import json

import click

from notifier.ops.cli.common import EXIT_USAGE, fail, friendly_errors, when


@click.group()
def inbox() -> None:
    """A recipient's in-app messages."""


@inbox.command("list")
@click.argument("recipient")
@click.option("--all", "show_all", is_flag=True, help="Read messages too.")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def list_inbox(recipient: str, show_all: bool, limit: int, as_json: bool) -> None:
    """The recipient's newest messages (unread only unless --all)."""
    from notifier.records import inbox as read_inbox

    messages = read_inbox(recipient, unread_only=not show_all, limit=limit)
    if as_json:
        click.echo(json.dumps(messages, default=str, indent=2))
        return
    if not messages:
        click.echo("no messages" if show_all else "no unread messages")
    for message in messages:
        marker = " " if message["read_at"] else "*"
        click.echo(f"{marker} {message['id']}  {when(message['created_at'])}  "
                   f"{message['type']:<18} {message['title']}")


@inbox.command("read")
@click.argument("recipient")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "read_all", is_flag=True, help="Every unread message.")
@friendly_errors
def mark_inbox_read(recipient: str, message_ids: tuple[str, ...], read_all: bool) -> None:
    """Mark messages read: the ids given, or every unread one with --all."""
    import uuid

    from notifier.records import mark_read

    if not message_ids and not read_all:
        fail("give message ids, or --all to mark every unread message read", EXIT_USAGE)
    for message_id in message_ids:
        try:
            uuid.UUID(message_id)
        except ValueError:
            fail(f"message id: not a UUID (got {message_id!r})", EXIT_USAGE)
    marked = mark_read(recipient, None if read_all else list(message_ids))
    click.echo(f"marked {marked} messages read")
