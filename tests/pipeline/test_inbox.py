"""The inbox's states, counts, marks and cursor paging (``notifier.pipeline.inbox``) on
real Postgres, with messages written by the real in-app channel."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notifier.channels.base import OutgoingMessage
from notifier.channels.inapp import InAppChannel
from notifier.pipeline.inbox import (
    CURSOR_LENGTH,
    MAX_IDS,
    MAX_PAGE_SIZE,
    State,
    count_states,
    decode_cursor,
    encode_cursor,
    list_page,
    mark,
    messages_after,
)
from notifier.storage.db import session_scope


def deliver(recipient: str, count: int, title: str = "Title") -> list[str]:
    """``count`` messages written by the in-app channel in one batch; their ids."""
    messages = [OutgoingMessage(uuid.uuid4(), recipient, None, "alert", "high", f"{title} {i}",
                                "body") for i in range(count)]
    assert all(result.sent for result in InAppChannel("inapp://").send_batch(messages))
    return [str(message.delivery_id) for message in messages]


def page(recipient: str, **options: object):
    with session_scope() as session:
        return list_page(session, recipient, **options)


def marked(recipient: str, state: str, ids: list[str] | None = None, **options: object) -> int:
    with session_scope() as session:
        return mark(session, recipient, state, ids, **options)


def counts(recipient: str) -> dict[str, int]:
    with session_scope() as session:
        return {state.value: n for state, n in count_states(session, recipient).items()}


def states(recipient: str) -> dict[str, str]:
    items = page(recipient, include_archived=True, limit=MAX_PAGE_SIZE).items
    return {str(item.id): item.state.value for item in items}


def test_states_only_move_forward_and_marking_twice_moves_nothing():
    """seen, read, archived each move only messages not there yet; a later state is never
    undone by an earlier one; counts answer every state in one call."""
    a, b, c, d = deliver("ann", 4)
    assert counts("ann") == {"unread": 4, "seen": 0, "read": 0, "archived": 0}
    assert marked("ann", "seen", [a, b, c]) == 3
    assert marked("ann", "seen", [a]) == 0
    assert marked("ann", "read", [b, c]) == 2
    assert marked("ann", "archived", [c]) == 1
    assert marked("ann", "seen", [b, c]) == 0 and marked("ann", "read", [c]) == 0
    assert states("ann") == {a: "seen", b: "read", c: "archived", d: "unread"}
    assert counts("ann") == {"unread": 1, "seen": 1, "read": 1, "archived": 1}
    archived = next(i for i in page("ann", include_archived=True).items if str(i.id) == c)
    assert archived.seen_at and archived.read_at and archived.archived_at


def test_archiving_an_unread_message_reads_it_and_every_state_is_reachable_directly():
    """Archiving stamps read and seen too (so read-message retention applies to it)."""
    a, b = deliver("bo", 2)
    assert marked("bo", State.ARCHIVED, [a]) == 1
    assert marked("bo", State.READ, [b]) == 1
    items = {str(i.id): i for i in page("bo", include_archived=True).items}
    assert items[a].read_at is not None and items[a].seen_at is not None
    assert items[b].seen_at is not None and items[b].archived_at is None


def test_marks_never_reach_another_recipients_messages():
    """The recipient is in every condition: someone else's ids move nothing, "all" is theirs."""
    mine, theirs = deliver("cy", 2), deliver("dee", 2)
    assert marked("cy", "read", theirs) == 0
    assert marked("cy", "archived") == 2
    assert counts("dee") == {"unread": 2, "seen": 0, "read": 0, "archived": 0}
    assert marked("cy", "archived", mine) == 0


def test_mark_all_until_a_cursor_spares_what_came_after_it():
    """"Mark all read" up to the page a user saw leaves newer messages unread."""
    deliver("eve", 3, "old")
    shown = page("eve").items
    newer = deliver("eve", 2, "new")
    assert marked("eve", "read", until=shown[0].cursor) == 3
    assert {str(item.id) for item in page("eve", unread_only=True).items} == set(newer)


