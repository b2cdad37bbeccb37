"""Recipient preferences: the model, quiet hours and digest times across DST, storage."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import text

from notifier.pipeline.preferences import (
    MAX_QUIET,
    Preferences,
    PreferencesError,
    QuietHours,
    format_quiet_hours,
    get_recipient_preferences,
    local_instant,
    next_digest_at,
    parse_preferences,
    parse_quiet_hours,
    quiet_until,
    set_preferences,
)
from notifier.schemas import NotificationError
from notifier.storage.db import session_scope

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


def quiet(*spans: str) -> Preferences:
    return Preferences(quiet_hours=[parse_quiet_hours(span) for span in spans])


NIGHTS = quiet("daily 22:00-07:00")


# --- Quiet hours ------------------------------------------------------------------------


@pytest.mark.parametrize(("now", "until"), [
    (berlin(2026, 1, 14, 23, 30), berlin(2026, 1, 15, 7, 0)),  # before midnight
    (berlin(2026, 1, 15, 3, 0), berlin(2026, 1, 15, 7, 0)),  # after midnight
    (berlin(2026, 1, 14, 22, 0), berlin(2026, 1, 15, 7, 0)),  # the start is quiet
    (berlin(2026, 1, 15, 6, 59, 59), berlin(2026, 1, 15, 7, 0)),
    (berlin(2026, 1, 15, 7, 0), None),  # the end is not
    (berlin(2026, 1, 14, 21, 59, 59), None),
    (berlin(2026, 1, 14, 12, 0), None),
])
def test_quiet_hours_cross_midnight(now, until):
    """A 22:00-07:00 span is quiet from 22:00 (inclusive) to 07:00 (exclusive) next day."""
    assert quiet_until(NIGHTS, "Europe/Berlin", now) == until
    if until is not None:
        assert quiet_until(NIGHTS, "Europe/Berlin", now).tzinfo == UTC


def test_now_in_any_zone_gives_the_same_answer():
    """`now` is a moment: its zone does not matter, the recipient's does."""
    moment = berlin(2026, 1, 14, 23, 30)
    expected = utc(2026, 1, 15, 6, 0)
    for zone in (UTC, NEW_YORK, ZoneInfo("Asia/Tokyo")):
        assert quiet_until(NIGHTS, "Europe/Berlin", moment.astimezone(zone)) == expected
    # The same moment is 17:30 in New York: not quiet there.
    assert quiet_until(NIGHTS, "America/New_York", moment) is None


@pytest.mark.parametrize("now", [
    berlin(2026, 1, 16, 22, 0),  # Friday night
    berlin(2026, 1, 17, 12, 0),  # Saturday noon
    berlin(2026, 1, 18, 23, 59),  # Sunday night
    berlin(2026, 1, 19, 6, 0),  # Monday early
])
def test_a_weekend_chains_into_monday_morning(now):
    """Touching spans are one quiet time: Friday 22:00 to Monday 07:00."""
    prefs = quiet("daily 22:00-07:00", "sat,sun 00:00-24:00")
    assert quiet_until(prefs, "Europe/Berlin", now) == berlin(2026, 1, 19, 7, 0)


def test_a_chain_ends_where_the_spans_stop_touching():
    """Without a Sunday-night span the weekend ends at midnight."""
    prefs = quiet("fri 22:00-07:00", "sat,sun 00:00-24:00")
    assert quiet_until(prefs, "Europe/Berlin", berlin(2026, 1, 16, 23, 0)) == berlin(
        2026, 1, 19, 0, 0
    )
    assert quiet_until(prefs, "Europe/Berlin", berlin(2026, 1, 19, 1, 0)) is None


def test_overlapping_spans_merge():
    prefs = quiet("mon 21:00-23:00", "mon 22:00-07:00")
    assert quiet_until(prefs, "UTC", utc(2026, 1, 12, 21, 30)) == utc(2026, 1, 13, 7, 0)


