"""Fuzzed input: bad (and some good) payloads from a foreign producer.

Payloads are generated with hypothesis: a valid notification, then one mutation that
makes one field wrong (wrong type, missing, too long, NUL, lone surrogates, NaN, nested
junk, unknown fields), or a message that is not a notification at all (a number, a
string, a list of lists, two arguments). Each payload knows what should become of it:
**stored** (good), **dead** with a reason naming ``field``, or **either** (the contract
does not settle it, e.g. ``send_at`` as epoch seconds). They are sent the way a service
that does not install notifier sends them: a plain Celery app, ``send_task(
"notifier.ingest", ...)`` with our own task id, so each item's dead letter is found by
its dedup key (``ingest:<message id>:<index>``, or ``:message`` for the whole message;
``notifier.ingest.dedup_key`` hashes a long or odd id).

Beyond the payloads, a fixed set of hostile messages goes with every run: headers of any
type (``notifier_enqueued_at`` of 1e20, NaN, a string, a list), task ids longer than a
column or not printable, a message over ``NOTIFIER_MAX_MESSAGE_BYTES`` and one over
``NOTIFIER_MAX_MESSAGE_NOTIFICATIONS`` (each refused whole), and recipients' addresses
that do not parse or cannot be encoded (refused with the field).
"""

from __future__ import annotations

import math
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

FIELDS = ("id", "recipient", "type", "priority", "channels", "title", "body", "data",
          "idempotency_key", "send_at")
STORED, DEAD, EITHER = "stored", "dead", "either"

#: Payloads that stopped ingest before issue 10 (found by this suite; the
#: ``fuzz_poison`` scenario keeps sending them, and now each costs its own item alone):
#:
#: * NUL, lone surrogates, NaN/Infinity: the item is refused (or Postgres refuses its
#:   row), and then its dead letter cannot be written either, because
#:   ``dead_letters.payload`` is jsonb, which holds no ``\u0000``, no lone surrogate and
#:   no NaN. The batch raises, goes back to the queue, comes back, fails again: the poison
#:   message and every message batched with it never land.
#: * Data nested ~900-985 deep (valid JSON of a few KiB that the producer could encode):
#:   the worker's main process cannot pickle the batch for its pool (RecursionError in a
#:   pool callback; the batch's slot is never freed and its messages are neither
#:   acknowledged nor returned, so after two of them a ``-c 2`` worker dispatches
#:   nothing at all), or cannot even decode the message (Celery logs CRITICAL "Can't
#:   decode message body" and drops it: no dead letter).
STALLS_INGEST = frozenset({
    "title: NUL", "body: NUL", "data: NUL", "recipient: NUL in name",
    "title: surrogates", "body: surrogates", "type: surrogates", "recipient: surrogates",
    "idempotency_key: surrogates", "data: surrogates", "data: surrogate key",
    "data: NaN or infinity", "data: deep nesting",
})


@dataclass
class FuzzItem:
    payload: Any
    expect: str
    #: What a dead letter's reason must name (a field, ``notification`` or ``message``).
    field: str | None
    kind: str
    #: The id it is stored under if it is (its own, or the one ingest derives).
    id: str | None = None


@dataclass
class FuzzMessage:
    message_id: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str
    items: list[FuzzItem]
    #: The whole message is refused (wrong call shape): one dead letter ``:message``.
    message_level: bool = False
    #: Message headers beyond Celery's own (hostile ones, from ``hostile_messages``).
    headers: dict[str, Any] = field(default_factory=dict)
    #: Used as the task id as is, instead of a fresh ``chaos-fuzz-<uuid>``.
    fixed_id: str | None = None


# --- strategies -----------------------------------------------------------------------

_safe_char = st.characters(blacklist_categories=("Cs", "Cc"))
safe_text = st.text(_safe_char, max_size=40)
_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63)
            | st.floats(allow_nan=False, allow_infinity=False) | safe_text)
