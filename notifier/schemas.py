"""What a notification may look like when it crosses the broker.

Producers that never import notifier send plain dicts, so every field is checked
here, at ingest, and a rejection says which field is wrong and why in words a person
can act on ("priority: must be one of critical, high, normal, low (got 'urgent')").
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any, Literal, NotRequired, TypeVar, cast
from urllib.parse import urlsplit

import idna
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
    with_config,
)
from pydantic_core import ErrorDetails
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from notifier.settings import CHANNEL_NAMES, PRIORITIES, get_settings

_T = TypeVar("_T")

#: The message header our producers stamp with the time of ``notify()`` (epoch seconds).
ENQUEUED_AT_HEADER = "notifier_enqueued_at"

Priority = Literal["critical", "high", "normal", "low"]

TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_.\-]{0,63}$")
_EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_encode_json = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode
#: What ``_encode_json`` does for a dict, without building its encoder again at each
#: call as ``JSONEncoder.encode`` does (half the time of encoding small data).
_iterencode = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, json.JSONEncoder().default, json.encoder.encode_basestring, None, ":", ",",
        False, False, False,
    ) if json.encoder.c_make_encoder is not None  # type: ignore[attr-defined]
    else None
)
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATES = re.compile("[\ud800-\udfff]")


def _single_line(value: str) -> str:
    # Ids and addresses end up in headers and log lines: no line breaks there.
    if _CONTROL_CHARS.search(value):
        raise ValueError("must not contain control characters or line breaks")
    return _storable(value)


def _storable(value: str) -> str:
    # Postgres text holds neither NUL nor half a UTF-16 pair; refuse them here, with the
    # field's name, instead of failing the whole batch's COPY.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if not value.isascii() and _SURROGATES.search(value):  # isascii: O(1), most text
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)")
    return value


#: Quoted values in a rejection are cut to this many characters: a reason (and the log
#: line that carries it) never repeats a huge value.
QUOTED_CHARS = 80


def quote(value: Any) -> str:
    """``repr(value)``, cut to :data:`QUOTED_CHARS` characters."""
    text = repr(value) if not isinstance(value, str) or len(value) <= QUOTED_CHARS else (
        repr(value[:QUOTED_CHARS]) + f"… ({len(value)} characters)"
    )
    return text if len(text) <= 2 * QUOTED_CHARS else text[:2 * QUOTED_CHARS] + "…"


def email_problem(value: str) -> str | None:
    """Why ``value`` is not an e-mail address we can send to, or None.

    An internationalised domain (``user@bücher.de``) must be IDNA-encodable; one that is
    not is refused here rather than discovered in the middle of a delivery batch.
    """
    return address_problem("email", value)


def idna_domain(domain: str) -> str:
    """The domain as SMTP carries it (``bücher.de`` -> ``xn--bcher-kva.de``, IDNA 2008 with
    UTS 46 mapping): ingest refuses what this refuses, so the e-mail channel never
    meets a domain it cannot send to. ``idna.IDNAError`` for a domain IDNA refuses."""
    return domain if domain.isascii() else idna.encode(domain, uts46=True).decode("ascii")


def url_problem(value: str) -> str | None:
    """Why ``value`` is not a URL a channel can connect to, or None (length, scheme,
    host, port: ``http://example.com:99999/`` and ``[::1`` are refused here)."""
    return address_problem("webhook", value)


def _email(value: str) -> str:
    problem = email_problem(value)
    if problem:
        raise ValueError(problem)
    return value


Identifier = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255),
    AfterValidator(_single_line),
]
Email = Annotated[str, StringConstraints(strip_whitespace=True), AfterValidator(_email)]
_PHONE = re.compile(r"^\+?[0-9 ()\-]{4,31}$")
#: Channels whose address is a URL a producer chooses (checked by :func:`url_problem`).
URL_CHANNELS = frozenset({"webhook", "slack", "apprise"})


class AddressError(ValueError):
    """A problem with one entry of ``addresses``: reported as ``addresses.<channel>``."""

    def __init__(self, channel: str, problem: str):
        self.channel, self.problem = channel, problem
        super().__init__(f"{channel}: {problem}")


def address_problem(channel: str, value: str) -> str | None:
    """Why ``value`` cannot be the recipient's address on ``channel``, or None."""
    settings = get_settings()
    limit = settings.max_email_chars if channel == "email" else settings.max_url_chars
    if len(value) > limit:
        return f"is {len(value)} characters, more than the limit of {limit}"
    return _format_problem(channel, value)


