"""Routing at ingest: suppressed with a reason, dispatched at once or held for quiet
hours, or put in a window, as preferences and rules say.

Notifications go through the real ingest and flush on the run's Postgres, with a clock
the tests control (see ``tests.pipeline.helpers``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import text

from notifier.pipeline.outbox import sweep_due_deliveries
from notifier.pipeline.rules import Rule, load_rules
from notifier.settings import get_settings
from notifier.storage.db import session_scope
from tests.pipeline.helpers import (
    MINUTE,
    T0,
    deliveries_of,
    digests,
    flush,
    ids,
    ingest,
    note,
    prefs,
    query,
    raw_cursor,
    status,
    windows,
    with_rules,
)


def test_opted_out_and_low_priority_are_suppressed_with_a_reason():
    """Recorded with the reason, never delivered; an opt-out of one channel only drops it."""
    prefs("picky", channels=["inapp", "email"], email="picky@example.org",
          min_priority="normal", opt_out={"reminder": ["*"], "announcement": ["email"]})
    reminder = note("reminder", "picky")
    reminder_on_webhook = note("reminder", "picky", channels=["webhook"])
    low = note("alert", "picky", priority="low")
    announcement_by_email = note("announcement", "picky", channels=["email"])
    critical_low_type = note("alert", "picky", priority="critical")
    announcements = [note("announcement", "picky") for _ in range(2)]
    everything = [reminder, reminder_on_webhook, low, announcement_by_email,
                  critical_low_type, *announcements]
    result = ingest(everything, now=T0)

    assert len(result.stored) == len(everything) and result.suppressed == 4
    reasons = dict(query(
        "SELECT id::text, status_reason FROM notifications WHERE status = 'suppressed'"
    ))
    assert reasons == {
        reminder["id"]: "opted out of reminder on inapp, email",
        reminder_on_webhook["id"]: "opted out of reminder on webhook",
        low["id"]: "priority low is below the recipient's minimum normal",
        announcement_by_email["id"]: "opted out of announcement on email",
    }
    # Critical is never below the minimum: delivered at once on both channels.
    assert [d.channel for d in deliveries_of(critical_low_type["id"])] == ["email", "inapp"]
    # The two announcements wait; their digest goes to in-app only (e-mail opted out).
    [window] = windows()
    assert (window.type, window.item_count) == ("announcement", 2)
    flush(T0 + timedelta(hours=24))
    [digest] = digests()
    assert digest.notification_ids == ids(announcements)
    assert [d.channel for d in deliveries_of(digest.id)] == ["inapp"]
    suppressed = [reminder, reminder_on_webhook, low, announcement_by_email]
    assert all(deliveries_of(n["id"]) == [] for n in suppressed)
    assert {status(n) for n in suppressed} == {"suppressed"}


NEW_YORK = ZoneInfo("America/New_York")
SECURITY = Rule("security_notice", timedelta(minutes=5), 1, aggregate=False)


def _local(day: int, hour: int, minute: int = 0) -> datetime:
    """A wall-clock time in New York, January 2031 (UTC-5)."""
    return datetime(2031, 1, day, hour, minute, tzinfo=NEW_YORK).astimezone(UTC)


def test_quiet_hours_across_midnight_hold_deliveries_and_critical_passes():
    """22:00-07:00 in the recipient's zone: held until 07:00 local, not dropped."""
    prefs("owl", timezone="America/New_York",
          quiet_hours=[{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                        "start": "22:00", "end": "07:00"}])
    rules = with_rules(SECURITY)
    night = _local(14, 23, 30)  # Tuesday 23:30 local = Wednesday 04:30 UTC
    morning = _local(15, 7)
    assert morning == datetime(2031, 1, 15, 12, 0, tzinfo=UTC)

    held = note("security_notice", "owl")
    critical = note("alert", "owl", priority="critical")
    batch = [note("alert", "owl"), note("alert", "owl")]
    result = ingest([held, critical, *batch], now=night, rules=rules)

    [held_delivery] = deliveries_of(held["id"])
    assert (held_delivery.status, held_delivery.next_attempt_at) == ("scheduled", morning)
    assert status(held) == "dispatched"
    [critical_delivery] = deliveries_of(critical["id"])
    assert critical_delivery.status == "pending"
    assert result.delivery_ids == [critical_delivery.id]

    # The digest of the two alerts, due at 23:35 local, is held until 07:00 as well.
    flush(night + 5 * MINUTE, rules)
    [digest] = digests()
    [digest_delivery] = deliveries_of(digest.id)
    assert (digest_delivery.status, digest_delivery.next_attempt_at) == ("scheduled", morning)

    # Edges: 21:59 and 07:00 local are not quiet, 22:00 and 06:59 are.
    for moment, expected in [(_local(14, 21, 59), "pending"), (_local(14, 22), "scheduled"),
                             (_local(15, 6, 59), "scheduled"), (morning, "pending")]:
        item = note("security_notice", "owl")
        ingest([item], now=moment, rules=rules)
        assert deliveries_of(item["id"])[0].status == expected, moment

    # The sweeper leaves held deliveries alone until their time, then publishes them.
    scheduled = {str(r.id) for r in query("SELECT id FROM deliveries WHERE status = 'scheduled'")}
    assert len(scheduled) == 4
    with session_scope() as session:
        early = sweep_due_deliveries(raw_cursor(session), get_settings())
    assert not scheduled & {i for task in early for i in task.delivery_ids}
    with session_scope() as session:  # the database's clock reaches 07:00 in New York
        session.execute(text("UPDATE deliveries SET next_attempt_at = now() - interval '1 s'"
                             " WHERE status = 'scheduled'"))
        swept = sweep_due_deliveries(raw_cursor(session), get_settings())
    assert scheduled <= {i for task in swept for i in task.delivery_ids}