json_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(safe_text, inner,
                                                                          max_size=4),
    max_leaves=12,
)
_finite = st.floats(allow_nan=False, allow_infinity=False)
_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | _finite | safe_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(safe_text, inner, max_size=3),
    max_leaves=6,
)
_type_slug = st.text("abcdefghijklmnopqrstuvwxyz0123456789_", max_size=20).map(
    lambda rest: "t" + rest)
_zones = st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo"])


def _huge(low: int, high: int, char: str = "x") -> st.SearchStrategy[str]:
    return st.integers(low, high).map(lambda n: char * n)


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def _with_bad_char(char: str) -> st.SearchStrategy[str]:
    # Never at either end: surrounding whitespace (\n, \t) is stripped, and rightly so.
    return st.tuples(safe_text, safe_text).map(lambda pair: f"a{pair[0]}{char}b{pair[1]}")


_surrogate = st.sampled_from(["\ud800", "\udfff", "\udc80"]).flatmap(_with_bad_char)
_nul = _with_bad_char("\x00")
_control = st.sampled_from(["\n", "\r", "\t", "\x1b", "\x7f"]).flatmap(_with_bad_char)
_not_str = st.integers() | _finite | st.booleans() | st.lists(
    _junk, max_size=3) | st.dictionaries(safe_text, _junk, max_size=3)


@st.composite
def recipient_object(draw: Any) -> dict[str, Any]:
    number = draw(st.integers(0, 19))
    recipient: dict[str, Any] = {"id": f"fz-o{number}", "email": f"fz{number}@example.com"}
    if draw(st.booleans()):
        recipient["name"] = draw(safe_text)
    if draw(st.booleans()):
        recipient["timezone"] = draw(_zones)
    if draw(st.integers(0, 3)) == 0:
        recipient["email"] = f"fz{number}@bücher.example"  # IDNA-encodable: accepted
        recipient["addresses"] = {"webhook": f"https://hooks.example.org/fz{number}"}
    return recipient


@st.composite
def good_notification(draw: Any) -> dict[str, Any]:
    notification: dict[str, Any] = {
        "recipient": draw(st.sampled_from([f"fz-r{i}" for i in range(20)]) | recipient_object()),
        "type": draw(_type_slug),
        "title": "T" + draw(st.text(_safe_char, max_size=100)),
    }
    if draw(st.booleans()):
        notification["body"] = draw(st.text(_safe_char, max_size=300))
    if draw(st.booleans()):
        notification["priority"] = draw(st.sampled_from(["critical", "high", "normal", "low"]))
    if draw(st.booleans()):
        notification["channels"] = ["inapp"]
    if draw(st.booleans()):
        notification["data"] = draw(st.dictionaries(safe_text, json_values, max_size=5))
    if draw(st.booleans()):
        notification["send_at"] = "2020-01-01T00:00:00+00:00"
    # Ids and keys are filled in afterwards, unique (hypothesis likes to repeat values).
    if draw(st.booleans()):
        notification["id"] = None
    if draw(st.integers(0, 3)) == 0:
        notification["idempotency_key"] = None
    return notification