@lru_cache(maxsize=1024)
def _format_problem(channel: str, value: str) -> str | None:
    """Cached (values are bounded by now): a recipient's addresses come again with each
    of its notifications."""
    if channel == "email":
        if not _EMAIL_PATTERN.match(value):
            return f"not a valid email address ({quote(value)})"
        domain = value.rpartition("@")[2]
        try:
            idna_domain(domain)
        except (idna.IDNAError, UnicodeError):
            return f"the domain cannot be IDNA-encoded ({quote(domain)})"
        return None
    if channel in URL_CHANNELS:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises for a port out of range or not a number
        except ValueError as exc:
            return f"not a valid URL ({exc}): {quote(value)}"
        if not parts.scheme:
            return f"not a valid URL (no scheme): {quote(value)}"
        if not parts.hostname:
            return f"not a valid URL (no host): {quote(value)}"
        return None
    if channel == "sms" and not _PHONE.match(value):
        return f"not a phone number ({quote(value)})"
    return None


class RecipientIn(BaseModel):
    """A recipient given inline; it is upserted so later notifications can name its id."""

    model_config = ConfigDict(extra="forbid")

    id: Identifier
    name: Annotated[
        str, StringConstraints(max_length=255), AfterValidator(_storable)
    ] | None = None
    email: Email | None = None
    phone: Annotated[
        str, StringConstraints(max_length=32, pattern=r"^\+?[0-9 ()\-]{4,31}$")
    ] | None = None
    timezone: Annotated[str, StringConstraints(max_length=64)] | None = None
    locale: Annotated[
        str, StringConstraints(max_length=16), AfterValidator(_single_line)
    ] | None = None
    addresses: dict[str, Annotated[str, AfterValidator(_single_line)]] = {}

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str | None) -> str | None:
        if value is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {quote(value)}") from None
        return value

    @field_validator("addresses")
    @classmethod
    def _known_channels(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            return value
        limit = get_settings().max_addresses
        if len(value) > limit:
            raise ValueError(f"has {len(value)} entries, more than the limit of {limit}")
        check_channel_names(list(value))
        for channel, address in value.items():
            problem = address_problem(channel, address)
            if problem:
                raise AddressError(channel, problem)
        return value


def known_channel_list(value: list[str] | None) -> list[str] | None:
    """A list of channels (None: left out) without repeats; refuses empty and unknown."""
    if value is None:
        return None
    if not value:
        raise ValueError("must name at least one channel, or be left out")
    check_channel_names(value)
    return list(dict.fromkeys(value))


def check_channel_names(names: list[str]) -> None:
    unknown = [name for name in names if name not in CHANNEL_NAMES]
    if unknown:
        raise ValueError(
            f"unknown channel {quote(unknown[0])}; known: {', '.join(sorted(CHANNEL_NAMES))}"
        )


def _type_is_a_slug(value: str) -> str:
    if not TYPE_PATTERN.match(value):
        raise ValueError(
            "must start with a lowercase letter and hold only lowercase letters, digits,"
            f" '_', '.' or '-', at most 64 characters (got {quote(value)})"
        )
    return value


def _send_at_has_zone(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("needs a time zone (e.g. 2026-01-31T09:00:00+00:00)")
    return value


# Each field's type and checks, shared by the model (the client's) and the plain-data
# form (ingest's): both refuse the same values with the same words.
TypeSlug = Annotated[str, AfterValidator(_type_is_a_slug)]
Channels = Annotated[
    Annotated[list[str], Field(max_length=32)] | None, AfterValidator(known_channel_list)
]
Title = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255),
    AfterValidator(_storable),
]
Body = Annotated[str, StringConstraints(max_length=65536), AfterValidator(_storable)]
SendAt = Annotated[datetime | None, AfterValidator(_send_at_has_zone)]


def callback_url_problem(value: str) -> str | None:
    """Why ``value`` cannot be a notification's ``callback_url``, or None: an http(s)
    URL with a host and a valid port, at most ``max_url_chars``, one line, and no user
    or password in it (they would be stored and logged with every event; a receiver
    checks the signature instead). Where it may point (no private address) is the
    egress guard's to say when it is POSTed (``notifier.pipeline.callbacks``)."""
    limit = get_settings().max_url_chars
    if len(value) > limit:
        return f"is {len(value)} characters, more than the limit of {limit}"
    if _CONTROL_CHARS.search(value) or " " in value:
        return "must be one URL, without spaces, control characters or line breaks"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError as exc:
        return f"not a valid URL ({exc}): {quote(value)}"
    if parts.scheme not in ("http", "https"):
        return f"must be an http or https URL (got {quote(value)})"
    if not parts.hostname:
        return f"not a valid URL (no host): {quote(value)}"
    if parts.username is not None or parts.password is not None:
        return "must not hold a user name or password (callbacks are signed instead)"
    return None


