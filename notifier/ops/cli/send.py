"""``notifier send``: one notification from options or JSON."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from notifier.ops.cli.common import EXIT_CONFIG, fail, friendly_errors
from notifier.schemas import NotificationError


@click.command()
@click.option("--recipient", help="Recipient id, or a JSON object with an 'id'.")
@click.option("--type", "type_", help="Notification type, e.g. task_deadline.")
@click.option("--title")
@click.option("--body", default="")
@click.option("--priority", type=click.Choice(["critical", "high", "normal", "low"]))
@click.option("--channel", "channels", multiple=True, help="Channel name; repeat for more.")
@click.option("--data", help="A JSON object of extra fields.")
@click.option("--idempotency-key")
@click.option("--send-at", help="ISO 8601 time with a zone.")
@click.option("--id", "id_", help="A UUID to use instead of a generated one.")
@click.option("--json", "json_input", help="The whole notification as JSON ('-': stdin).")
@click.option("--wait", type=float, default=0, help="Seconds to wait until it is stored.")
@friendly_errors
def send(json_input: str | None, wait: float, **flags: Any) -> None:
    """Send one notification; prints its id."""
    from notifier import client

    fields = _load_json(json_input, "--json") if json_input else {}
    if not isinstance(fields, dict):
        raise NotificationError(["--json: expected a JSON object"])
    fields.update(_fields_from_flags(flags))
    notification = client.build(**fields)
    client.publish_one(notification)
    click.echo(str(notification.id))
    if wait:
        _wait_until_stored(str(notification.id), wait)


def _fields_from_flags(flags: dict[str, Any]) -> dict[str, Any]:
    fields = {name.rstrip("_"): value for name, value in flags.items() if value}
    if "data" in fields:
        fields["data"] = _load_json(fields["data"], "--data")
    recipient = fields.get("recipient")
    if isinstance(recipient, str) and recipient.lstrip().startswith("{"):
        fields["recipient"] = _load_json(recipient, "--recipient")
    if "channels" in fields:
        fields["channels"] = list(fields["channels"])
    return fields


def _load_json(text: str, option: str) -> Any:
    if text == "-":
        text = sys.stdin.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        problem = f"{option}: not valid JSON ({exc.msg} at column {exc.colno})"
        raise NotificationError([problem]) from None


def _wait_until_stored(notification_id: str, timeout: float) -> None:
    from notifier.ops.queries import notification_status
    from notifier.storage.db import session_scope

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            found = notification_status(session, notification_id)
        if found:
            click.echo(f"stored: {found}")
            return
        time.sleep(0.1)
    fail(f"not stored after {timeout:g}s: is a worker running? (notifier status)", EXIT_CONFIG)