#: Field -> values that are wrong for it (and what they are, for the report).
_WRONG: dict[str, list[tuple[str, st.SearchStrategy[Any]]]] = {
    "id": [("not a uuid", st.integers() | st.booleans() | st.lists(_junk, max_size=2)
            | st.sampled_from(["not-a-uuid", "1234", "", "0123456789abcdef"]))],
    "recipient": [
        ("wrong type", _not_str.filter(lambda v: not isinstance(v, dict)) | st.none()),
        ("blank", st.sampled_from(["", "   "])),
        ("control chars", _control),
        ("surrogates", _surrogate),
        ("too long", _huge(256, 5000)),
        ("object without id", st.just({"email": "a@example.com"})),
        ("bad email", st.builds(lambda s: {"id": "fz-bad", "email": f"no-at-{s}"}, safe_text)),
        ("bad time zone", st.just({"id": "fz-bad", "timezone": "Mars/Olympus_Mons"})),
        ("bad phone", st.just({"id": "fz-bad", "phone": "call me"})),
        ("unknown address channel", st.just({"id": "fz-bad", "addresses": {"fax": "1"}})),
        ("address not a URL", st.sampled_from([
            "http://example.com:99999/", "[::1", "http://[::1/", "https:///no-host",
            "no-scheme.example/hook", "https://example.com:port/",
        ]).flatmap(lambda url: st.sampled_from(["webhook", "slack", "apprise"]).map(
            lambda channel: {"id": "fz-bad", "addresses": {channel: url}}))),
        ("address too long", _huge(2049, 20_000, "a").map(
            lambda tail: {"id": "fz-bad", "addresses": {"webhook": "https://x.example/" + tail}})),
        ("email domain not IDNA", st.integers(64, 200).map(
            lambda n: {"id": "fz-bad", "email": "fz@" + "ü" * n + ".example"})),
        ("too many addresses", st.just({"id": "fz-bad",
                                        "addresses": {f"k{i}": "x" for i in range(17)}})),
        ("NUL in name", st.builds(lambda s: {"id": "fz-bad", "name": s}, _nul)),
        ("nested junk id", st.builds(lambda j: {"id": {"x": j}}, _junk)),
    ],
    "type": [
        ("wrong type", _not_str | st.none()),
        ("not a slug", st.sampled_from(["Alert", "", "9lives", "has space", "a/b", "ÄÖÜ"])),
        ("too long", _huge(65, 5000, "a")),
        ("surrogates", _surrogate),
    ],
    "priority": [
        ("wrong value", st.text(max_size=10).filter(
            lambda v: v not in ("critical", "high", "normal", "low"))),
        ("wrong type", _not_str | st.none()),
    ],
    "channels": [
        ("empty", st.just([])),
        ("unknown", st.sampled_from([["fax"], ["email", "pigeon"], ["EMAIL"]])),
        ("wrong type", st.sampled_from(["email", 1, {}, [1], [None], True])),
    ],
    "title": [
        ("wrong type", _not_str | st.none()),
        ("blank", st.sampled_from(["", "   ", "\t"])),
        ("too long", _huge(256, 20_000)),
        ("NUL", _nul),
        ("surrogates", _surrogate),
    ],
    "body": [
        ("wrong type", _not_str | st.none()),
        ("too long", _huge(65_537, 70_000)),
        ("NUL", _nul),
        ("surrogates", _surrogate),
    ],
    "data": [
        ("not an object", st.lists(_junk, max_size=3) | safe_text | st.integers() | st.none()),
        ("NUL", st.builds(lambda s: {"k": s}, _nul)),
        ("too big", _huge(65_600, 70_000).map(lambda s: {"k": s})),
        ("surrogates", st.builds(lambda s: {"k": s}, _surrogate)),
        ("surrogate key", st.builds(lambda s: {s: 1}, _surrogate)),
        ("NaN or infinity", st.sampled_from([math.nan, math.inf, -math.inf]).map(
            lambda f: {"k": f})),
    ],
    "idempotency_key": [
        ("wrong type", _not_str),
        ("blank", st.just("")),
        ("too long", _huge(256, 5000)),
        ("control chars", _control),
        ("surrogates", _surrogate),
    ],
    "send_at": [
        ("not a time", st.sampled_from(["tomorrow", "2026-13-45T99:00:00Z", "soon"])),
        ("no time zone", st.sampled_from(["2026-01-01T09:00:00", "2026-01-01"])),
        ("wrong type", st.booleans() | st.lists(_junk, max_size=2)
         | st.dictionaries(safe_text, _junk, max_size=2)),
    ],
}

