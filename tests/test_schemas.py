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


# --- limits and addresses (issue 10) ----------------------------------------------------


def _problems(change: dict[str, object]) -> list[str]:
    with pytest.raises(NotificationError) as error:
        parse_notification(GOOD | change)
    return error.value.problems


@pytest.mark.parametrize(("address", "problem"), [
    ("http://example.com:99999/", "not a valid URL (Port out of range 0-65535)"),
    ("[::1", "not a valid URL (no scheme)"),
    ("http://[::1/", "not a valid URL (Invalid IPv6 URL)"),
    ("https://example.com:port/", "not a valid URL (Port could not be cast"),
    ("example.com/hook", "not a valid URL (no scheme)"),
    ("https:///path", "not a valid URL (no host)"),
])
def test_url_address_that_does_not_parse_is_refused(address, problem):
    """A webhook address is parsed at ingest (port, host), not in the middle of a batch."""
    (reason,) = _problems({"recipient": {"id": "u1", "addresses": {"webhook": address}}})
    assert reason.startswith(f"recipient.addresses.webhook: {problem}"), reason


def test_address_over_the_limit_names_field_limit_and_size():
    """A 10 MB URL: the reason says how long it is and the limit, not the value."""
    url = "https://x.example/" + "a" * 10_485_742
    (reason,) = _problems({"recipient": {"id": "u1", "addresses": {"slack": url}}})
    assert reason == (
        "recipient.addresses.slack: is 10485760 characters, more than the limit of 2048"
    )


def test_international_email_domain_is_accepted_when_idna_encodable():
    """user@bücher.de can be sent (IDNA); a domain that cannot be encoded is refused."""
    note = parse_notification(GOOD | {"recipient": {"id": "u1", "email": "user@bücher.de",
                                                    "addresses": {"email": "a@bücher.de"}}})
    assert note.recipient.email == "user@bücher.de"
    (reason,) = _problems({"recipient": {"id": "u1", "email": "user@" + "ü" * 70 + ".de"}})
    assert reason.startswith("recipient.email: the domain cannot be IDNA-encoded")
    assert len(reason) < 200


def test_email_over_320_characters_names_the_size():
    (reason,) = _problems({"recipient": {"id": "u1", "email": "a" * 400 + "@example.org"}})
    assert reason == "recipient.email: is 412 characters, more than the limit of 320"


def test_too_many_addresses_and_channels_are_refused():
    addresses = {f"k{i}": "x" for i in range(17)}
    problems = _problems({"recipient": {"id": "u1", "addresses": addresses},
                          "channels": ["inapp"] * 33})
    assert "recipient.addresses: has 17 entries, more than the limit of 16" in problems
    assert "channels: has 33 entries, more than the limit of 32" in problems


@pytest.mark.parametrize("change", [
    {"priority": "p" * 1_000_000}, {"type": "T" * 1_000_000}, {"id": "9" * 1_000_000},
    {"x" * 1_000_000: 1}, {"channels": ["f" * 1_000_000]}, {"title": "t" * 1_000_000},
    {"recipient": {"id": "u1", "timezone": "Z" * 60}},
])
def test_a_reason_never_repeats_a_huge_value(change):
    """Quoted values and field names are cut: every reason stays short."""
    problems = _problems(change)
    assert all(len(problem) < 300 for problem in problems), problems


def test_string_over_its_limit_names_the_size():
    assert _problems({"title": "t" * 300}) == [
        "title: is 300 characters, more than the limit of 255"
    ]


def test_preferences_use_the_same_address_checks():
    """Setting a recipient's addresses through preferences refuses what ingest refuses."""
    from notifier.pipeline.preferences import PreferencesError, _validated_recipient

    with pytest.raises(PreferencesError) as error:
        _validated_recipient({"id": "u1", "addresses": {"webhook": "http://example.com:99999/"}})
    assert "webhook: not a valid URL (Port out of range" in str(error.value)


@pytest.mark.parametrize(("url", "problem"), [
    ("ftp://hooks.example.com/in", "callback_url: must be an http or https URL"),
    ("hooks.example.com/in", "callback_url: must be an http or https URL"),
    ("https://user:secret@hooks.example.com/in", "callback_url: must not hold a user name"),
    ("https://hooks.example.com:99999/in", "callback_url: not a valid URL"),
    ("https:///in", "callback_url: not a valid URL (no host)"),
    ("https://hooks.example.com/in\r\nX: y", "callback_url: must be one URL"),
    ("https://hooks.example.com/" + "a" * 3000, "callback_url: is 3026 characters"),
    (42, "callback_url: Input should be a valid string"),
])
def test_a_bad_callback_url_names_its_field(url, problem):
    """Checked alike by the model (the client's, the API's) and the plain-data form
    (ingest's), each naming the field."""
    from notifier.schemas import validate_notification, validate_notifications

    for check in (parse_notification, validate_notification):
        with pytest.raises(NotificationError) as error:
            check(GOOD | {"callback_url": url})
        assert any(p.startswith(problem) for p in error.value.problems), error.value.problems
    assert validate_notifications([GOOD | {"callback_url": url}]) is None


def test_a_good_callback_url_is_kept_and_none_is_the_default():
    from notifier.schemas import validate_notifications

    url = "https://hooks.example.com:8443/status?source=notifier"
    assert parse_notification(GOOD | {"callback_url": url}).callback_url == url
    assert parse_notification(GOOD).callback_url is None
    [item] = validate_notifications([GOOD | {"callback_url": url}]) or []
    assert item["callback_url"] == url
