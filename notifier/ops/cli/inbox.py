"""``notifier inbox``: a recipient's in-app messages, their states and counts."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from notifier.ops.cli.common import EXIT_USAGE, fail, friendly_errors, when

#: The marker `inbox list` prints before a message, per state.
_MARKERS = {"unread": "*", "seen": "+", "read": " ", "archived": "a"}


@click.group()
def inbox() -> None:
    """A recipient's in-app messages: unread -> seen -> read -> archived."""


@inbox.command("list")
@click.argument("recipient")
@click.option("--all", "show_all", is_flag=True, help="Read messages too.")
@click.option("--archived", is_flag=True, help="Archived messages too (with --all).")
@click.option("--cursor", help="Start after this cursor (the `next:` line of a page).")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def list_inbox(recipient: str, show_all: bool, archived: bool, cursor: str | None, limit: int,
               as_json: bool) -> None:
    """The recipient's newest messages (unread only unless --all), a page at a time.

    Each line starts with its state: * unread, + seen, blank read, a archived."""
    from notifier.records import inbox_page

    page = _checked(lambda: inbox_page(recipient, cursor=cursor, unread_only=not show_all,
                                       include_archived=archived, limit=limit))
    messages = page["items"]
    if as_json:
        click.echo(json.dumps(messages, default=str, indent=2))
        return
    if not messages:
        click.echo("no messages" if show_all else "no unread messages")
    for message in messages:
        click.echo(f"{_MARKERS[message['state']]} {message['id']}  {when(message['created_at'])}  "
                   f"{message['type']:<18} {message['title']}")
    if page["next_cursor"]:
        click.echo(f"next: --cursor {page['next_cursor']}")


@inbox.command("counts")
@click.argument("recipient")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def counts(recipient: str, as_json: bool) -> None:
    """How many messages are unread, seen, read and archived."""
    from notifier.records import inbox_counts

    found = _checked(lambda: inbox_counts(recipient))
    if as_json:
        click.echo(json.dumps(found))
        return
    click.echo("  ".join(f"{state} {count}" for state, count in found.items()))


def _mark_command(name: str, state: str, help_text: str) -> None:
    @inbox.command(name, help=help_text)
    @click.argument("recipient")
    @click.argument("message_ids", nargs=-1)
    @click.option("--all", "mark_all", is_flag=True, help=f"Every message not yet {state}.")
    @friendly_errors
    def command(recipient: str, message_ids: tuple[str, ...], mark_all: bool) -> None:
        import uuid

        from notifier.records import mark_inbox_messages

        if not message_ids and not mark_all:
            fail(f"give message ids, or --all to mark every message {state}", EXIT_USAGE)
        for message_id in message_ids:
            try:
                uuid.UUID(message_id)
            except ValueError:
                fail(f"message id: not a UUID (got {message_id!r})", EXIT_USAGE)
        marked = _checked(lambda: mark_inbox_messages(
            recipient, state, None if mark_all else list(message_ids)))
        click.echo(f"marked {marked} messages {state}")


_mark_command("seen", "seen", "Mark messages seen: the ids given, or every unseen one with --all.")
_mark_command("read", "read", "Mark messages read: the ids given, or every unread one with --all.")
_mark_command("archive", "archived",
              "Archive messages (they leave `list --all`): the ids given, or all with --all.")


def _checked(call: Callable[[], Any]) -> Any:
    """The call's answer; a ValueError (a bad cursor, limit, id) as one usage line."""
    try:
        return call()
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