#: Values the contract calls wrong but the validator may take (reported, not failed).
_LENIENT: dict[str, list[tuple[str, st.SearchStrategy[Any]]]] = {
    "send_at": [("epoch seconds", st.integers(0, 2**31) | st.floats(0, 2e9)
                 | st.integers(0, 2**31).map(str))],
    "data": [("deep nesting", st.integers(900, 985).map(lambda d: {"k": _nested(d)}))],
}


def stalls_ingest(payload: Any) -> str | None:
    """Why this payload would stall ingest today (see ``STALLS_INGEST``), or None."""
    stack: list[tuple[Any, int]] = [(payload, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > 50:
            return "deep nesting"
        if isinstance(value, float) and not math.isfinite(value):
            return "NaN/Infinity"
        if isinstance(value, str):
            if "\x00" in value:
                return "NUL"
            if any("\ud800" <= char <= "\udfff" for char in value):
                return "lone surrogate"
        elif isinstance(value, dict):
            stack.extend((key, depth + 1) for key in value)
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
    return None


def _pool(strategy: st.SearchStrategy[Any], size: int, seed_value: int) -> list[Any]:
    """Up to ``size`` values of ``strategy`` from hypothesis (fewer if it runs out)."""
    found: list[Any] = []

    @seed(seed_value)
    @settings(max_examples=size, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def take(value: Any) -> None:
        found.append(value)

    take()
    return found


@dataclass
class Pools:
    """Values drawn by hypothesis, per strategy; messages are assembled from them."""

    good: list[dict[str, Any]]
    wrong: dict[tuple[str, str], list[Any]]
    lenient: dict[tuple[str, str], list[Any]]
    not_objects: list[Any]
    unknown_names: list[str]
    junk: list[Any]

    @classmethod
    def draw(cls, count: int, seed_value: int) -> Pools:
        size = max(10, min(200, count // 25))
        seeds = iter(range(seed_value, seed_value + 1000))
        return cls(
            good=_pool(good_notification(), max(20, min(1500, count // 6)), next(seeds)),
            wrong={(name, label): _pool(values, size, next(seeds))
                   for name, options in _WRONG.items() for label, values in options},
            lenient={(name, label): _pool(values, size, next(seeds))
                     for name, options in _LENIENT.items() for label, values in options},
            not_objects=_pool(st.integers() | _finite | safe_text
                              | st.booleans() | st.none() | st.lists(_junk, max_size=3),
                              size, next(seeds)),
            unknown_names=_pool(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1,
                                        max_size=12).filter(lambda k: k not in FIELDS),
                                size, next(seeds)),
            junk=_pool(_junk | _huge(1000, 100_000), size, next(seeds)),
        )

    def good_item(self, rng: random.Random) -> FuzzItem:
        return FuzzItem(dict(rng.choice(self.good)), STORED, None, "good")

    def bad_item(self, rng: random.Random) -> FuzzItem:
        """One notification with one thing wrong, or not a notification at all; never
        one of the payloads that stall ingest (``STALLS_INGEST``, see ``poison_item``)."""
        while True:
            candidate = self._any_bad_item(rng)
            if candidate.kind not in STALLS_INGEST and not stalls_ingest(candidate.payload):
                return candidate

    def poison_item(self, rng: random.Random) -> FuzzItem:
        """A bad payload of a kind that stalls ingest today (``STALLS_INGEST``)."""
        kind = rng.choice(sorted(STALLS_INGEST))
        name, label = kind.split(": ", 1)
        notification = dict(rng.choice(self.good))
        values = self.wrong.get((name, label)) or self.lenient[(name, label)]
        notification[name] = rng.choice(values)
        expect = EITHER if (name, label) in self.lenient else DEAD
        return FuzzItem(notification, expect, name, kind)

    def _any_bad_item(self, rng: random.Random) -> FuzzItem:
        roll = rng.random()
        if roll < 0.06:
            return FuzzItem(rng.choice(self.not_objects), DEAD, "notification", "not an object")
        notification = dict(rng.choice(self.good))
        if roll < 0.12:
            missing = rng.choice(["recipient", "type", "title"])
            del notification[missing]
            return FuzzItem(notification, DEAD, missing, f"{missing}: missing")
        if roll < 0.18:
            name = rng.choice(self.unknown_names)
            notification[name] = rng.choice(self.junk)
            return FuzzItem(notification, DEAD, name, "unknown field")
        if roll < 0.22:
            (name, label), values = rng.choice(sorted(self.lenient.items()))
            notification[name] = rng.choice(values)
            return FuzzItem(notification, EITHER, name, f"{name}: {label}")
        name = rng.choice(FIELDS)
        label = rng.choice([label for field_name, label in self.wrong if field_name == name])
        notification[name] = rng.choice(self.wrong[(name, label)])
        return FuzzItem(notification, DEAD, name, f"{name}: {label}")

    def item(self, rng: random.Random, good_share: float) -> FuzzItem:
        return self.good_item(rng) if rng.random() < good_share else self.bad_item(rng)

    def message(self, rng: random.Random) -> FuzzMessage:
        """70 % one item, 25 % a list of 1-5, 1 % an empty list, 4 % a wrong call."""
        shape = rng.random()
        if shape < 0.70:
            one = self.item(rng, 0.10)
            if isinstance(one.payload, list):  # a list as the argument is a list of items
                return FuzzMessage("", [[one.payload]], {}, "", [one])
            return FuzzMessage("", [one.payload], {}, "", [one])
        if shape < 0.95:
            items = [self.item(rng, 0.30) for _ in range(rng.randint(1, 5))]
            return FuzzMessage("", [[i.payload for i in items]], {}, "", items)
        if shape < 0.96:
            return FuzzMessage("", [[]], {}, "", [])
        one = self.item(rng, 0.5)
        args, kwargs = rng.choice([
            ([one.payload, one.payload], {}), ([], {}), ([], {"notification": one.payload}),
            ([one.payload], {"extra": 1}),
        ])
        return FuzzMessage("", args, kwargs, "",
                           [FuzzItem(one.payload, DEAD, "message", "wrong call")], True)


def generate(count: int, seed_value: int, poison: bool = False) -> list[FuzzMessage]:
    """``count`` messages, each with a unique message id, unique ids and keys.

    ``poison``: instead, one message in four carries a payload of a kind that stalls
    ingest today (``STALLS_INGEST``), the rest one good notification each.
    """
    pools = Pools.draw(count, seed_value)
    rng = random.Random(seed_value)
    if poison:
        messages = []
        for _ in range(count):
            one = pools.poison_item(rng) if rng.random() < 0.25 else pools.good_item(rng)
            messages.append(FuzzMessage("", [one.payload], {}, "", [one]))
    else:
        messages = [pools.message(rng) for _ in range(count)] + hostile_messages(pools, rng)
    for value in messages:
        _finish(value)
    return messages


#: Values of the producer's ``notifier_enqueued_at`` header that are not a time.
HOSTILE_STAMPS: tuple[Any, ...] = (1e20, -1e20, math.nan, math.inf, "yesterday", [1, 2],
                                   {"t": 1}, None, True, 2**70)


def hostile_messages(pools: Pools, rng: random.Random) -> list[FuzzMessage]:
    """A fixed set of hostile messages beyond the payloads: headers of any type, task
    ids too long for a column or not printable, a message over each size cap."""
    from notifier.settings import get_settings

    settings = get_settings()
    messages = []
    for stamp in HOSTILE_STAMPS:  # any header: the items fare as they would without it
        items = [pools.good_item(rng), pools.bad_item(rng)]
        messages.append(FuzzMessage("", [[i.payload for i in items]], {}, "", items,
                                    headers={"notifier_enqueued_at": stamp, "x-junk": [stamp]}))
    for task_id in ("t" * 300, "ü" * 200, "id with spaces\tand tabs", "é" * 40 + "\u2028"):
        items = [pools.good_item(rng), pools.bad_item(rng), pools.good_item(rng)]
        messages.append(FuzzMessage("", [[i.payload for i in items]], {}, "", items,
                                    fixed_id=f"{task_id}-{uuid.uuid4()}"))
    too_many = [dict(pools.good_item(rng).payload)
                for _ in range(settings.max_message_notifications + 1)]
    messages.append(FuzzMessage("", [too_many], {}, "", [
        FuzzItem(too_many, DEAD, "message", "too many notifications")], True))
    body = "b" * 60_000
    too_big = [{"recipient": "fz-r0", "type": "fz", "title": "T", "body": body}
               for _ in range(settings.max_message_bytes // len(body) + 2)]
    messages.append(FuzzMessage("", [too_big], {}, "", [
        FuzzItem(too_big, DEAD, "message", "message too big")], True))
    return messages


def _finish(value: FuzzMessage) -> None:
    """Fill in unique ids and keys, the message id, the queue; work out stored ids."""
    from notifier.pipeline.ingest import id_for_unnamed, message_id_of

    value.message_id = value.fixed_id or f"chaos-fuzz-{uuid.uuid4()}"
    stored_as = message_id_of(value.message_id)
    for index, fuzz_item in enumerate(value.items):
        payload = fuzz_item.payload
        if isinstance(payload, dict):
            if "id" in payload and payload["id"] is None:
                payload["id"] = str(uuid.uuid4())
            if "idempotency_key" in payload and payload["idempotency_key"] is None:
                payload["idempotency_key"] = f"fz-key-{uuid.uuid4()}"
        own = payload.get("id") if isinstance(payload, dict) else None
        if isinstance(own, str) and _is_uuid(own):
            fuzz_item.id = str(uuid.UUID(own))
        else:
            fuzz_item.id = str(id_for_unnamed(stored_as, index))
    priority = None
    if value.items and isinstance(value.items[0].payload, dict):
        priority = value.items[0].payload.get("priority")
    value.queue = (f"notifier.{priority}"
                   if priority in ("critical", "high", "normal", "low") else "notifier.normal")


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


# --- sending --------------------------------------------------------------------------


@dataclass
class FuzzSend:
    sent: list[FuzzMessage] = field(default_factory=list)
    #: Refused by the foreign producer's own JSON encoder: never reached the broker.
    refused_by_producer: Counter[str] = field(default_factory=Counter)


def send(messages: list[FuzzMessage], broker_url: str) -> FuzzSend:
    """Send as a service without notifier would: a plain Celery app, by task name."""
    from celery import Celery

    foreign = Celery("chaos-foreign", broker=broker_url)
    result = FuzzSend()
    try:
        for value in messages:
            try:
                foreign.send_task("notifier.ingest", args=value.args, kwargs=value.kwargs,
                                  queue=value.queue, task_id=value.message_id,
                                  headers=value.headers)
            except Exception as exc:  # the producer's own encoder refused it
                kinds = ",".join(sorted({i.kind for i in value.items})) or "empty"
                result.refused_by_producer[f"{type(exc).__name__}: {kinds}"] += 1
                continue
            result.sent.append(value)
    finally:
        foreign.close()
    return result


# --- accounting -----------------------------------------------------------------------


def names_field(reason: str, name: str) -> bool:
    """Whether one of the reason's problems ("field: problem; …") is about ``name``."""
    for problem in reason.split("; "):
        problem = problem.split("] ", 1)[-1]  # "[3] title: ..." from notify_many
        if problem.startswith((f"{name}:", f"{name}.")):
            return True
    return False


@dataclass
class FuzzTally:
    messages: int = 0
    items: int = 0
    good: int = 0
    bad: int = 0
    lenient: int = 0
    stored: int = 0
    dead_lettered: int = 0
    lost: int = 0
    recorded_twice: int = 0
    good_stored: int = 0
    bad_dead_lettered: int = 0
    #: Bad items stored anyway, by mutation.
    bad_accepted: dict[str, int] = field(default_factory=dict)
    #: Good items dead-lettered (with a bad neighbour in a refused message), by neighbour.
    good_dead_lettered: dict[str, int] = field(default_factory=dict)
    #: Dead letters whose reason does not name the field, by mutation, with an example.
    reason_misses_field: dict[str, int] = field(default_factory=dict)
    reason_examples: dict[str, str] = field(default_factory=dict)
    lenient_outcomes: dict[str, int] = field(default_factory=dict)
    lost_kinds: dict[str, int] = field(default_factory=dict)
    refused_by_producer: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def tally(conn: Any, sent: FuzzSend) -> FuzzTally:
    dead = dict(conn.execute(
        "SELECT dedup_key, reason FROM dead_letters WHERE stage = 'ingest'"
    ).fetchall())
    stored = {str(row[0]) for row in conn.execute("SELECT id FROM notifications")}
    result = FuzzTally(messages=len(sent.sent),
                       refused_by_producer=dict(sent.refused_by_producer))
    counters: dict[str, Counter[str]] = {name: Counter() for name in (
        "bad_accepted", "good_dead_lettered", "reason_misses_field", "lenient_outcomes",
        "lost_kinds")}
    for value in sent.sent:
        whole = dead_letter_key(value, "message")
        culprits = ",".join(sorted({i.kind for i in value.items if i.expect != STORED}))
        for index, fuzz_item in enumerate(value.items):
            result.items += 1
            key = whole if value.message_level else dead_letter_key(value, index)
            reason = dead.get(key) or dead.get(whole)
            is_stored = fuzz_item.id in stored
            if fuzz_item.expect == STORED:
                result.good += 1
            elif fuzz_item.expect == DEAD:
                result.bad += 1
            else:
                result.lenient += 1
            if is_stored and reason is not None:
                result.recorded_twice += 1
            if is_stored:
                result.stored += 1
            elif reason is not None:
                result.dead_lettered += 1
            else:
                result.lost += 1
                counters["lost_kinds"][fuzz_item.kind] += 1
                continue
            if fuzz_item.expect == STORED:
                if is_stored:
                    result.good_stored += 1
                else:
                    counters["good_dead_lettered"][culprits or "none"] += 1
                continue
            if fuzz_item.expect == EITHER:
                counters["lenient_outcomes"][
                    f"{fuzz_item.kind}: {'stored' if is_stored else 'dead-lettered'}"] += 1
            elif is_stored:
                counters["bad_accepted"][fuzz_item.kind] += 1
                continue
            else:
                result.bad_dead_lettered += 1
            if reason is not None and fuzz_item.field and not names_field(
                    reason, fuzz_item.field):
                counters["reason_misses_field"][fuzz_item.kind] += 1
                result.reason_examples.setdefault(fuzz_item.kind, reason[:200])
    for name, counter in counters.items():
        setattr(result, name, dict(counter.most_common()))
    return result


def dead_letter_key(value: FuzzMessage, item: int | str) -> str:
    """The dedup key of an item's (or the whole message's) dead letter."""
    from notifier.pipeline.ingest import dedup_key, message_id_of

    return dedup_key(message_id_of(value.message_id), item)


def expected_ids(messages: list[FuzzMessage]) -> list[str]:
    return [i.id for m in messages for i in m.items if i.expect == STORED and i.id]


def unresolved(conn: Any, messages: list[FuzzMessage]) -> int:
    """Items with neither a stored row nor a dead letter yet (for the drain)."""
    dead = {row[0] for row in conn.execute(
        "SELECT dedup_key FROM dead_letters WHERE stage = 'ingest'")}
    stored = {str(row[0]) for row in conn.execute("SELECT id FROM notifications")}
    missing = 0
    for value in messages:
        whole = dead_letter_key(value, "message")
        for index, fuzz_item in enumerate(value.items):
            key = whole if value.message_level else dead_letter_key(value, index)
            if fuzz_item.id not in stored and key not in dead and whole not in dead:
                missing += 1
    return missing
