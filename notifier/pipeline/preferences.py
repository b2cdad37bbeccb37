"""A recipient's preferences: what they want, when they want it, in their own time zone.

The preferences live as JSON in ``recipients.preferences``; :class:`Preferences` is the
one definition of that JSON. Only fields that differ from their defaults are stored, so
the rows stay small and a changed default reaches everyone who never chose otherwise.

Times of day (quiet hours, digests) are wall-clock times in the recipient's zone: a
quiet span of 22:00-07:00 starts at 22:00 local time on both sides of a DST change.
Local times that a DST change skips or repeats follow one rule, :func:`local_instant`:
a local time happens at the first moment the recipient's clock shows it, or, when the
clock jumps over it, at the moment of the jump.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    ValidationError,
    field_validator,
)
from sqlalchemy import func
from sqlalchemy.orm import Session

from notifier.schemas import (
    TYPE_PATTERN,
    NotificationError,
    RecipientIn,
    check_channel_names,
    known_channel_list,
)
from notifier.settings import PRIORITIES
from notifier.storage.models import Recipient

DAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DigestMode = Literal["immediate", "hourly", "daily", "weekly"]

#: A schedule quiet all week long would hold notifications forever; it ends after this.
MAX_QUIET = timedelta(days=7)

#: The fields of the recipient row that :func:`set_preferences` changes.
RECIPIENT_FIELDS: tuple[str, ...] = ("name", "email", "phone", "timezone", "addresses")


class PreferencesError(NotificationError):
    """Bad preferences or recipient fields; each problem starts with the field's name."""


# --- Times of day -----------------------------------------------------------------------


def _whole_minutes(value: time) -> time:
    # Schedules are written "HH:MM"; seconds or a zone would only be misread.
    if value.second or value.microsecond or value.tzinfo is not None:
        raise ValueError(f"must be a time of day to the minute, HH:MM (got {value.isoformat()!r})")
    return value


def _midnight_as_24(value: Any) -> Any:
    # "24:00" reads better than "00:00" as the end of a day; both mean the next midnight.
    return time(0, 0) if value in ("24:00", "24:00:00") else value


_as_hh_mm = PlainSerializer(lambda value: value.strftime("%H:%M"), return_type=str)
ClockTime = Annotated[time, AfterValidator(_whole_minutes), _as_hh_mm]
EndTime = Annotated[time, BeforeValidator(_midnight_as_24), AfterValidator(_whole_minutes),
                    _as_hh_mm]


