"""``notifier recipients``: set and show addresses and preferences."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click

from notifier.ops.cli.common import EXIT_USAGE, fail
from notifier.ops.cli.recipient_options import (
    changed_opt_outs,
    changes_from_options,
    recipient_errors,
)
from notifier.settings import get_settings


@click.group()
def recipients() -> None:
    """Recipients' addresses and preferences: channels, opt-outs, quiet hours, digests."""


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

    changes = changes_from_options(options)
    with session_scope() as session:
        found = get_recipient_preferences(session, recipient.strip(), for_update=True)
        if options["opt_outs"] or options["opt_ins"]:
            changes["opt_out"] = changed_opt_outs(
                found[0].opt_out if found else {}, options["opt_outs"], options["opt_ins"]
            )
        set_preferences(session, recipient, changes)
        stored = get_recipient_preferences(session, recipient.strip())
    assert stored is not None, "set_preferences has just written it"
    _print_recipient(*stored, as_json)


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
        fail(f"no recipient {recipient!r}; create one with"
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
