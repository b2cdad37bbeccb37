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
from datetime import UTC, datetime
from typing import Any

import click

from notifier.masking import mask_secrets
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

        from notifier.storage.db import describe_db_error

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
    # Masked: a driver's or broker's message may repeat a URL with its password.
    click.echo(f"error: {mask_secrets(message)}", err=True)
    sys.exit(code)


@click.group()
@click.version_option(package_name="notifier")
def main() -> None:
    """Operate the notifier pipeline (configuration: NOTIFIER_* environment variables)."""
    from notifier.channels import check_channel_urls

    try:
        check_channel_urls(get_settings())
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
    _fail(f"not stored after {timeout:g}s: is a worker running? (notifier status)", EXIT_CONFIG)


@main.command()
@click.argument("notification_id", required=False)
@click.option("--idempotency-key", help="Name it by the key it was sent with instead.")
@friendly_errors
def cancel(notification_id: str | None, idempotency_key: str | None) -> None:
    """Cancel a notification still waiting (in a digest window or held by quiet hours).

    Exits 1 when it is too late (sent, or already in a digest) or not found.
    """
    from notifier.pipeline.cancel import cancel_by

    if (notification_id is None) == (idempotency_key is None):
        _fail("give a NOTIFICATION_ID or --idempotency-key (one of them)", EXIT_USAGE)
    outcome = cancel_by(notification_id, idempotency_key)
    if outcome.cancelled:
        click.echo(f"cancelled {outcome.notification_id}")
        return
    if outcome.notification_id is None or outcome.status == "not found":
        _fail(outcome.status if outcome.notification_id is None
              else f"no notification {outcome.notification_id}", EXIT_CONFIG)
    _fail(f"cannot cancel {outcome.notification_id}: it is {outcome.status} already",
          EXIT_CONFIG)


@main.command()
@click.option("--file", "path", type=click.Path(dir_okay=False),
              help="A rules file to check instead of NOTIFIER_RULES_FILE.")
@friendly_errors
def rules(path: str | None) -> None:
    """The aggregation rule of every configured type (and check a rules file)."""
    from notifier.pipeline.rules import format_duration, load_rules

    chosen = path or get_settings().rules_file
    loaded = load_rules(chosen)
    click.echo(f"rules from {chosen or 'built-in defaults'}")
    click.echo(f"{'type':<20} {'window':>8} {'max':>5}  {'mode':<8} {'max wait':>8}  digest key")
    for type_, rule in loaded.items():
        if not rule.aggregate:
            click.echo(f"{type_:<20} {'-':>8} {'-':>5}  not aggregated: delivered at once")
            continue
        wait = format_duration(rule.longest_wait) if rule.mode == "sliding" else "-"
        click.echo(f"{type_:<20} {format_duration(rule.window):>8} {rule.max_count:>5}  "
                   f"{rule.mode:<8} {wait:>8}  {rule.digest_key or '-'}")


@main.command()
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
    from notifier.ops import metrics as prometheus

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


# --- db ---------------------------------------------------------------------------------


@main.group()
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


# --- status -----------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def status(as_json: bool) -> None:
    """Counts by status, queue depths and the oldest waiting notification."""
    from notifier.ops.queries import circuit_states, pipeline_status, queue_depths
    from notifier.storage.db import check_database, session_scope

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


def _circuit(circuit: dict[str, Any]) -> str:
    if circuit["state"] == "open" and circuit["open_until"]:
        return f"OPEN (retry in {max(0.0, circuit['open_until'] - time.time()):.0f}s)"
    if circuit["state"] == "half_open":
        return "HALF-OPEN (probing)"
    failures = circuit["recent_failures"]
    return f"closed ({failures} recent failures)" if failures else "closed"


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value}" for name, value in counts.items()) or "none"


# --- dead letters -----------------------------------------------------------------------


@main.group("dead-letters")
def dead_letters() -> None:
    """Notifications and deliveries that failed for good."""