class QuietHours(BaseModel):
    """One span of a weekly schedule, in the recipient's time zone.

    ``days`` are the days on which the span starts; it ends the next day when ``end`` is
    not after ``start`` (``end`` "24:00" or "00:00" is the next midnight).
    """

    model_config = ConfigDict(extra="forbid")

    days: list[Day]
    start: ClockTime
    end: EndTime

    @field_validator("days")
    @classmethod
    def _some_days_in_order(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one day")
        return sorted(set(value), key=DAYS.index)


class Preferences(BaseModel):
    """The JSON in ``recipients.preferences``; every field has a default."""

    model_config = ConfigDict(extra="forbid")

    #: Channels used when a notification names none (None: the configured defaults).
    channels: list[str] | None = None
    #: Notification type -> channels opted out of; ``["*"]``: every channel.
    opt_out: dict[str, list[str]] = {}
    #: Notifications below this priority are suppressed (critical ones never are).
    min_priority: Literal["critical", "high", "normal", "low"] | None = None
    quiet_hours: list[QuietHours] = []
    digest_mode: DigestMode = "immediate"
    #: Local time of daily and weekly digests; hourly ones use its minute.
    digest_time: ClockTime = time(8, 0)
    #: The day of weekly digests.
    digest_day: Day = "mon"

    @field_validator("channels")
    @classmethod
    def _channels_known(cls, value: list[str] | None) -> list[str] | None:
        return known_channel_list(value)

    @field_validator("opt_out")
    @classmethod
    def _opt_outs_known(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        cleaned = {}
        for type_, channels in value.items():
            if not TYPE_PATTERN.match(type_):
                raise ValueError(f"{type_!r} is not a notification type")
            check_channel_names([name for name in channels if name != "*"])
            if channels:  # an empty list opts out of nothing: not worth storing
                cleaned[type_] = ["*"] if "*" in channels else sorted(set(channels))
        return cleaned

    def opted_out(self, type: str, channel: str) -> bool:
        """Whether the recipient opted out of this type on this channel."""
        channels = self.opt_out.get(type, ())
        return "*" in channels or channel in channels

    def below_minimum(self, priority: str) -> bool:
        """Whether the priority is below the recipient's minimum; critical never is."""
        if self.min_priority is None or priority == "critical":
            return False
        return PRIORITIES.index(priority) > PRIORITIES.index(self.min_priority)

    def suppression_reason(self, type: str, priority: str, channels: list[str]) -> str | None:
        """Why nothing of this notification reaches the recipient, or None.

        The reason is stored with a suppressed notification, so it is written for the
        person asking "why did I not get this?". A notification opted out on only some
        of its channels is not suppressed: the caller drops those channels.
        """
        if self.below_minimum(priority):
            return f"priority {priority} is below the recipient's minimum {self.min_priority}"
        if not channels:
            return f"opted out of {type} on every channel" if self.opted_out(type, "*") else None
        if all(self.opted_out(type, channel) for channel in channels):
            return f"opted out of {type} on {', '.join(channels)}"
        return None


def parse_preferences(raw: dict[str, Any] | None) -> Preferences:
    """Preferences from the stored JSON (None and {} are the defaults).

    Raises :class:`PreferencesError` naming each bad field.
    """
    if raw is None:
        return Preferences()
    if not isinstance(raw, dict):
        raise PreferencesError([f"preferences: expected a JSON object, got {type(raw).__name__}"])
    try:
        return Preferences.model_validate(raw)
    except ValidationError as exc:
        raise PreferencesError(_problems(exc)) from None


def _problems(exc: ValidationError) -> list[str]:
    return list(dict.fromkeys(_describe(error) for error in exc.errors()))


def _describe(error: Any) -> str:
    """One pydantic error as "field: problem (got value)"."""
    location = ".".join(str(part) for part in error["loc"]) or "preferences"
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return f"{location}: is required"
    if kind == "extra_forbidden":
        return f"{location}: is not a known field"
    if kind == "literal_error":
        expected = error["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        return f"{location}: must be one of {expected} (got {value!r})"
    if kind.startswith("time_"):
        return f"{location}: not a time of day HH:MM (got {value!r})"
    if kind == "string_pattern_mismatch" and location == "phone":
        return f"phone: not a phone number: digits, spaces, ( ) - and a leading + (got {value!r})"
    return f"{location}: {error['msg'].removeprefix('Value error, ')}"


# --- Quiet hours as text ----------------------------------------------------------------

_DAY_ALIASES = {"daily": DAYS, "weekdays": DAYS[:5], "weekends": DAYS[5:]}
_SPAN = re.compile(r"^\s*(?P<days>\S+)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$")


def parse_quiet_hours(text: str) -> QuietHours:
    """``"mon-fri 22:00-07:00"``, ``"sat,sun 00:00-24:00"`` or ``"daily 22:00-07:00"``.

    Raises ValueError with a message fit to follow the option's name.
    """
    match = _SPAN.match(text)
    if not match:
        raise ValueError(f"expected DAYS HH:MM-HH:MM, e.g. 'mon-fri 22:00-07:00' (got {text!r})")
    days = _parse_days(match["days"].lower())
    try:
        return QuietHours.model_validate(
            {"days": days, "start": match["start"].zfill(5), "end": match["end"].zfill(5)}
        )
    except ValidationError as exc:
        problem = _describe(exc.errors()[0]).partition(": ")[2]
        raise ValueError(f"{problem} in {text!r}") from None


def _parse_days(text: str) -> list[str]:
    days: list[str] = []
    for part in text.split(","):
        if part in _DAY_ALIASES:
            days += _DAY_ALIASES[part]
            continue
        first, _, last = part.partition("-")
        for day in (first, last or first):
            if day not in DAYS:
                raise ValueError(
                    f"unknown day {day!r}; use {', '.join(DAYS)}, ranges like mon-fri,"
                    " daily, weekdays or weekends"
                )
        span = (DAYS.index(last or first) - DAYS.index(first)) % 7  # "fri-mon" wraps
        days += [DAYS[(DAYS.index(first) + step) % 7] for step in range(span + 1)]
    return sorted(set(days), key=DAYS.index)


def format_quiet_hours(span: QuietHours) -> str:
    """The span as :func:`parse_quiet_hours` reads it, e.g. ``"mon-fri 22:00-07:00"``."""
    end = "24:00" if span.end == time(0, 0) else span.end.strftime("%H:%M")
    return f"{format_days(span.days)} {span.start.strftime('%H:%M')}-{end}"


def format_days(days: Sequence[str]) -> str:
    """Days as "daily", "mon-fri" or "sat,sun": runs of three or more become ranges."""
    if len(set(days)) == 7:
        return "daily"
    indexes = sorted({DAYS.index(day) for day in days})
    runs: list[list[int]] = []
    for index in indexes:
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    if len(runs) > 1 and runs[0][0] == 0 and runs[-1][-1] == 6:  # "fri-mon" wraps
        runs[0] = runs.pop() + runs[0]
    return ",".join(
        f"{DAYS[run[0]]}-{DAYS[run[-1]]}" if len(run) >= 3
        else ",".join(DAYS[i] for i in run)
        for run in runs
    )


# --- Time computations ------------------------------------------------------------------


def local_instant(local: datetime, zone: ZoneInfo) -> datetime:
    """The UTC moment of a naive local time in ``zone``.

    A time the clock shows twice (the hour repeated when DST ends) is its first
    occurrence; a time the clock skips (the hour lost when DST starts) is the moment of
    the jump, so "02:30" on a spring-forward night in Berlin is 03:00 CEST: a quiet
    span or a digest due then starts as soon as the clock has passed its time.
    """
    earlier = local.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if earlier.astimezone(zone).replace(tzinfo=None) == local:
        return earlier
    # In the gap: fold=1 reads the time with the offset after the jump, which puts it
    # before the jump; search between the two readings for the moment of the jump.
    low = int(local.replace(tzinfo=zone, fold=1).timestamp())
    high = int(earlier.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        shown = datetime.fromtimestamp(middle, zone).replace(tzinfo=None)
        low, high = (low, middle) if shown >= local else (middle, high)
    return datetime.fromtimestamp(high, UTC)


def _zone(timezone: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(timezone or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone: unknown time zone {timezone!r}") from None


def _aware(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{name}: needs a time zone (e.g. datetime.now(UTC))")
    return moment.astimezone(UTC)


def _quiet_spans(
    prefs: Preferences, zone: ZoneInfo, first: date, last: date
) -> Iterator[tuple[datetime, datetime]]:
    """(start, end) in UTC of every quiet span starting on a local day in [first, last]."""
    day = first
    while day <= last:
        for span in prefs.quiet_hours:
            if DAYS[day.weekday()] in span.days:
                end_day = day if span.end > span.start else day + timedelta(days=1)
                start = local_instant(datetime.combine(day, span.start), zone)
                end = local_instant(datetime.combine(end_day, span.end), zone)
                if end > start:  # a span inside a DST gap has no length
                    yield start, end
        day += timedelta(days=1)


def quiet_until(prefs: Preferences, timezone: str, now: datetime) -> datetime | None:
    """When the recipient's quiet time around ``now`` ends (UTC), or None if not quiet.

    Spans that touch or overlap are one quiet time: Friday 22:00-07:00 followed by a
    whole Saturday and Sunday and Sunday's 22:00-07:00 end on Monday at 07:00. Start
    times are inclusive, end times exclusive. A schedule that never ends (quiet all
    week) ends after :data:`MAX_QUIET`, so nothing waits forever.
    """
    now = _aware(now, "now")
    if not prefs.quiet_hours:
        return None
    zone = _zone(timezone)
    today = now.astimezone(zone).date()
    spans = sorted(_quiet_spans(prefs, zone, today - timedelta(days=1), today + timedelta(days=9)))
    end = max((e for s, e in spans if s <= now < e), default=None)
    if end is None:
        return None
    for start, span_end in spans:  # by start: each span touching the quiet time extends it
        if start > end:
            break
        end = max(end, span_end)
    return min(end, now + MAX_QUIET)


def next_digest_at(prefs: Preferences, timezone: str, after: datetime) -> datetime | None:
    """The first digest time strictly after ``after`` (UTC), or None for immediate.

    Hourly digests go out every hour at the minute of ``digest_time`` on the local
    clock (every real hour, also through DST changes); daily and weekly ones at
    ``digest_time`` local time, which moves in UTC when the zone changes its offset.
    """
    after = _aware(after, "after")
    zone = _zone(timezone)
    if prefs.digest_mode == "immediate":
        return None
    if prefs.digest_mode == "hourly":
        return _next_local_minute(prefs.digest_time.minute, zone, after)
    today = after.astimezone(zone).date()
    for offset in range(-1, 9):
        day = today + timedelta(days=offset)
        if prefs.digest_mode == "weekly" and DAYS[day.weekday()] != prefs.digest_day:
            continue
        moment = local_instant(datetime.combine(day, prefs.digest_time), zone)
        if moment > after:
            return moment
    raise AssertionError("a daily or weekly time falls within nine days")


def _next_local_minute(minute: int, zone: ZoneInfo, after: datetime) -> datetime:
    # Minute by minute: zones whose offset is not whole hours (or changes by 30 minutes)
    # put the local minute at other UTC minutes; two hours always contain one.
    moment = after.replace(second=0, microsecond=0)
    for _ in range(121):
        moment += timedelta(minutes=1)
        if moment.astimezone(zone).minute == minute:
            return moment
    raise AssertionError("every hour has the minute")


# --- Storage ----------------------------------------------------------------------------


def get_recipient_preferences(
    session: Session, recipient_id: str, *, for_update: bool = False
) -> tuple[Preferences, dict[str, Any]] | None:
    """The recipient's preferences and fields, or None when there is no such recipient.

    ``for_update`` locks the row, for a read-modify-write within the transaction.
    """
    row = session.get(Recipient, recipient_id, with_for_update=True if for_update else None)
    if row is None:
        return None
    return parse_preferences(row.preferences), _recipient_fields(row)


def _recipient_fields(row: Recipient) -> dict[str, Any]:
    return {
        "id": row.id, "name": row.name, "email": row.email, "phone": row.phone,
        "timezone": row.timezone or "UTC", "addresses": dict(row.addresses or {}),
    }


def set_preferences(session: Session, recipient_id: str, changes: dict[str, Any]) -> Preferences:
    """Change a recipient's fields and preferences; creates the recipient if missing.

    Recipient fields (``name``, ``email``, ``phone``, ``timezone``) replace the stored
    value, None clears it (the time zone goes back to UTC). ``addresses`` is merged key
    by key; a None value removes that channel's address. Preference fields replace the
    field; None resets it to its default. The merged result is validated as a whole
    before anything is written; :class:`PreferencesError` names each bad field.
    """
    unknown = set(changes) - set(RECIPIENT_FIELDS) - set(Preferences.model_fields)
    if unknown:
        raise PreferencesError([f"{name}: is not a known field" for name in sorted(unknown)])
    recipient_id = _validated_recipient({"id": recipient_id}).id
    row = session.get(Recipient, recipient_id, with_for_update=True)
    current = _recipient_fields(row) if row else {"id": recipient_id, "addresses": {}}
    recipient = _validated_recipient(_merged_recipient(current, changes))
    prefs = _merged_preferences(row.preferences if row else {}, changes)
    if row is None:
        row = Recipient(id=recipient.id)
        session.add(row)
    row.name, row.email, row.phone = recipient.name, recipient.email, recipient.phone
    row.timezone = recipient.timezone or "UTC"
    row.addresses = recipient.addresses
    row.preferences = prefs.model_dump(mode="json", exclude_defaults=True)
    row.updated_at = func.now()
    session.flush()
    return prefs


def _merged_recipient(current: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = current | {key: changes[key] for key in RECIPIENT_FIELDS[:4] if key in changes}
    addresses = changes.get("addresses") or {}
    if not isinstance(addresses, dict):
        raise PreferencesError(["addresses: must be an object of channel name to address"])
    merged["addresses"] = {
        key: value
        for key, value in {**current["addresses"], **addresses}.items()
        if value is not None
    }
    return {key: value for key, value in merged.items() if value is not None}


def _validated_recipient(fields: dict[str, Any]) -> RecipientIn:
    try:
        return RecipientIn.model_validate(fields)
    except ValidationError as exc:
        raise PreferencesError(_problems(exc)) from None


def _merged_preferences(stored: dict[str, Any] | None, changes: dict[str, Any]) -> Preferences:
    merged = dict(stored or {})
    for name in Preferences.model_fields:
        if name in changes:
            merged[name] = changes[name]
    return parse_preferences({key: value for key, value in merged.items() if value is not None})