def test_paging_walks_every_message_once_newest_first():
    """Pages of 7 over 31 messages (batches share a created_at, ties go by id) give each
    message once, in (created_at, id) descending order, and the last page says so."""
    for batch in (5, 1, 12, 13):
        deliver("fay", batch)
    seen, cursor, pages = [], None, 0
    while True:
        result = page("fay", cursor=cursor, limit=7)
        seen.extend(result.items)
        pages += 1
        if result.next_cursor is None:
            break
        cursor = result.next_cursor
    assert pages == 5 and len(seen) == 31 == len({item.id for item in seen})
    keys = [(item.created_at, item.id) for item in seen]
    assert keys == sorted(keys, reverse=True)


def test_filters_unread_only_all_and_archived():
    """unread_only lists unread and seen; the default hides archived unless asked."""
    a, b, c, _ = deliver("gus", 4)
    marked("gus", "seen", [a])
    marked("gus", "read", [b])
    marked("gus", "archived", [c])
    assert len(page("gus", unread_only=True).items) == 2
    assert len(page("gus").items) == 3
    assert len(page("gus", include_archived=True).items) == 4


def test_messages_after_a_cursor_are_the_newer_ones_oldest_first():
    """The feed's catch-up: everything after a position, in stream order, any state."""
    first = deliver("hal", 3, "before")
    cursor = page("hal").items[0].cursor
    later = deliver("hal", 2, "after") + deliver("hal", 2, "later")
    marked("hal", "archived", later[:1])
    with session_scope() as session:
        after = messages_after(session, "hal", cursor)
        everything = messages_after(session, "hal", None)
    assert {str(i.id) for i in after} == set(later)
    assert [i.title.split()[0] for i in after] == ["after", "after", "later", "later"]
    assert len(everything) == 7 and {str(i.id) for i in everything} >= set(first)


def test_a_cursor_round_trips_and_is_opaque_and_fixed_length():
    item = page("ivy").items or []
    assert item == []
    deliver("ivy", 1)
    message = page("ivy").items[0]
    assert len(message.cursor) == CURSOR_LENGTH
    assert decode_cursor(message.cursor) == message.position
    assert encode_cursor(decode_cursor(message.cursor)) == message.cursor


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=80), st.binary(max_size=40).map(lambda b: b.hex()),
                 st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                         "0123456789-_=", min_size=CURSOR_LENGTH, max_size=CURSOR_LENGTH)))
def test_a_hostile_cursor_is_a_value_error_naming_cursor(text):
    """Any string either decodes to a position that encodes back to it, or is refused
    with a ValueError naming ``cursor``: never another exception."""
    try:
        position = decode_cursor(text)
    except ValueError as exc:
        assert str(exc).startswith("cursor: ")
    else:
        assert encode_cursor(position) == text


@pytest.mark.parametrize(("call", "field"), [
    (lambda s: list_page(s, "x", cursor="A" * CURSOR_LENGTH), "cursor"),
    (lambda s: list_page(s, "x", cursor="not a cursor"), "cursor"),
    (lambda s: list_page(s, "x", cursor=12), "cursor"),
    (lambda s: list_page(s, "x", limit=MAX_PAGE_SIZE + 1), "limit"),
    (lambda s: list_page(s, "x", limit=0), "limit"),
    (lambda s: list_page(s, "r" * 256), "recipient_id"),
    (lambda s: list_page(s, " "), "recipient_id"),
    (lambda s: mark(s, "x", "unread"), "state"),
    (lambda s: mark(s, "x", "deleted"), "state"),
    (lambda s: mark(s, "x", "read", ["nope"]), "ids"),
    (lambda s: mark(s, "x", "read", "abc"), "ids"),
    (lambda s: mark(s, "x", "read", [str(uuid.uuid4())] * (MAX_IDS + 1)), "ids"),
    (lambda s: mark(s, "x", "read", until="%" * CURSOR_LENGTH), "cursor"),
    (lambda s: messages_after(s, "x", "zz"), "cursor"),
])
def test_bad_input_is_one_value_error_naming_the_field(call, field):
    with session_scope() as session, pytest.raises(ValueError, match=f"^{field}: "):
        call(session)