def _callback_url(value: str | None) -> str | None:
    if value is not None:
        problem = callback_url_problem(value)
        if problem:
            raise ValueError(problem)
    return value


#: A notification's ``callback_url``: where its deliveries' terminal statuses go.
CallbackUrl = Annotated[
    Annotated[str, StringConstraints(strip_whitespace=True)] | None,
    AfterValidator(_callback_url),
]


class NotificationIn(BaseModel):
    """One notification as a producer sends it (the public contract's fields)."""

    model_config = ConfigDict(extra="forbid")

    id: uuid.UUID | None = None
    recipient: Identifier | RecipientIn
    type: TypeSlug
    priority: Priority = "normal"
    channels: Channels = None
    title: Title
    body: Body = ""
    data: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: Identifier | None = None
    send_at: SendAt = None
    callback_url: CallbackUrl = None

    #: ``data`` as JSON text, encoded once: checked here and written as is by ingest.
    _data_json: str = PrivateAttr(default="{}")

    @model_validator(mode="after")
    def _data_small_enough(self) -> NotificationIn:
        encoded = encoded_data(self.data)
        # Straight into the private attributes' dict: pydantic's __setattr__ and
        # __getattr__ for a private attribute cost more than the rest of the row.
        self.__pydantic_private__["_data_json"] = encoded  # type: ignore[index]
        return self

    @property
    def data_json(self) -> str:
        return self.__pydantic_private__["_data_json"]  # type: ignore[index,no-any-return]

    @property
    def recipient_id(self) -> str:
        return self.recipient if isinstance(self.recipient, str) else self.recipient.id


@with_config(ConfigDict(extra="forbid"))
class _NotificationFields(TypedDict):
    """:class:`NotificationIn`'s fields and defaults, validated into a plain dict: ingest
    checks a whole batch without building a model (and its private attributes) per
    notification. A test holds the two to the same fields and defaults."""

    id: NotRequired[Annotated[uuid.UUID | None, Field(default=None)]]
    recipient: Identifier | RecipientIn
    type: TypeSlug
    priority: NotRequired[Annotated[Priority, Field(default="normal")]]
    channels: NotRequired[Annotated[Channels, Field(default=None)]]
    title: Title
    body: NotRequired[Annotated[Body, Field(default="")]]
    data: NotRequired[Annotated[dict[str, Any], Field(default_factory=dict)]]
    idempotency_key: NotRequired[Annotated[Identifier | None, Field(default=None)]]
    send_at: NotRequired[Annotated[SendAt, Field(default=None)]]
    callback_url: NotRequired[Annotated[CallbackUrl, Field(default=None)]]


class Notification(TypedDict):
    """A notification that passed the checks, as plain data (:func:`validate_notification`):
    every field of :class:`NotificationIn` with its default filled in, plus the recipient's
    id and ``data`` as the JSON text that was checked and is written as is."""

    id: uuid.UUID | None
    recipient: str | RecipientIn
    type: str
    priority: Priority
    channels: list[str] | None
    title: str
    body: str
    data: dict[str, Any]
    idempotency_key: str | None
    send_at: datetime | None
    callback_url: str | None
    recipient_id: str
    data_json: str


def _finish(fields: dict[str, Any]) -> dict[str, Any]:
    # The whole-notification check, as NotificationIn's model validator makes it; its
    # error has no field in its location, like the model's ("Value error, data: ...").
    fields["data_json"] = encoded_data(fields["data"])
    recipient = fields["recipient"]
    fields["recipient_id"] = recipient if isinstance(recipient, str) else recipient.id
    return fields


_Checked = Annotated[_NotificationFields, AfterValidator(_finish)]
_NOTIFICATION_DATA: TypeAdapter[Any] = TypeAdapter(_Checked)

_LooseIdentifier = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)
]


@with_config(ConfigDict(extra="forbid"))
class _LooseFields(TypedDict):
    """:class:`_NotificationFields` with only the checks pydantic makes by itself (types,
    lengths, literals, stripping): :func:`_check_items` makes the rest over a whole
    message at once, instead of calling Python for each field of each item."""

    id: NotRequired[Annotated[uuid.UUID | None, Field(default=None)]]
    recipient: _LooseIdentifier | RecipientIn
    type: str
    priority: NotRequired[Annotated[Priority, Field(default="normal")]]
    channels: NotRequired[Annotated[
        Annotated[list[str], Field(max_length=32)] | None, Field(default=None)]]
    title: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]
    body: NotRequired[Annotated[
        Annotated[str, StringConstraints(max_length=65536)], Field(default="")]]
    data: NotRequired[Annotated[dict[str, Any], Field(default_factory=dict)]]
    idempotency_key: NotRequired[Annotated[_LooseIdentifier | None, Field(default=None)]]
    send_at: NotRequired[Annotated[datetime | None, Field(default=None)]]
    callback_url: NotRequired[Annotated[
        Annotated[str, StringConstraints(strip_whitespace=True)] | None, Field(default=None)]]


