"""The ``notifier`` command: send, migrate, look at the pipeline and its dead letters.

Every failure an operator can cause (a bad notification, a wrong URL, a server that
does not answer) ends in one line saying what to fix and a non-zero exit code, never a
traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click

from notifier.schemas import NotificationError
from notifier.settings import ConfigError, get_settings, mask_url

EXIT_CONFIG = 1
EXIT_USAGE = 2


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn configuration, connection and validation failures into one line each."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kombu.exceptions import OperationalError as BrokerError
        from sqlalchemy.exc import OperationalError as DatabaseError

        from notifier.db import describe_db_error

        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            _fail(str(exc), EXIT_CONFIG)
        except NotificationError as exc:
            _fail("invalid notification:\n  " + "\n  ".join(exc.problems), EXIT_USAGE)
        except DatabaseError as exc:
            url = mask_url(get_settings().database_url)
            _fail(f"NOTIFIER_DATABASE_URL: cannot use {url}: {describe_db_error(exc)}",
                  EXIT_CONFIG)
        except BrokerError as exc:
            url = mask_url(get_settings().broker_url)
            _fail(f"NOTIFIER_BROKER_URL: cannot reach {url}: {exc}", EXIT_CONFIG)

    return wrapper


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group()
@click.version_option(package_name="notifier")
def main() -> None:
    """Operate the notifier pipeline (configuration: NOTIFIER_* environment variables)."""
    try:
        get_settings()
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)


# --- send -------------------------------------------------------------------------------


@main.command()
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
    from notifier.db import session_scope
    from notifier.queries import notification_status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            found = notification_status(session, notification_id)
        if found:
            click.echo(f"stored: {found}")
            return
        time.sleep(0.1)
    _fail(f"not stored after {timeout:g}s: is a worker running? (notifier status)", EXIT_CONFIG)


# --- db ---------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command()
@click.option("--revision", default="head", show_default=True)
@friendly_errors
def upgrade(revision: str) -> None:
    """Create the database if missing and apply the migrations."""
    from notifier import migrate

    created = migrate.upgrade(revision=revision)
    url = mask_url(get_settings().database_url)
    if created:
        click.echo(f"created database {url}")
    click.echo(f"database at revision {migrate.current_revision()}: {url}")


# --- status -----------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def status(as_json: bool) -> None:
    """Counts by status, queue depths and the oldest waiting notification."""
    from notifier.db import check_database, session_scope
    from notifier.queries import pipeline_status, queue_depths

    check_database()
    with session_scope() as session:
        report = pipeline_status(session)
    report["queues"] = queue_depths()
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


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value}" for name, value in counts.items()) or "none"


# --- dead letters -----------------------------------------------------------------------


@main.group("dead-letters")
def dead_letters() -> None:
    """Notifications and deliveries that failed for good."""


@dead_letters.command("list")
@click.option("--stage", type=click.Choice(["ingest", "aggregate", "deliver"]))
@click.option("--type", "type_", help="Notification type.")
@click.option("--channel")
@click.option("--since", type=click.DateTime(), help="Only those created after this time.")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def list_dead_letters(as_json: bool, limit: int, **filters: Any) -> None:
    """The newest dead letters, one line each."""
    from notifier.db import session_scope
    from notifier.queries import DeadLetterFilter, find_dead_letters

    with session_scope() as session:
        rows = find_dead_letters(session, DeadLetterFilter(
            stage=filters["stage"], type=filters["type_"], channel=filters["channel"],
            since=filters["since"],
        ), limit)
    if as_json:
        click.echo(json.dumps([_dead_letter_dict(row) for row in rows], default=str, indent=2))
        return
    if not rows:
        click.echo("no dead letters")
    for row in rows:
        click.echo(f"{row.id:>6}  {_when(row.created_at)}  {row.stage:<8} "
                   f"{row.type or '-':<20} {row.reason}")


@dead_letters.command("show")
@click.argument("dead_letter_id", type=int)
@friendly_errors
def show_dead_letter(dead_letter_id: int) -> None:
    """One dead letter with its original message."""
    from notifier.db import session_scope
    from notifier.models import DeadLetter

    with session_scope() as session:
        row = session.get(DeadLetter, dead_letter_id)
        if row is None:
            _fail(f"no dead letter with id {dead_letter_id}", EXIT_USAGE)
        click.echo(json.dumps(_dead_letter_dict(row), default=str, indent=2))


def _dead_letter_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row.id, "stage": row.stage, "reason": row.reason,
        "error_class": row.error_class, "type": row.type, "channel": row.channel,
        "notification_id": row.notification_id, "delivery_id": row.delivery_id,
        "attempts": row.attempts, "created_at": row.created_at,
        "replayed_at": row.replayed_at, "payload": row.payload,
    }


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")
