"""Ingest's plain-data validation (``validate_notification``) against the client's model
(``parse_notification``): the same values pass with the same fields and defaults, and
the same values are refused with the same words, problem for problem."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest

from notifier.ids import uuid7, uuid7_texts
from notifier.schemas import (
    NotificationError,
    NotificationIn,
    parse_notification,
    plain_message,
    to_message,
    validate_notification,
    validate_notifications,
)

GOOD = {"recipient": "u1", "type": "task_deadline", "title": "Due"}
_DEEP: dict[str, Any] = {}
_node = _DEEP
for _ in range(70):
    _node["x"] = {}
    _node = _node["x"]

BAD = [
    {"priority": "urgent"}, {"type": "Task Deadline"}, {"type": 7}, {"title": ""},
    {"title": "t" * 300}, {"titel": "x"}, {"x" * 1000: 1}, {"id": "42"}, {"id": 42},
    {"channels": ["fax"]}, {"channels": []}, {"channels": ["inapp"] * 33},
    {"channels": "inapp"}, {"data": [1, 2]}, {"data": {"x": "\x00"}},
    {"data": {"x": "\ud800"}}, {"data": {"x": math.nan}}, {"data": _DEEP},
    {"data": {"x": "y" * 70_000}}, {"body": "b\x00"}, {"body": "\udfff"},
    {"title": "\ud800"}, {"send_at": "2026-01-01T09:00:00"}, {"send_at": "soon"},
    {"idempotency_key": ""}, {"idempotency_key": "a\nb"}, {"idempotency_key": "k" * 300},
    {"recipient": {"id": "u1", "email": "not-an-address"}},
    {"recipient": {"email": "a@example.org"}},
    {"recipient": {"id": "u1", "timezone": "Mars/Olympus"}},
    {"recipient": {"id": "u1", "email": "user@" + "ü" * 70 + ".de"}},
    {"recipient": {"id": "u1", "addresses": {"webhook": "http://example.com:99999/"}}},
    {"recipient": {"id": "u1", "addresses": {f"k{i}": "x" for i in range(17)}}},
    {"recipient": {"id": "u1", "addresses": {"fax": "x"}}},
    {"recipient": {"id": "u1", "surname": "x"}},
    {"recipient": 7}, {"recipient": ["u1"]}, {"recipient": None}, {"recipient": ""},
    {"recipient": "u1\r\nBcc: x"}, {"recipient": "u\x00"},
    {"priority": "p", "type": "X", "title": "", "extra": 1, "data": {"x": math.inf}},
]


def _problems(parse: Any, raw: Any) -> list[str]:
    with pytest.raises(NotificationError) as error:
        parse(raw)
    return error.value.problems


@pytest.mark.parametrize("change", BAD)
def test_the_same_values_are_refused_with_the_same_words(change):
    raw = GOOD | change
    assert _problems(validate_notification, raw) == _problems(parse_notification, raw)


@pytest.mark.parametrize("raw", [None, [], "x", 3])
def test_a_notification_that_is_not_an_object_is_refused_alike(raw):
    assert _problems(validate_notification, raw) == _problems(parse_notification, raw)


@pytest.mark.parametrize("change", [
    {}, {"priority": "critical", "channels": ["email", "inapp", "email"], "body": "b"},
    {"id": "01a24e6b-4744-7153-b937-e0ec98d1ff20", "idempotency_key": " k ", "title": " t "},
    {"data": {"n": 1, "s": "ü", "deep": {"a": [1, {"b": None}]}},
     "send_at": "2026-01-01T09:00:00+02:00"},
    {"recipient": {"id": " u2 ", "email": "user@bücher.de", "timezone": "Europe/Paris",
                   "addresses": {"webhook": "https://example.com/h"}}},
])
def test_the_same_values_pass_with_the_same_fields_and_defaults(change):
    raw = GOOD | change
    plain = dict(validate_notification(raw))
    model = parse_notification(raw)
    assert (plain.pop("data_json"), plain.pop("recipient_id")) == (
        model.data_json, model.recipient_id
    )
    assert plain == dict(model)
    assert list(plain) == list(NotificationIn.model_fields)


def test_a_message_is_checked_in_one_call_when_every_item_passes():
    """All good: the items as each alone gives them; any item bad or not an object: None,
    and ingest checks each alone, so the good ones still pass with their own reasons."""
    good = [GOOD, GOOD | {"priority": "high", "data": {"k": [1]}}]
    assert validate_notifications(good) == [validate_notification(raw) for raw in good]
    assert validate_notifications([*good, GOOD | {"id": "42"}]) is None
    assert validate_notifications([*good, "not an object"]) is None


@pytest.mark.parametrize("change", BAD)
def test_a_message_holding_any_refused_item_goes_item_by_item(change):
    """The one call checks the message's items together (most checks once for all of
    them): whatever an item alone is refused for, the one call refuses too."""
    assert validate_notifications([GOOD, GOOD | change, GOOD]) is None


@pytest.mark.parametrize("change", [
    {}, {"priority": "critical", "channels": ["email", "inapp", "email"], "body": "b"},
    {"id": "01a24e6b-4744-7153-b937-e0ec98d1ff20", "idempotency_key": " k ", "title": " t "},
    {"data": {"n": 1, "s": "ü", "deep": {"a": [1, {"b": None}]}, "f": 1e16},
     "send_at": "2026-01-01T09:00:00+02:00"},
    {"recipient": {"id": " u2 ", "email": "user@bücher.de", "timezone": "Europe/Paris",
                   "addresses": {"webhook": "https://example.com/h"}}},
])
def test_the_one_call_gives_what_each_alone_gives(change):
    raws = [GOOD | change, GOOD]
    together = validate_notifications(raws)
    assert together == [validate_notification(raw) for raw in raws]
    assert [list(item) for item in together] == [list(validate_notification(raw)) for raw in raws]


@pytest.mark.parametrize("change", [
    {}, {"priority": "normal", "body": "", "data": {}, "channels": None, "send_at": None},
    {"priority": "critical", "channels": ["email", "inapp", "email"], "body": "b"},
    {"id": "01a24e6b-4744-7153-b937-e0ec98d1ff20", "idempotency_key": " k ", "title": " t "},
    {"data": {"n": 1, "s": "ü", "deep": {"a": [1, {"b": None}]}, "f": 1e16, "z": None},
     "send_at": "2026-01-01T09:00:00+02:00"},
    {"send_at": "2026-01-01T09:00:00.25Z", "callback_url": " https://example.com/cb "},
    {"recipient": {"id": " u2 ", "email": "user@bücher.de", "timezone": "Europe/Paris",
                   "addresses": {"webhook": "https://example.com/h"}, "name": None}},
    {"recipient": {"id": "u3", "addresses": {}}, "priority": "low"},
])
def test_a_message_built_from_plain_data_is_the_models_message(change):
    """The list path's message (no model) is :func:`to_message`'s, key for key in the
    same order, so the broker carries the same JSON whichever path built it."""
    raw = GOOD | change
    model = parse_notification(raw)
    model.id = model.id or uuid.UUID("01a24e6b-4744-7153-b937-e0ec98d1ff21")
    [plain] = validate_notifications([raw]) or []
    built = plain_message(plain, str(model.id))
    assert json.dumps(built) == json.dumps(to_message(model))


def test_ids_made_for_a_list_are_distinct_version_7_uuids_of_now():
    """``uuid7_texts`` (one random read for a list's ids): each in ``str(uuid7())``'s
    form, version 7 with the RFC variant, its time this millisecond, none repeated."""
    before = uuid.UUID(str(uuid7())).int >> 80
    made = uuid7_texts(2000)
    after = uuid.UUID(str(uuid7())).int >> 80
    assert len(set(made)) == 2000 and uuid7_texts(0) == []
    for text in made:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert before <= parsed.int >> 80 <= after