_LOOSE_LIST: TypeAdapter[Any] = TypeAdapter(list[_LooseFields])


def _check_items(items: list[dict[str, Any]]) -> None:
    """The checks :class:`_NotificationFields` makes in Python, and its ``_finish``, over
    a message's items (validated by ``_LOOSE_LIST``) at once. ValueError at the first
    problem, in any words: each item is then checked alone, for its own reason."""
    lines: list[str] = []  # single-line fields: recipient ids, idempotency keys
    texts: list[str] = []  # storable text: titles, bodies
    types: set[str] = set()
    for item in items:
        types.add(item["type"])
        recipient = item["recipient"]
        if isinstance(recipient, str):
            lines.append(recipient)
        if item["idempotency_key"] is not None:
            lines.append(item["idempotency_key"])
        texts.append(item["title"])
        texts.append(item["body"])
        if item["channels"] is not None:
            item["channels"] = known_channel_list(item["channels"])
        _send_at_has_zone(item["send_at"])
        _callback_url(item["callback_url"])
        item["data_json"] = encoded_data(item["data"])
        item["recipient_id"] = recipient if isinstance(recipient, str) else recipient.id
    for type_ in types:
        _type_is_a_slug(type_)
    _single_line("".join(lines))
    _storable("".join(texts))


def validate_notifications(raws: list[Any]) -> list[Notification] | None:
    """Every item of a message checked in one call (the common case: all are good), or
    None if any is not an object, is refused or fails: then :func:`validate_notification`
    checks each alone, so each gets its own reason and the good ones still pass.

    The one call makes the checks pydantic can by itself, then the rest over all the
    items at once (:func:`_check_items`): the same checks as each alone, with far fewer
    calls into Python.
    """
    if not all(isinstance(raw, dict) for raw in raws):
        return None
    try:
        items = _LOOSE_LIST.validate_python(raws)
        _check_items(items)
    except Exception:  # whatever it was, each item alone tells (and costs only itself)
        return None
    return cast(list[Notification], items)


def encoded_data(data: dict[str, Any]) -> str:
    """``data`` as compact JSON text, or ValueError("data: ...") if too deep, not JSON
    (NaN), holding NUL or a lone surrogate, or bigger than ``max_data_bytes``."""
    for value in data.values():  # most data holds no container: no need to walk it
        if isinstance(value, _CONTAINERS):
            if _nesting(data) > MAX_DATA_DEPTH:
                raise ValueError(f"data: nested deeper than {MAX_DATA_DEPTH} levels")
            break
    try:
        encoded = "".join(_iterencode(data, 0)) if _iterencode else _encode_json(data)
    except ValueError:
        raise ValueError("data: NaN and Infinity are not JSON numbers") from None
    if "\\u0000" in encoded:
        raise ValueError("data: must not contain NUL characters (Postgres cannot hold them)")
    limit = get_settings().max_data_bytes
    try:
        size = len(encoded) if encoded.isascii() else len(encoded.encode())
    except UnicodeEncodeError:
        raise ValueError("data: must be valid Unicode text (it holds a lone surrogate)") from None
    if size > limit:
        raise ValueError(f"data: is {size} bytes of JSON, more than the limit of {limit}")
    return encoded


#: Deeper data is refused: nothing real nests this far, and a few hundred levels break
#: pickling for the worker pool and Postgres' jsonb.
MAX_DATA_DEPTH = 64


_CONTAINERS = (dict, list)


def _nesting(value: Any) -> int:
    """How deep containers nest in ``value`` (iterative: any depth is safe to measure)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DATA_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


class NotificationError(ValueError):
    """A notification failed validation; ``str()`` is one line naming each bad field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_notification(raw: Any) -> NotificationIn:
    """Validate one notification as received, or raise :class:`NotificationError`."""
    return _checked(NotificationIn.model_validate, raw)


def validate_notification(raw: Any) -> Notification:
    """:func:`parse_notification`'s checks and rejections, into plain data (no model)."""
    return cast(Notification, _checked(_NOTIFICATION_DATA.validate_python, raw))


