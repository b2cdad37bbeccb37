"""The options of ``notifier recipients set``, parsed into preference changes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from notifier.ops.cli.common import EXIT_USAGE, fail, friendly_errors

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
            fail("; ".join(_as_option(problem) for problem in exc.problems), EXIT_USAGE)

    return friendly_errors(wrapper)


def _as_option(problem: str) -> str:
    location, _, message = problem.partition(": ")
    field = location.split(".")[0]
    return f"{_OPTION_OF_FIELD.get(field, '--' + field.replace('_', '-'))}: {message}"


def _bad(option: str, message: str) -> None:
    fail(f"{option}: {message}", EXIT_USAGE)


def changes_from_options(options: dict[str, Any]) -> dict[str, Any]:
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


def changed_opt_outs(
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
