"""A hostile producer, generated: any JSON, any headers, any task ids, sizes within and
beyond the caps, mixed with good notifications, through the real broker to one real
worker. After each example every good notification is stored exactly once, every bad
item (or refused message) dead-lettered exactly once, and nothing is left in a queue or
unacknowledged.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from notifier.pipeline.ingest import dedup_key, id_for_unnamed, message_id_of
from notifier.storage.db import session_scope
from tests.brokers import connect, foreign_producer
from tests.conftest import BROKER, BROKER_URL
from tests.worker.test_hostile_input import QUEUES, broker_is_drained
from tests.workers import WorkerProcess, count_rows, wait_for

#: The worker's caps in this module: small, so examples stay cheap. A message of items
#: (at most 6 of at most ~100 kB each) stays below MAX_BYTES; a "too big" one is above.
MAX_BYTES, MAX_ITEMS = 1_000_000, 20

_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
#: JSON a good notification's data may hold (NaN and Infinity are not JSON numbers).
_finite_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


#: What a producer can put in headers and the task id. Over Redis anything JSON holds;
#: over AMQP a header table (64-bit integers, no NaN or infinity: RabbitMQ closes the
#: connection on those) and a task id that fits a short string (255 bytes): the rest
#: cannot even be published to RabbitMQ, so it never reaches a worker there.
if BROKER == "rabbitmq":
    _header_json = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False) | _text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
        max_leaves=8,
    )
    _header_number = st.floats(allow_nan=False, allow_infinity=False)
    _long_task_id = st.text(st.characters(max_codepoint=127), min_size=200, max_size=240)
else:
    _header_json, _header_number = _json, st.floats()
    _long_task_id = st.text(min_size=256, max_size=400)


def _note(**fields: Any) -> dict[str, Any]:
    return {"recipient": "user-1", "type": "task_deadline", "title": "Due"} | fields


@st.composite
def good_item(draw: Any) -> dict[str, Any]:
    note = _note(title="t" + draw(_text),
                 data=draw(st.dictionaries(_text, _finite_json, max_size=3)))
    if draw(st.booleans()):
        note["id"] = str(uuid.uuid4())
    if draw(st.booleans()):
        note["recipient"] = {"id": "r-" + draw(_text), "email": "user@bücher.de",
                             "addresses": {"webhook": "https://hooks.example.org/x"}}
    if draw(st.integers(0, 9)) == 0:
        note["body"] = "b" * 65_536  # at the limit: accepted
    return note


BAD_FIELDS: list[dict[str, Any]] = [
    {"type": "x://["}, {"type": "T" * 100_000}, {"priority": "urgent"}, {"title": ""},
    {"title": "t" * 256}, {"body": "b" * 65_537}, {"id": "not-a-uuid"},
    {"channels": ["inapp"] * 33}, {"unknown_field": 1},
    {"recipient": {"id": "r", "addresses": {"webhook": "http://example.com:99999/"}}},
    {"recipient": {"id": "r", "addresses": {"webhook": "[::1"}}},
    {"recipient": {"id": "r", "addresses": {"slack": "https://x.example/" + "a" * 3000}}},
    {"recipient": {"id": "r", "addresses": {"apprise": "json://"}}},
    {"recipient": {"id": "r", "email": "user@" + "ü" * 70 + ".de"}},
]


@st.composite
def bad_item(draw: Any) -> Any:
    kind = draw(st.integers(0, 2))
    if kind == 0:  # not an object at all
        return draw(_json.filter(lambda value: not isinstance(value, dict)))
    if kind == 1:  # an object, with at least one field we do not know
        return draw(st.dictionaries(_text, _json, max_size=3)) | {"x-unknown": 1}
    return _note() | draw(st.sampled_from(BAD_FIELDS))


@dataclass
class Sent:
    task_id: str
    args: list[Any]
    headers: dict[str, Any]
    #: Refused whole (too big, too many items, wrong shape): one ``:message`` dead letter.
    whole: bool
    stored: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)


@st.composite
def message(draw: Any, number: int) -> Sent:
    task_id = draw(st.one_of(st.uuids().map(str), _text, _long_task_id))
    task_id = f"{task_id}#{number}"  # unique within an example
    headers = {"notifier_enqueued_at": draw(_header_json | _header_number | st.just(1e20))}
    headers |= draw(st.dictionaries(_text.map(lambda key: f"x_{key}"), _header_json,
                                    max_size=2))
    shape = draw(st.sampled_from(["items", "items", "items", "too_many", "too_big", "two_args"]))
    if shape == "too_many":
        items = [_note() for _ in range(MAX_ITEMS + 1)]
    elif shape == "too_big":
        items = [_note(body="b" * 250_000) for _ in range(5)]
    else:
        tagged = draw(st.lists(st.one_of(good_item().map(lambda item: (True, item)),
                                         bad_item().map(lambda item: (False, item))),
                               min_size=1, max_size=6))
        items = [item for _, item in tagged]
    args = [items, "extra"] if shape == "two_args" else [items]
    sent = Sent(task_id, args, headers, whole=shape != "items")
    mid = message_id_of(task_id)
    if sent.whole:
        sent.dead.append(dedup_key(mid, "message"))
        return sent
    for index, (good, item) in enumerate(tagged):
        if good:
            sent.stored.append(item.get("id") or str(id_for_unnamed(mid, index)))
        else:
            sent.dead.append(dedup_key(mid, index))
    return sent


@pytest.fixture(scope="module")
def hostile_worker() -> Iterator[WorkerProcess]:
    # Module-scoped, so it starts before the per-test clean-up: empty the broker first,
    # or it would take what an earlier test left there for one of our examples.
    broker = connect(BROKER_URL)
    broker.empty_queues()
    broker.close()
    # Ingest queues only: the good items' recipients have webhook addresses on a name
    # that does not resolve here, and how fast a resolver says so (and whether it says
    # "never" or "try again", which retries on a countdown held in ``unacked``) depends
    # on the machine. Delivery is not what this test is about.
    worker = WorkerProcess.start("-Q", ",".join(QUEUES),
                                 env={"NOTIFIER_MAX_MESSAGE_BYTES": str(MAX_BYTES),
                                      "NOTIFIER_MAX_MESSAGE_NOTIFICATIONS": str(MAX_ITEMS)})
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def producer() -> Iterator[Celery]:
    app = foreign_producer("hostile-property", BROKER_URL)
    yield app
    app.close()


def _empty_tables() -> None:
    with session_scope() as session:
        session.execute(text("TRUNCATE notifications, deliveries, dead_letters,"
                             " idempotency_keys, recipients, aggregation_windows CASCADE"))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(st.integers(1, 4).flatmap(
    lambda n: st.tuples(*(message(i) for i in range(n)))))
def test_hostile_messages_cost_only_themselves(hostile_worker, producer, messages):
    """Whatever is sent, good notifications are stored once, bad items and refused
    messages are dead-lettered once, and the broker ends empty."""
    _empty_tables()
    for sent in messages:
        producer.send_task("notifier.ingest", args=sent.args, task_id=sent.task_id,
                           headers=sent.headers, queue="notifier.normal")
    stored = [note_id for sent in messages for note_id in sent.stored]
    dead = sorted(key for sent in messages for key in sent.dead)
    wait_for(lambda: count_rows() >= len(stored)
             and count_rows("SELECT count(*) FROM dead_letters") >= len(dead)
             and broker_is_drained(), timeout=30, what="every message settled")
    with session_scope() as session:
        ids = list(session.scalars(text("SELECT id::text FROM notifications")))
        keys = sorted(session.scalars(text("SELECT dedup_key FROM dead_letters")))
    assert sorted(ids) == sorted(stored)
    assert keys == dead