def test_a_schedule_that_never_ends_is_capped():
    """Quiet all week would hold notifications forever: it ends after a week."""
    now = utc(2026, 1, 14, 12, 0)
    assert quiet_until(quiet("daily 00:00-24:00"), "UTC", now) == now + MAX_QUIET


def test_no_quiet_hours_is_never_quiet():
    assert quiet_until(Preferences(), "Europe/Berlin", utc(2026, 1, 14, 23, 0)) is None


def test_naive_now_is_refused():
    with pytest.raises(ValueError, match="now: needs a time zone"):
        quiet_until(NIGHTS, "UTC", datetime(2026, 1, 14, 23, 0))


@pytest.mark.parametrize(("zone", "start", "end"), [
    # Spring forward: the night is an hour shorter, 22:00 CET to 07:00 CEST.
    ("Europe/Berlin", utc(2026, 3, 28, 21, 0), utc(2026, 3, 29, 5, 0)),
    # Fall back: an hour longer, 22:00 CEST to 07:00 CET.
    ("Europe/Berlin", utc(2026, 10, 24, 20, 0), utc(2026, 10, 25, 6, 0)),
    # New York changes on other dates: EST -5, EDT -4.
    ("America/New_York", utc(2026, 3, 8, 3, 0), utc(2026, 3, 8, 11, 0)),
    ("America/New_York", utc(2026, 11, 1, 2, 0), utc(2026, 11, 1, 12, 0)),
])
def test_quiet_hours_are_wall_clock_time_across_dst(zone, start, end):
    """22:00-07:00 keeps meaning 22:00 and 07:00 on the recipient's clock."""
    assert quiet_until(NIGHTS, zone, start - timedelta(seconds=1)) is None
    assert quiet_until(NIGHTS, zone, start) == end
    assert quiet_until(NIGHTS, zone, end - timedelta(minutes=1)) == end
    assert quiet_until(NIGHTS, zone, end) is None
    local = ZoneInfo(zone)
    assert (start.astimezone(local).hour, end.astimezone(local).hour) == (22, 7)


def test_a_span_starting_in_the_spring_forward_gap_starts_at_the_jump():
    """02:30 does not exist on 2026-03-29 in Berlin: the span starts at 03:00 CEST."""
    prefs = quiet("sun 02:30-05:00")
    jump = utc(2026, 3, 29, 1, 0)  # 02:00 CET becomes 03:00 CEST
    assert quiet_until(prefs, "Europe/Berlin", jump - timedelta(seconds=1)) is None
    assert quiet_until(prefs, "Europe/Berlin", jump) == utc(2026, 3, 29, 3, 0)


def test_a_repeated_local_time_is_its_first_occurrence():
    """02:30 happens twice on 2026-10-25 in Berlin: spans start and end at the first."""
    starts = quiet("sun 02:30-04:00")
    assert quiet_until(starts, "Europe/Berlin", utc(2026, 10, 25, 0, 30)) == utc(
        2026, 10, 25, 3, 0
    )
    ends = quiet("sat 22:00-02:30")
    assert quiet_until(ends, "Europe/Berlin", utc(2026, 10, 25, 0, 0)) == utc(2026, 10, 25, 0, 30)
    assert quiet_until(ends, "Europe/Berlin", utc(2026, 10, 25, 0, 30)) is None


@pytest.mark.parametrize(("local", "zone", "expected"), [
    (datetime(2026, 3, 29, 2, 30), BERLIN, utc(2026, 3, 29, 1, 0)),  # gap: the jump
    (datetime(2026, 10, 25, 2, 30), BERLIN, utc(2026, 10, 25, 0, 30)),  # repeated: first
    (datetime(2026, 3, 8, 2, 15), NEW_YORK, utc(2026, 3, 8, 7, 0)),
    (datetime(2026, 11, 1, 1, 30), NEW_YORK, utc(2026, 11, 1, 5, 30)),
    (datetime(2026, 7, 1, 12, 0), BERLIN, utc(2026, 7, 1, 10, 0)),
])
def test_local_instant(local, zone, expected):
    assert local_instant(local, zone) == expected