RULES_TOML = """
[default]
window = "1m"
max_count = 4

[types.alert]
max_count = 2
title = "{{ count }} alerts for {{ recipient_name }}"

[types.build]
mode = "leading"
window = "10m"

[types.audit]
aggregate = false

[types.deploy]
window = "20m"
digest_key = "service"
"""


def test_rules_from_a_toml_file_override_the_builtin_ones(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(RULES_TOML)
    rules = load_rules(path)
    ada = {"id": "ada", "name": "Ada"}
    alerts = [note("alert", ada) for _ in range(2)]
    build, audit = note("build", ada), note("audit", ada)
    misc = [note("misc", ada) for _ in range(2)]
    deploys = [note("deploy", ada, data={"service": s}) for s in ("api", "api", "web")]
    result = ingest([*alerts, build, audit, *misc, *deploys], now=T0, rules=rules)

    assert len(result.delivery_ids) == 2  # leading build and never-aggregated audit
    assert status(build) == status(audit) == "dispatched"
    opened = {(w.type, w.digest_key): w for w in windows()}
    assert set(opened) == {("alert", ""), ("misc", ""), ("deploy", "api"), ("deploy", "web"),
                           ("build", "")}
    assert opened[("alert", "")].closed  # max_count 2 instead of the built-in 3
    assert opened[("misc", "")].due_at == T0 + MINUTE  # [default] window
    assert opened[("misc", "")].max_count == 4
    assert opened[("deploy", "api")].due_at == T0 + 20 * MINUTE

    assert flush(T0, rules).digests == 1
    [digest] = digests()
    assert (digest.title, digest.notification_ids) == ("2 alerts for Ada", ids(alerts))
    assert flush(T0 + MINUTE, rules).digests == 1
    assert digests()[-1].notification_ids == ids(misc)
    assert flush(T0 + 20 * MINUTE, rules).digests == 1  # api (2); web goes alone
    assert digests()[-1].digest_key == "api"
    assert status(deploys[2]) == "dispatched"