def _checked(validate: Callable[[Any], _T], raw: Any) -> _T:
    if not isinstance(raw, dict):
        raise NotificationError(
            [f"notification: expected a JSON object, got {type(raw).__name__}"]
        )
    try:
        return validate(raw)
    except ValidationError as exc:
        errors = _drop_other_recipient_branch(exc.errors(), raw.get("recipient"))
        raise NotificationError([_describe(error) for error in errors]) from None


def _drop_other_recipient_branch(
    errors: list[ErrorDetails], recipient: Any
) -> list[ErrorDetails]:
    """Keep only the errors of the recipient form the producer meant (id or object)."""
    wanted = "RecipientIn" if isinstance(recipient, dict) else "str"
    kept: list[ErrorDetails] = []
    for error in errors:
        loc = error["loc"]
        if loc[:1] == ("recipient",) and len(loc) > 1:
            branch = "RecipientIn" if loc[1] == "RecipientIn" else "str"
            if branch != wanted:
                continue
            if not isinstance(recipient, (str, dict)):
                error = {**error, "type": "recipient_form", "loc": ("recipient",)}
        kept.append(error)
    return list({_describe(e): e for e in kept}.values())


def _describe(error: ErrorDetails) -> str:
    """Turn one pydantic error into "field: problem", quoting the offending value cut
    short and, for a value too long, its size and the limit."""
    location = ".".join(
        _location_part(part) for part in error["loc"] if not _is_union_branch(part)
    ) or "notification"
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return f"{location}: is required"
    if kind == "extra_forbidden":
        return f"{location}: is not a known field"
    if kind == "literal_error" and location == "priority":
        return f"priority: must be one of {', '.join(PRIORITIES)} (got {quote(error['input'])})"
    if location == "notification" and error["msg"].startswith("Value error, data: "):
        return error["msg"].removeprefix("Value error, ")  # a whole-model check of data
    if kind == "recipient_form":
        return "recipient: expected a recipient id (string) or an object with an 'id'"
    if isinstance(ctx.get("error"), AddressError):
        return f"{location}.{ctx['error'].channel}: {ctx['error'].problem}"
    if kind == "string_too_long":
        return (f"{location}: is {len(error['input'])} characters, more than the limit of"
                f" {ctx.get('max_length')}")
    if kind == "too_long":
        size = ctx.get("actual_length") or len(error["input"])
        return f"{location}: has {size} entries, more than the limit of {ctx.get('max_length')}"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "dict_type":
        message = "must be a JSON object"
    if kind in {"uuid_parsing", "uuid_type"}:
        message = f"not a valid UUID (got {quote(error['input'])})"
    return f"{location}: {message}"


def _location_part(part: str | int) -> str:
    # A key the producer chose (an unknown field, a data key) may be huge.
    text = str(part)
    return text if len(text) <= QUOTED_CHARS else text[:QUOTED_CHARS] + "…"


def _is_union_branch(part: str | int) -> bool:
    # pydantic names the union member it tried ("str", "RecipientIn", "constrained-str").
    return isinstance(part, str) and (
        part in {"str", "RecipientIn"} or part.startswith(("constrained-", "function-"))
    )


def to_message(notification: NotificationIn) -> dict[str, Any]:
    """The JSON form sent to the broker, without fields left at their defaults."""
    return notification.model_dump(mode="json", exclude_none=True, exclude_defaults=True) | {
        "id": str(notification.id),
        "title": notification.title,
    }


_DATETIME: TypeAdapter[datetime] = TypeAdapter(datetime)


def plain_message(notification: Notification, id_: str) -> dict[str, Any]:
    """:func:`to_message`'s form (the same keys, order and values) of a notification
    validated into plain data (:func:`validate_notifications`), with its id as text:
    a producer sending a list builds no model and walks no defaults per item. A test
    holds the two to the same message."""
    recipient = notification["recipient"]
    message: dict[str, Any] = {
        "id": id_,
        "recipient": recipient if isinstance(recipient, str) else recipient.model_dump(
            mode="json", exclude_none=True, exclude_defaults=True),
        "type": notification["type"],
    }
    if notification["priority"] != "normal":
        message["priority"] = notification["priority"]
    if notification["channels"] is not None:
        message["channels"] = notification["channels"]
    message["title"] = notification["title"]
    if notification["body"]:
        message["body"] = notification["body"]
    if notification["data"]:
        message["data"] = notification["data"]
    if notification["idempotency_key"] is not None:
        message["idempotency_key"] = notification["idempotency_key"]
    if notification["send_at"] is not None:
        message["send_at"] = _DATETIME.dump_python(notification["send_at"], mode="json")
    if notification["callback_url"] is not None:
        message["callback_url"] = notification["callback_url"]
    return message