# --- Digest times -----------------------------------------------------------------------


def digest(mode: str, at: time = time(8, 0), day: str = "mon") -> Preferences:
    return Preferences(digest_mode=mode, digest_time=at, digest_day=day)


def test_immediate_has_no_digest_time():
    assert next_digest_at(Preferences(), "UTC", utc(2026, 1, 1)) is None


@pytest.mark.parametrize(("zone", "after", "expected"), [
    ("UTC", utc(2026, 1, 14, 10, 20), utc(2026, 1, 14, 11, 15)),
    ("UTC", utc(2026, 1, 14, 11, 0), utc(2026, 1, 14, 11, 15)),
    ("UTC", utc(2026, 1, 14, 11, 15), utc(2026, 1, 14, 12, 15)),  # strictly after
    ("UTC", utc(2026, 1, 14, 23, 30), utc(2026, 1, 15, 0, 15)),
    # India is UTC+05:30: a quarter past on the local clock is a quarter to in UTC.
    ("Asia/Kolkata", utc(2026, 1, 14, 10, 0), utc(2026, 1, 14, 10, 45)),
])
def test_hourly_digest_at_the_minute_past_each_local_hour(zone, after, expected):
    assert next_digest_at(digest("hourly", time(8, 15)), zone, after) == expected


def test_hourly_digest_runs_every_real_hour_through_fall_back():
    """The repeated hour of 2026-10-25 still gets its digest: one per real hour."""
    prefs, moment, seen = digest("hourly", time(0, 0)), utc(2026, 10, 24, 23, 30), []
    for _ in range(4):
        moment = next_digest_at(prefs, "Europe/Berlin", moment)
        seen.append(moment)
    assert seen == [utc(2026, 10, 25, hour, 0) for hour in range(4)]


@pytest.mark.parametrize(("after", "expected"), [
    (utc(2026, 3, 27, 12, 0), utc(2026, 3, 28, 7, 0)),  # Saturday, CET (UTC+1)
    (utc(2026, 3, 28, 7, 0), utc(2026, 3, 29, 6, 0)),  # Sunday, now CEST (UTC+2)
    (utc(2026, 3, 29, 6, 0), utc(2026, 3, 30, 6, 0)),
    (utc(2026, 10, 24, 5, 0), utc(2026, 10, 24, 6, 0)),  # Saturday, CEST
    (utc(2026, 10, 24, 6, 0), utc(2026, 10, 25, 7, 0)),  # Sunday, back to CET
    (utc(2026, 10, 25, 7, 0), utc(2026, 10, 26, 7, 0)),
])
def test_daily_digest_stays_at_eight_in_berlin_across_dst(after, expected):
    found = next_digest_at(digest("daily"), "Europe/Berlin", after)
    assert found == expected
    assert found.astimezone(BERLIN).time() == time(8, 0)


def test_daily_digest_at_a_time_dst_skips_or_repeats():
    prefs = digest("daily", time(2, 30))
    # Skipped on 2026-03-29: sent at the jump, 03:00 CEST.
    assert next_digest_at(prefs, "Europe/Berlin", utc(2026, 3, 28, 12)) == utc(2026, 3, 29, 1, 0)
    # Repeated on 2026-10-25: sent once, at the first 02:30.
    first = next_digest_at(prefs, "Europe/Berlin", utc(2026, 10, 24, 12))
    assert first == utc(2026, 10, 25, 0, 30)
    assert next_digest_at(prefs, "Europe/Berlin", first) == utc(2026, 10, 26, 1, 30)


