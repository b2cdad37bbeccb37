"""Validation of the notification contract: each problem names its field."""

from __future__ import annotations

import pytest

from notifier.schemas import NotificationError, parse_notification

GOOD = {"recipient": "u1", "type": "task_deadline", "title": "Due"}


@pytest.mark.parametrize(("change", "problem"), [
    ({"priority": "urgent"}, "priority: must be one of critical, high, normal, low (got 'urgent')"),
    ({"type": "Task Deadline"}, "type: must start with a lowercase letter"),
    ({"title": ""}, "title: String should have at least 1 character"),
    ({"titel": "x"}, "titel: is not a known field"),
    ({"id": "42"}, "id: not a valid UUID (got '42')"),
    ({"channels": ["fax"]}, "channels: unknown channel 'fax'"),
    ({"channels": []}, "channels: must name at least one channel"),
    ({"data": [1, 2]}, "data: must be a JSON object"),
    ({"data": {"x": "\x00"}}, "data: must not contain NUL characters"),
    ({"send_at": "2026-01-01T09:00:00"}, "send_at: needs a time zone"),
    ({"recipient": {"id": "u1", "email": "not-an-address"}},
     "recipient.email: not a valid email address ('not-an-address')"),
    ({"recipient": {"email": "a@example.org"}}, "recipient.id: is required"),
    ({"recipient": {"id": "u1", "timezone": "Mars/Olympus"}},
     "recipient.timezone: unknown time zone 'Mars/Olympus'"),
    ({"recipient": 7}, "recipient: expected a recipient id (string) or an object with an 'id'"),
    ({"recipient": "u1\r\nBcc: x"}, "recipient: must not contain control characters"),
])
def test_each_problem_names_its_field(change, problem):
    """A bad field is reported as 'field: problem' with the offending value."""
    with pytest.raises(NotificationError) as error:
        parse_notification(GOOD | change)
    assert any(p.startswith(problem) for p in error.value.problems), error.value.problems


def test_all_problems_are_reported_at_once():
    """Every bad field is listed, so a producer fixes them in one go."""
    with pytest.raises(NotificationError) as error:
        parse_notification({"type": "X", "priority": "p"})
    assert [p.split(":")[0] for p in error.value.problems] == [
        "recipient", "type", "priority", "title"
    ]


def test_a_good_notification_keeps_its_fields():
    """Valid input passes with defaults filled in."""
    note = parse_notification(GOOD | {"recipient": {"id": "u1", "email": "u1@example.org"}})
    assert (note.recipient_id, note.priority, note.data, note.channels) == (
        "u1", "normal", {}, None
    )