def filter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The filters shared by list, replay and purge."""
    for option in reversed([
        click.option("--stage", type=click.Choice(["ingest", "aggregate", "deliver"])),
        click.option("--type", "type_", help="Notification type."),
        click.option("--channel"),
        click.option("--since", type=click.DateTime(), help="Created at or after (UTC)."),
        click.option("--until", type=click.DateTime(), help="Created before (UTC)."),
        click.option("--id", "ids", type=int, multiple=True, help="A dead letter id; repeat."),
    ]):
        command = option(command)
    return command


def _filter(filters: dict[str, Any], replayed: bool | None = None) -> Any:
    from notifier.pipeline.dead_letters import DeadLetterFilter

    return DeadLetterFilter(
        stage=filters["stage"], type=filters["type_"], channel=filters["channel"],
        since=_utc(filters["since"]), until=_utc(filters["until"]), replayed=replayed,
        ids=tuple(filters["ids"]),
    )


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment and moment.tzinfo is None else moment


@dead_letters.command("list")
@filter_options
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def list_dead_letters(as_json: bool, limit: int, **filters: Any) -> None:
    """The newest dead letters, one line each."""
    from notifier.pipeline.dead_letters import find_dead_letters
    from notifier.storage.db import session_scope

    with session_scope() as session:
        rows = find_dead_letters(session, _filter(filters), limit)
    if as_json:
        click.echo(json.dumps([_dead_letter_dict(row) for row in rows], default=str, indent=2))
        return
    if not rows:
        click.echo("no dead letters")
    for row in rows:
        replayed = " (replayed)" if row.replayed_at else ""
        click.echo(f"{row.id:>6}  {_when(row.created_at)}  {row.stage:<8} "
                   f"{row.channel or '-':<8} {mask_secrets(row.type or '-'):<18} "
                   f"{mask_secrets(row.reason)}{replayed}")


@dead_letters.command("replay")
@filter_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def replay_dead_letters(yes: bool, **filters: Any) -> None:
    """Send matching dead letters again (attempts reset); each is replayed once."""
    from notifier.pipeline.dead_letters import count_dead_letters
    from notifier.storage.db import session_scope

    where = _filter(filters, replayed=False)
    with session_scope() as session:
        total = count_dead_letters(session, where)
    if total == 0:
        click.echo("no dead letters to replay")
        return
    if not yes:
        click.confirm(f"replay {total} dead letters?", abort=True)
    replayed, skipped, purged, refused = _replay_in_chunks(where, total)
    for line in refused:  # a truncated payload: replaying it would send a fragment
        click.echo(line, err=True)
    click.echo(f"replayed {replayed} dead letters"
               + (f"; {skipped} skipped (their delivery is no longer dead)" if skipped else "")
               + (f"; {purged} skipped (their delivery was deleted by retention,"
                  " NOTIFIER_RETENTION_DELIVERIES_DAYS)" if purged else "")
               + (f"; {len(refused)} refused (only a prefix of their payload was kept)"
                  if refused else ""))


def _replay_in_chunks(where: Any, total: int) -> tuple[int, int, int, list[str]]:
    from notifier.pipeline.dead_letters import replay_dead_letters, replayable_ids
    from notifier.settings import get_settings
    from notifier.storage.db import session_scope
    from notifier.worker.batch_sizing import delivery_sizer
    from notifier.worker.tasks import publish, publish_ingest

    replayed = skipped = purged = 0
    refused: list[str] = []
    with session_scope() as session:
        chunks = list(replayable_ids(session, where))
    with click.progressbar(length=total, label="replaying", file=sys.stderr) as bar:
        for ids in chunks:
            with session_scope() as session:
                replay = replay_dead_letters(session, ids, get_settings(),
                                             batch_size=delivery_sizer(get_settings()))
            publish(replay.tasks)
            publish_ingest(replay.ingest_payloads)
            replayed, skipped = replayed + replay.replayed, skipped + replay.skipped
            purged += replay.purged
            refused += replay.refused
            bar.update(len(ids))
    return replayed, skipped, purged, refused


@dead_letters.command("purge")
@filter_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def purge_dead_letters(yes: bool, **filters: Any) -> None:
    """Delete matching dead letters for good (their deliveries stay recorded as dead)."""
    from notifier.pipeline.dead_letters import count_dead_letters
    from notifier.pipeline.dead_letters import purge_dead_letters as purge
    from notifier.storage.db import session_scope

    where = _filter(filters)
    with session_scope() as session:
        total = count_dead_letters(session, where)
    if total == 0:
        click.echo("no dead letters to purge")
        return
    if not yes:
        click.confirm(f"delete {total} dead letters for good?", abort=True)
    with session_scope() as session:
        purged = purge(session, where)
    click.echo(f"purged {purged} dead letters")


@dead_letters.command("show")
@click.argument("dead_letter_id", type=int)
@friendly_errors
def show_dead_letter(dead_letter_id: int) -> None:
    """One dead letter with its original message."""
    from notifier.storage.db import session_scope
    from notifier.storage.models import DeadLetter

    with session_scope() as session:
        row = session.get(DeadLetter, dead_letter_id)
        if row is None:
            _fail(f"no dead letter with id {dead_letter_id}", EXIT_USAGE)
        click.echo(json.dumps(_dead_letter_dict(row), default=str, indent=2))


def _dead_letter_dict(row: Any) -> dict[str, Any]:
    """A dead letter as `list --json` and `show` print it: its payload (a producer's
    message, with recipients' addresses) and reason with every secret hidden, addresses
    shown as `recipients show` shows them."""
    from notifier.masking import mask_structure

    return {
        "id": row.id, "stage": row.stage, "reason": mask_secrets(row.reason),
        "error_class": row.error_class, "type": row.type and mask_secrets(row.type),
        "channel": row.channel, "notification_id": row.notification_id,
        "delivery_id": row.delivery_id, "attempts": row.attempts,
        "created_at": row.created_at, "replayed_at": row.replayed_at,
        "payload": mask_structure(row.payload),
    }


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


# --- inbox ------------------------------------------------------------------------------


@main.group()
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
    from notifier.client import inbox as read_inbox

    messages = read_inbox(recipient, unread_only=not show_all, limit=limit)
    if as_json:
        click.echo(json.dumps(messages, default=str, indent=2))
        return
    if not messages:
        click.echo("no messages" if show_all else "no unread messages")
    for message in messages:
        marker = " " if message["read_at"] else "*"
        click.echo(f"{marker} {message['id']}  {_when(message['created_at'])}  "
                   f"{message['type']:<18} {message['title']}")


@inbox.command("read")
@click.argument("recipient")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "read_all", is_flag=True, help="Every unread message.")
@friendly_errors
def mark_inbox_read(recipient: str, message_ids: tuple[str, ...], read_all: bool) -> None:
    """Mark messages read: the ids given, or every unread one with --all."""
    import uuid

    from notifier.client import mark_read

    if not message_ids and not read_all:
        _fail("give message ids, or --all to mark every unread message read", EXIT_USAGE)
    for message_id in message_ids:
        try:
            uuid.UUID(message_id)
        except ValueError:
            _fail(f"message id: not a UUID (got {message_id!r})", EXIT_USAGE)
    marked = mark_read(recipient, None if read_all else list(message_ids))
    click.echo(f"marked {marked} messages read")


# --- recipients -------------------------------------------------------------------------


@main.group()
def recipients() -> None:
    """Recipients' addresses and preferences: channels, opt-outs, quiet hours, digests."""


#: The option of ``recipients set`` that sets each field, for error messages.
_OPTION_OF_FIELD = {
    "id": "RECIPIENT", "addresses": "--address", "opt_out": "--opt-out",
    "digest_mode": "--digest",
}


def recipient_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input as one line naming the option ("--email: not a valid email address")."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from notifier.pipeline.preferences import PreferencesError

        try:
            return command(*args, **kwargs)
        except PreferencesError as exc:
            _fail("; ".join(_as_option(problem) for problem in exc.problems), EXIT_USAGE)

    return friendly_errors(wrapper)


def _as_option(problem: str) -> str:
    location, _, message = problem.partition(": ")
    field = location.split(".")[0]
    return f"{_OPTION_OF_FIELD.get(field, '--' + field.replace('_', '-'))}: {message}"


def _bad(option: str, message: str) -> None:
    _fail(f"{option}: {message}", EXIT_USAGE)


@recipients.command("set")
@click.argument("recipient")
@click.option("--name", help="Display name ('' clears it).")
@click.option("--email", help="E-mail address ('' clears it).")
@click.option("--phone", help="Phone number for SMS ('' clears it).")
@click.option("--timezone", help="IANA time zone, e.g. Europe/Berlin ('' for UTC).")
@click.option("--address", "addresses", multiple=True, metavar="CHANNEL=ADDRESS",
              help="Address on a channel (webhook URL, ...); CHANNEL= removes it. Repeat.")
@click.option("--channels", metavar="A,B|default",
              help="Channels used when a notification names none; 'default': settings'.")
@click.option("--opt-out", "opt_outs", multiple=True, metavar="TYPE[:CHANNEL]",
              help="Stop a notification type on a channel (no channel: all). Repeat.")
@click.option("--opt-in", "opt_ins", multiple=True, metavar="TYPE[:CHANNEL]",
              help="Undo an opt-out (applied after --opt-out). Repeat.")
@click.option("--min-priority", metavar="PRIORITY|none",
              help="Suppress notifications below it (critical ones never are).")
@click.option("--quiet-hours", multiple=True, metavar="'DAYS HH:MM-HH:MM'",
              help="e.g. 'mon-fri 22:00-07:00', 'sat,sun 00:00-24:00'; replaces the "
                   "schedule. Repeat.")
@click.option("--no-quiet-hours", is_flag=True, help="Remove every quiet span.")
@click.option("--digest", metavar="immediate|hourly|daily|weekly")
@click.option("--digest-time", metavar="HH:MM",
              help="Local time of daily/weekly digests; hourly: the minute past each hour.")
@click.option("--digest-day", metavar="DAY", help="Day of weekly digests (mon, ..., sun).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@recipient_errors
def set_recipient(recipient: str, as_json: bool, **options: Any) -> None:
    """Create or change a recipient; prints the result like `show`."""
    from notifier.pipeline.preferences import get_recipient_preferences, set_preferences
    from notifier.storage.db import session_scope

    changes = _changes_from_options(options)
    with session_scope() as session:
        found = get_recipient_preferences(session, recipient.strip(), for_update=True)
        if options["opt_outs"] or options["opt_ins"]:
            changes["opt_out"] = _changed_opt_outs(
                found[0].opt_out if found else {}, options["opt_outs"], options["opt_ins"]
            )
        set_preferences(session, recipient, changes)
        prefs, fields = get_recipient_preferences(session, recipient.strip())
    _print_recipient(prefs, fields, as_json)


def _changes_from_options(options: dict[str, Any]) -> dict[str, Any]:
    changes: dict[str, Any] = {
        name: options[name] or None
        for name in ("name", "email", "phone", "timezone") if options[name] is not None
    }
    if options["addresses"]:
        changes["addresses"] = dict(_address(item) for item in options["addresses"])
    if options["channels"] is not None:
        changes["channels"] = _channels(options["channels"])
    if options["min_priority"] is not None:
        changes["min_priority"] = _min_priority(options["min_priority"])
    if options["quiet_hours"] and options["no_quiet_hours"]:
        _bad("--no-quiet-hours", "cannot be combined with --quiet-hours")
    if options["quiet_hours"] or options["no_quiet_hours"]:
        changes["quiet_hours"] = [_quiet_span(text) for text in options["quiet_hours"]]
    for option, field in (("digest", "digest_mode"), ("digest_day", "digest_day")):
        if options[option] is not None:
            changes[field] = options[option].strip().lower()
    if options["digest_time"] is not None:
        text = options["digest_time"].strip()
        changes["digest_time"] = text.zfill(5) if len(text) == 4 else text
    return changes


def _address(item: str) -> tuple[str, str | None]:
    channel, equals, address = item.partition("=")
    if not equals or not channel.strip():
        _bad("--address", f"expected CHANNEL=ADDRESS, or CHANNEL= to remove one (got {item!r})")
    return channel.strip(), address.strip() or None


def _channels(text: str) -> list[str] | None:
    if text.strip().lower() == "default":
        return None
    channels = [name.strip() for name in text.split(",") if name.strip()]
    if not channels:
        _bad("--channels", "name channels, e.g. email,inapp, or 'default'")
    return channels


def _min_priority(text: str) -> str | None:
    from notifier.settings import PRIORITIES

    value = text.strip().lower()
    if value not in (*PRIORITIES, "none"):
        _bad("--min-priority", f"must be one of {', '.join(PRIORITIES)}, none (got {text!r})")
    return None if value == "none" else value


def _quiet_span(text: str) -> dict[str, Any]:
    from notifier.pipeline.preferences import parse_quiet_hours

    try:
        return parse_quiet_hours(text).model_dump(mode="json")
    except ValueError as exc:
        _bad("--quiet-hours", str(exc))
        raise


def _changed_opt_outs(
    current: dict[str, list[str]], opt_outs: tuple[str, ...], opt_ins: tuple[str, ...]
) -> dict[str, list[str]]:
    """The opt-outs after these changes; opting in to one channel of an "all channels"
    opt-out leaves the other channels opted out."""
    from notifier.channels import CHANNEL_NAMES

    result = {type_: list(channels) for type_, channels in current.items()}
    for item in opt_outs:
        type_, channel = _type_and_channel(item, "--opt-out")
        if channel == "*":
            result[type_] = ["*"]
        elif "*" not in result.get(type_, []):
            result.setdefault(type_, []).append(channel)
    for item in opt_ins:
        type_, channel = _type_and_channel(item, "--opt-in")
        channels = result.pop(type_, [])
        if channel != "*":
            every = sorted(CHANNEL_NAMES) if "*" in channels else channels
            result[type_] = [name for name in every if name != channel]
    return {type_: channels for type_, channels in result.items() if channels}


def _type_and_channel(item: str, option: str) -> tuple[str, str]:
    from notifier.channels import CHANNEL_NAMES
    from notifier.schemas import TYPE_PATTERN

    type_, _, channel = (part.strip() for part in item.partition(":"))
    if not TYPE_PATTERN.match(type_):
        _bad(option, f"expected TYPE or TYPE:CHANNEL with a notification type (got {item!r})")
    if channel and channel != "*" and channel not in CHANNEL_NAMES:
        _bad(option, f"unknown channel {channel!r}; known: {', '.join(sorted(CHANNEL_NAMES))}")
    return type_, channel or "*"


@recipients.command("show")
@click.argument("recipient")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@recipient_errors
def show_recipient(recipient: str, as_json: bool) -> None:
    """A recipient's addresses and preferences, and whether it is quiet time for them."""
    from notifier.pipeline.preferences import get_recipient_preferences
    from notifier.storage.db import session_scope

    with session_scope() as session:
        found = get_recipient_preferences(session, recipient)
    if found is None:
        _fail(f"no recipient {recipient!r}; create one with"
              f" `notifier recipients set {recipient} ...`", EXIT_USAGE)
    _print_recipient(*found, as_json)


def _print_recipient(prefs: Any, fields: dict[str, Any], as_json: bool) -> None:
    from notifier.pipeline.preferences import next_digest_at, quiet_until

    now = datetime.now(UTC)
    until = quiet_until(prefs, fields["timezone"], now)
    next_digest = next_digest_at(prefs, fields["timezone"], now)
    fields = {**fields, "addresses": {
        channel: _masked(str(address)) for channel, address in fields["addresses"].items()
    }}
    if as_json:
        report = {**fields, **prefs.model_dump(mode="json"),
                  "quiet_until": until and until.isoformat(),
                  "next_digest_at": next_digest and next_digest.isoformat()}
        click.echo(json.dumps(report, indent=2))
        return
    for label, value in _summary(prefs, fields, next_digest):
        click.echo(f"{label + ':':<15}{value}")
    if until:
        within_a_day = (until - now).total_seconds() < 86400  # "until 07:00" is clear then
        click.echo(f"currently quiet until {_local(until, fields['timezone'], not within_a_day)}")


def _summary(
    prefs: Any, fields: dict[str, Any], next_digest: datetime | None
) -> list[tuple[str, str]]:
    from notifier.pipeline.preferences import format_quiet_hours

    default = ", ".join(get_settings().default_channels)
    opt_outs = "; ".join(
        f"{type_} on {'every channel' if channels == ['*'] else ', '.join(channels)}"
        for type_, channels in prefs.opt_out.items()
    )
    lines = [
        ("recipient", fields["id"] + (f" ({fields['name']})" if fields["name"] else "")),
        ("time zone", fields["timezone"]),
        ("email", fields["email"] or "-"),
        ("phone", fields["phone"] or "-"),
        ("addresses", ", ".join(f"{k} {v}" for k, v in sorted(fields["addresses"].items()))
         or "-"),
        ("channels", ", ".join(prefs.channels) if prefs.channels else f"default ({default})"),
        ("opted out", opt_outs or "none"),
        ("min priority", prefs.min_priority or "none (every priority)"),
        ("quiet hours", "; ".join(map(format_quiet_hours, prefs.quiet_hours)) or "none"),
        ("digest", _digest_text(prefs)),
    ]
    if next_digest:
        lines.append(("next digest", _local(next_digest, fields["timezone"])))
    return lines


def _digest_text(prefs: Any) -> str:
    at = prefs.digest_time.strftime("%H:%M")
    return {
        "immediate": "immediate (no digest)",
        "hourly": f"hourly, at :{at[-2:]} past each hour",
        "daily": f"daily at {at}",
        "weekly": f"weekly on {prefs.digest_day} at {at}",
    }[prefs.digest_mode]


def _local(moment: datetime, timezone: str, with_date: bool = True) -> str:
    """The moment on the recipient's clock: "Mon 2026-03-30 07:00 Europe/Berlin"."""
    from zoneinfo import ZoneInfo

    local = moment.astimezone(ZoneInfo(timezone))
    return f"{local:%a %Y-%m-%d %H:%M} {timezone}" if with_date else f"{local:%H:%M} {timezone}"


def _masked(address: str) -> str:
    """Addresses that are URLs (webhook, Slack, Apprise) may carry secrets: hide them,
    as dead letters do (``notifier.masking.mask_address``)."""
    from notifier.masking import mask_address

    return mask_address(address)


# --- webhooks ---------------------------------------------------------------------------


@main.group()
def webhooks() -> None:
    """Webhook receivers' signing secrets."""


@webhooks.group("secret")
def webhook_secret() -> None:
    """A receiver's own signing secret (each recipient with a webhook has one)."""


@webhook_secret.command("show")
@click.argument("recipient")
@click.option("--json", "as_json", is_flag=True, help="Also when it was made and rotated.")
@friendly_errors
def show_webhook_secret(recipient: str, as_json: bool) -> None:
    """Print RECIPIENT's signing secret (made now if it has none yet).

    Give it to the receiver: it verifies each request's X-Notifier-Signature with it.
    The only command that prints a secret.
    """
    from notifier.pipeline.webhook_secrets import secret_info
    from notifier.storage.db import session_scope

    with session_scope() as session:
        info = secret_info(session, recipient)
    if info is None:
        _no_recipient(recipient)
        return
    if not as_json:
        click.echo(info.secret)
        return
    click.echo(json.dumps({
        "recipient": info.recipient_id, "secret": info.secret,
        "created_at": info.created_at, "rotated_at": info.rotated_at,
        "previous_valid_until": info.previous_valid_until,
    }, default=str, indent=2))


@webhook_secret.command("rotate")
@click.argument("recipient")
@click.option("--overlap", help="How long the previous secret keeps signing too, beside the"
              " new one: 24h, 90m, 0 for not at all [NOTIFIER_WEBHOOK_SECRET_OVERLAP].")
@friendly_errors
def rotate_webhook_secret(recipient: str, overlap: str | None) -> None:
    """Give RECIPIENT a new signing secret.

    During the overlap every request carries two signatures, by the new secret and by
    the previous one, so the receiver can switch to the new one without losing
    messages. Print the new one with `notifier webhooks secret show RECIPIENT`.
    """
    from datetime import timedelta

    from notifier.pipeline.rules import parse_duration
    from notifier.pipeline.webhook_secrets import rotate_secret
    from notifier.storage.db import session_scope

    if overlap is None:
        span = timedelta(seconds=get_settings().webhook_secret_overlap)
    elif overlap.strip() in ("0", "0s"):
        span = timedelta(0)
    else:
        try:
            span = parse_duration(overlap.strip())
        except ValueError as exc:
            _fail(f"--overlap: {exc}", EXIT_USAGE)
            return
    with session_scope() as session:
        info = rotate_secret(session, recipient, span)
    if info is None:
        _no_recipient(recipient)
        return
    until = (f"the previous one also signs until"
             f" {_when(info.previous_valid_until.astimezone(UTC))} UTC"
             if info.previous_valid_until else "the previous one no longer signs")
    click.echo(f"rotated the webhook secret of {recipient}: {until};"
               f" print the new one with `notifier webhooks secret show {recipient}`")


def _no_recipient(recipient: str) -> None:
    _fail(f"no recipient {recipient!r}; create one with"
          f" `notifier recipients set {recipient} --address webhook=URL`", EXIT_USAGE)


# --- health and stats -------------------------------------------------------------------

EXIT_UNHEALTHY = 1


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--check", "checks", multiple=True,
              type=click.Choice(["broker", "database", "workers", "beat", "queues", "pending"]),
              help="Run only this check; repeat for more (default: all).")
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
    """Check broker, database, workers, beat, queue depths and overdue work, for probes.

    One line per check; exits 0 when every check passes and 1 otherwise.
    """
    from notifier.ops.health import CHECK_NAMES, Thresholds, run_checks

    settings = get_settings()
    report = run_checks(settings, Thresholds.from_settings(settings, **overrides),
                        checks or CHECK_NAMES)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        width = max(len(check.name) for check in report.checks)
        for check in report.checks:
            click.echo(f"{'ok' if check.ok else 'FAIL':<4} {check.name:<{width}}  {check.summary}")
    if not report.ok:
        sys.exit(EXIT_UNHEALTHY)


@main.command()
@click.option("--since", default="1h", show_default=True,
              help="The window, back from now: 15m, 2h, 1d, 1h30m, 90s.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def stats(since: str, as_json: bool) -> None:
    """Throughput, outcomes, latency percentiles and batching over a window (Postgres)."""
    from notifier.ops.stats import collect_stats
    from notifier.pipeline.rules import parse_duration
    from notifier.storage.db import session_scope

    try:
        window = parse_duration(since)
    except ValueError as exc:
        _fail(f"--since: {exc}", EXIT_USAGE)
    with session_scope() as session:
        figures = collect_stats(session, window)
    if as_json:
        click.echo(json.dumps(figures.as_dict(), indent=2, default=str))
        return
    _print_stats(figures, since)


def _print_stats(figures: Any, since: str) -> None:
    ingest, until = figures.ingest, figures.until
    span = f"{_when(figures.since)} → {until:%H:%M:%S}" if figures.since.date() == until.date() \
        else f"{_when(figures.since)} → {_when(until)}"
    click.echo(f"last {since}: {span} UTC\n")
    priorities = ", ".join(f"{name} {count:,}" for name, count in ingest.by_priority.items())
    click.echo(f"{'ingested':<15}{ingest.total:,} ({_rate(ingest.per_second)})"
               + (f"   {priorities}" if priorities else ""))
    click.echo(f"{'':<15}suppressed {ingest.suppressed:,}, rejected at ingest {ingest.rejected:,}")
    click.echo(f"{'ingest latency':<15}{_percentiles(ingest.latency)}"
               f"   (enqueued → stored, {ingest.latency.count:,} stamped)\n")
    for title, rows in (("deliveries", figures.by_channel), ("by priority", figures.by_priority)):
        _delivery_table(title, {**rows, "all": figures.deliveries} if rows else {})
    batching = figures.batching
    if batching.messages:
        plural = "s" if batching.digests != 1 else ""
        digests = (f"; {batching.digests:,} digest{plural} of {batching.digest_size:.1f}"
                   " on average" if batching.digests else "; no digests")
        click.echo(f"{'batching':<15}{batching.notifications:,} notifications in"
                   f" {batching.messages:,} messages: {batching.per_message:.2f} per message"
                   f"{digests}")
    else:
        click.echo(f"{'batching':<15}no messages sent")
    _table_sizes(figures.tables)


def _table_sizes(tables: dict[str, Any]) -> None:
    """Each table's estimated rows and total size (what retention keeps in check)."""
    click.echo(f"\n{'tables':<21}{'rows (est.)':>12}{'size':>11}")
    for name, size in tables.items():
        rows = "?" if size.rows is None else f"{size.rows:,}"
        click.echo(f"{name:<21}{rows:>12}{_bytes(size.bytes):>11}")
    if any(size.rows is None for size in tables.values()):
        click.echo("(?: not estimated until autovacuum or ANALYZE first visits the table)")


def _bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value, unit = count / 1024, "kB"
    for larger in ("MB", "GB", "TB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.1f} {unit}"


_DELIVERY_COLUMNS = ("sent", "retried", "retrying", "dead", "sent/s", "delivered", "errors",
                     "p50", "p95", "p99")


def _delivery_table(title: str, rows: dict[str, Any]) -> None:
    click.echo(f"{title:<13}" + "".join(f"{name:>10}" for name in _DELIVERY_COLUMNS))
    if not rows:
        click.echo(f"{'none':<13}\n")
        return
    for name, f in rows.items():
        cells = (f"{f.sent:,}", f"{f.sent_after_retry:,}", f"{f.retrying:,}", f"{f.dead:,}",
                 f"{f.per_second:.2f}", _percent(f.delivered_rate), _percent(f.error_rate),
                 _latency(f.latency.p50), _latency(f.latency.p95), _latency(f.latency.p99))
        click.echo(f"{name:<13}" + "".join(f"{cell:>10}" for cell in cells))
    click.echo("")


def _percentiles(latency: Any) -> str:
    return (f"p50 {_latency(latency.p50)}, p95 {_latency(latency.p95)},"
            f" p99 {_latency(latency.p99)}")


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if abs(seconds) < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s" if abs(seconds) < 100 else f"{seconds:,.0f} s"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f} %"


def _rate(per_second: float) -> str:
    return f"{per_second:,.2f}/s"