@pytest.mark.parametrize(("after", "expected"), [
    (berlin(2026, 1, 12, 9, 0), berlin(2026, 1, 12, 9, 30)),  # Monday before 09:30
    (berlin(2026, 1, 12, 9, 30), berlin(2026, 1, 19, 9, 30)),  # at it: next week
    (berlin(2026, 1, 15, 9, 0), berlin(2026, 1, 19, 9, 30)),  # Thursday
    (berlin(2026, 3, 25, 9, 0), berlin(2026, 3, 30, 9, 30)),  # over the DST change
])
def test_weekly_digest(after, expected):
    assert next_digest_at(digest("weekly", time(9, 30), "mon"), "Europe/Berlin", after) == expected


# --- The model --------------------------------------------------------------------------


def test_suppression_reasons():
    prefs = Preferences(opt_out={"marketing": ["*"], "billing": ["sms"]}, min_priority="normal")
    assert prefs.suppression_reason("marketing", "high", ["email", "inapp"]) == (
        "opted out of marketing on email, inapp"
    )
    assert prefs.suppression_reason("billing", "high", ["sms"]) == "opted out of billing on sms"
    assert prefs.suppression_reason("billing", "high", ["sms", "email"]) is None
    assert prefs.suppression_reason("alert", "low", ["email"]) == (
        "priority low is below the recipient's minimum normal"
    )
    assert prefs.suppression_reason("alert", "normal", ["email"]) is None
    assert prefs.opted_out("billing", "sms") and not prefs.opted_out("billing", "email")
    assert prefs.opted_out("marketing", "webhook")


def test_critical_is_never_below_the_minimum():
    prefs = Preferences(min_priority="critical")
    assert not prefs.below_minimum("critical")
    assert prefs.below_minimum("high")
    assert not Preferences().below_minimum("low")


def test_defaults_and_compact_json():
    assert parse_preferences(None) == parse_preferences({}) == Preferences()
    prefs = parse_preferences({
        "channels": ["email", "inapp", "email"], "digest_mode": "daily", "digest_time": "07:30",
        "quiet_hours": [{"days": ["sun", "sat"], "start": "00:00", "end": "24:00"}],
    })
    assert prefs.channels == ["email", "inapp"]
    assert prefs.model_dump(mode="json", exclude_defaults=True) == {
        "channels": ["email", "inapp"], "digest_mode": "daily", "digest_time": "07:30",
        "quiet_hours": [{"days": ["sat", "sun"], "start": "00:00", "end": "00:00"}],
    }
    assert format_quiet_hours(prefs.quiet_hours[0]) == "sat,sun 00:00-24:00"


def test_validation_errors_name_the_fields():
    with pytest.raises(NotificationError) as caught:
        parse_preferences({
            "channels": ["fax"], "min_priority": "urgent", "digest_time": "8 am",
            "quiet_hours": [{"days": ["someday"], "start": "22:00", "end": "07:00"}],
            "opt_out": {"Marketing": ["email"]}, "colour": "blue",
        })
    assert caught.value.problems == [
        "channels: unknown channel 'fax'; known: apprise, console, email, inapp, slack, sms,"
        " webhook",
        "opt_out: 'Marketing' is not a notification type",
        "min_priority: must be one of critical, high, normal, low (got 'urgent')",
        "quiet_hours.0.days.0: must be one of mon, tue, wed, thu, fri, sat, sun (got 'someday')",
        "digest_time: not a time of day HH:MM (got '8 am')",
        "colour: is not a known field",
    ]
    with pytest.raises(PreferencesError, match=r"^preferences: expected a JSON object"):
        parse_preferences([])  # type: ignore[arg-type]


@pytest.mark.parametrize(("spec", "days", "start", "end"), [
    ("mon-fri 22:00-07:00", ["mon", "tue", "wed", "thu", "fri"], time(22), time(7)),
    ("sat,sun 0:00-24:00", ["sat", "sun"], time(0), time(0)),
    ("daily 22:00-07:00", ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], time(22), time(7)),
    ("fri-mon 23:00-06:00", ["mon", "fri", "sat", "sun"], time(23), time(6)),
])
def test_parse_quiet_hours(spec, days, start, end):
    span = parse_quiet_hours(spec)
    assert span == QuietHours(days=days, start=start, end=end)
    assert parse_quiet_hours(format_quiet_hours(span)) == span


@pytest.mark.parametrize(("spec", "problem"), [
    ("mon-fri", "expected DAYS HH:MM-HH:MM"),
    ("someday 22:00-07:00", "unknown day 'someday'"),
    ("mon 25:00-07:00", "not a time of day HH:MM (got '25:00')"),
    ("mon 24:00-07:00", "not a time of day HH:MM (got '24:00')"),
])
def test_parse_quiet_hours_errors(spec, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_quiet_hours(spec)


# --- Storage ----------------------------------------------------------------------------


def stored(recipient_id: str) -> dict:
    with session_scope() as session:
        return session.execute(
            text("SELECT timezone, addresses, preferences FROM recipients WHERE id = :id"),
            {"id": recipient_id},
        ).one()._asdict()


def test_set_creates_the_recipient_and_stores_compact_json():
    with session_scope() as session:
        prefs = set_preferences(session, "u1", {
            "name": "Ada", "timezone": "Europe/Berlin", "channels": ["email", "inapp"],
            "addresses": {"webhook": "https://example.org/hook"}, "digest_mode": "daily",
        })
    assert prefs.channels == ["email", "inapp"]
    assert stored("u1") == {
        "timezone": "Europe/Berlin", "addresses": {"webhook": "https://example.org/hook"},
        "preferences": {"channels": ["email", "inapp"], "digest_mode": "daily"},
    }
    with session_scope() as session:
        found, fields = get_recipient_preferences(session, "u1")
        # The pipeline reads the channels as a JSON array.
        kind = session.execute(text(
            "SELECT jsonb_typeof(preferences -> 'channels') FROM recipients WHERE id = 'u1'"
        )).scalar()
    assert kind == "array"
    assert found == prefs
    assert fields == {"id": "u1", "name": "Ada", "email": None, "phone": None,
                      "timezone": "Europe/Berlin",
                      "addresses": {"webhook": "https://example.org/hook"}}


def test_changes_merge_with_what_is_stored():
    with session_scope() as session:
        set_preferences(session, "u2", {
            "email": "u2@example.org", "addresses": {"webhook": "https://a.example/h"},
            "min_priority": "high", "channels": ["email"],
        })
    with session_scope() as session:
        set_preferences(session, "u2", {
            "addresses": {"webhook": None, "slack": "https://hooks.slack.com/x"},
            "channels": None, "digest_mode": "weekly",
        })
    row = stored("u2")
    assert row["addresses"] == {"slack": "https://hooks.slack.com/x"}
    assert row["preferences"] == {"min_priority": "high", "digest_mode": "weekly"}
    with session_scope() as session:
        assert get_recipient_preferences(session, "u2")[1]["email"] == "u2@example.org"
        set_preferences(session, "u2", {"email": None, "timezone": None})
        assert get_recipient_preferences(session, "u2")[1]["email"] is None


@pytest.mark.parametrize(("changes", "problem"), [
    ({"timezone": "Mars/Olympus"}, "timezone: unknown time zone 'Mars/Olympus'"),
    ({"email": "nope"}, "email: not a valid email address ('nope')"),
    ({"phone": "call me"}, "phone: not a phone number"),
    ({"addresses": {"fax": "123"}}, "addresses: unknown channel 'fax'"),
    ({"digest_mode": "monthly"}, "digest_mode: must be one of immediate, hourly, daily, weekly"),
    ({"favourite_colour": "blue"}, "favourite_colour: is not a known field"),
])
def test_bad_changes_name_the_field_and_write_nothing(changes, problem):
    with pytest.raises(PreferencesError) as caught, session_scope() as session:
        set_preferences(session, "u3", changes)
    assert caught.value.problems[0].startswith(problem)
    with session_scope() as session:
        assert get_recipient_preferences(session, "u3") is None
