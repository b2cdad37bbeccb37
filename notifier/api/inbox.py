"""``/v1/recipients/{id}/inbox``: a recipient's in-app inbox over HTTP, for browsers.

Pages (newest first, cursor paging), counts per state, and marking messages seen, read
or archived by ids or all: the domain functions of ``notifier.pipeline.inbox`` (what
``notifier inbox`` and ``notifier.records`` call), one session per request in the thread
pool. Every route takes :data:`~notifier.api.recipient_access.InboxAccessDep`: a read key
for any recipient, or a recipient token for this one. The recipient is part of every
query, so ids of another recipient's messages never move.

Items are :meth:`InboxItem.as_json`, byte for byte what the live stream sends, so a page
and the stream's events are one shape; the models below describe it in OpenAPI. States
only move forward (``docs/inbox.md``): there is no way back from archived.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from notifier.api.body import read_json
from notifier.api.errors import ApiError, responses
from notifier.api.recipient_access import InboxAccessDep
from notifier.pipeline.inbox import (
    CURSOR_LENGTH,
    MAX_IDS,
    MAX_PAGE_SIZE,
    State,
    count_states,
    decode_cursor,
    list_page,
    mark,
)
from notifier.storage.db import session_scope

router = APIRouter(prefix="/v1/recipients", tags=["inbox"])

#: Largest mark body: 1,000 quoted UUIDs are 39 KiB.
MAX_BODY_BYTES = 64 * 1024

_ERRORS = (401, 403, 422, 429, 503)


class Filter(StrEnum):
    """Which messages a page holds."""

    UNREAD = "unread"  # not read yet: unread and seen
    UNARCHIVED = "unarchived"  # every state but archived
    ALL = "all"  # archived ones too


class InboxMessage(BaseModel):
    """One message, as :meth:`InboxItem.as_json` writes it (and the stream sends it)."""

    id: uuid.UUID
    #: Its position: pass as ``until`` to mark all up to it; the stream's event id.
    cursor: str
    state: State
    type: str
    priority: str
    title: str
    body: str
    data: dict[str, Any]
    notification_id: uuid.UUID | None
    digest_id: uuid.UUID | None
    created_at: datetime
    seen_at: datetime | None
    read_at: datetime | None
    archived_at: datetime | None


class InboxCounts(BaseModel):
    """How many of the recipient's messages are in each state."""

    unread: int
    seen: int
    read: int
    archived: int


class InboxPage(BaseModel):
    items: list[InboxMessage]
    #: Pass back as ``cursor`` for the next page; null on the last one.
    next_cursor: str | None
    counts: InboxCounts


class MarkRequest(BaseModel):
    """Which messages to move: ``{"ids": [...]}`` or ``{"all": true}``, exactly one."""

    model_config = ConfigDict(extra="forbid")

    ids: list[uuid.UUID] | None = Field(None, max_length=MAX_IDS)
    all: bool = Field(False, strict=True)
    #: With ``all``: only messages at or before this cursor (the newest one shown), so
    #: what arrived since the page was drawn stays as it is.
    until: str | None = Field(None, min_length=CURSOR_LENGTH, max_length=CURSOR_LENGTH)


class Marked(BaseModel):
    #: How many messages moved (those already there or beyond do not count).
    changed: int
    counts: InboxCounts


@router.get(
    "/{recipient_id}/inbox", response_model=InboxPage,
    summary="A page of the recipient's inbox, newest first, with the counts per state",
    responses=responses(*_ERRORS),
)
def get_inbox(
    access: InboxAccessDep,
    filter: Annotated[Filter, Query(
        description="unread: not read yet (unread and seen); unarchived: every state but"
                    " archived; all: archived ones too")] = Filter.UNARCHIVED,
    cursor: Annotated[str | None, Query(
        min_length=CURSOR_LENGTH, max_length=CURSOR_LENGTH,
        description="A previous page's next_cursor")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
) -> JSONResponse:
    recipient = access.recipient_id
    try:
        with session_scope() as session:
            page = list_page(session, recipient, cursor=cursor, limit=limit,
                             unread_only=filter is Filter.UNREAD,
                             include_archived=filter is Filter.ALL)
            counts = count_states(session, recipient)
    except ValueError as exc:
        raise invalid(exc) from None
    return JSONResponse({"items": [item.as_json() for item in page.items],
                         "next_cursor": page.next_cursor, "counts": _counts(counts)})


@router.get(
    "/{recipient_id}/inbox/counts", response_model=InboxCounts,
    summary="How many of the recipient's messages are unread, seen, read and archived",
    responses=responses(*_ERRORS),
)
def get_counts(access: InboxAccessDep) -> JSONResponse:
    try:
        with session_scope() as session:
            counts = count_states(session, access.recipient_id)
    except ValueError as exc:
        raise invalid(exc) from None
    return JSONResponse(_counts(counts))


def _mark_route(path: str, state: State) -> None:
    async def mark_messages(access: InboxAccessDep, request: Request) -> JSONResponse:
        raw = await read_json(request, MAX_BODY_BYTES,
                              expected='{"ids": [...]} or {"all": true}')
        ids, until = _checked(raw)
        return JSONResponse(await run_in_threadpool(
            _mark, access.recipient_id, state, ids, until))

    mark_messages.__name__ = f"mark_{state.value}"
    router.add_api_route(
        f"/{{recipient_id}}/inbox/{path}", mark_messages, methods=["POST"],
        response_model=Marked, openapi_extra=_mark_body_schema(),
        summary=f"Mark messages {state.value}, by ids or all (only forward; another"
                " recipient's ids move nothing)",
        responses=responses(400, 413, *_ERRORS),
    )


def _mark_body_schema() -> dict[str, Any]:
    """The two bodies :class:`MarkRequest` takes, as two schemas (exactly one applies)."""
    ids = {"type": "array", "maxItems": MAX_IDS, "items": {"type": "string", "format": "uuid"}}
    until = {"type": "string", "minLength": CURSOR_LENGTH, "maxLength": CURSOR_LENGTH,
             "description": "Only messages at or before this cursor (the newest one shown)"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "oneOf": [
            {"type": "object", "additionalProperties": False, "required": ["ids"],
             "properties": {"ids": ids}},
            {"type": "object", "additionalProperties": False, "required": ["all"],
             "properties": {"all": {"const": True}, "until": until}},
        ]}}}}}


def _checked(raw: Any) -> tuple[list[uuid.UUID] | None, str | None]:
    """The ids (None: all) and ``until`` of a mark body; 422 naming the field otherwise."""
    if not isinstance(raw, dict):
        raise _problem("body", 'must be a JSON object: {"ids": [...]} or {"all": true}')
    try:
        body = MarkRequest.model_validate(raw)
    except ValidationError as exc:
        raise ApiError(422, "invalid request", [
            {"field": ".".join(str(part) for part in error["loc"]) or "body",
             "problem": str(error["msg"])[:300]}
            for error in exc.errors()]) from None
    if body.ids is not None and body.all:
        raise _problem("ids", 'give "ids" or "all": true, not both')
    if body.ids is None and not body.all:
        raise _problem("body", 'give "ids" (a list of message ids) or "all": true')
    if body.until is not None:
        if not body.all:
            raise _problem("until", 'only with "all": true')
        try:
            decode_cursor(body.until)
        except ValueError:
            raise _problem("until", "not a cursor this inbox gave out") from None
    return body.ids, body.until


def _mark(recipient: str, state: State, ids: list[uuid.UUID] | None,
          until: str | None) -> dict[str, Any]:
    """Mark, then count in the same transaction: the counts include the change."""
    try:
        with session_scope() as session:
            changed = mark(session, recipient, state, ids, until=until)
            counts = count_states(session, recipient)
    except ValueError as exc:
        raise invalid(exc) from None
    return {"changed": changed, "counts": _counts(counts)}


for _path, _state in (("seen", State.SEEN), ("read", State.READ),
                      ("archive", State.ARCHIVED)):
    _mark_route(_path, _state)


def _counts(counts: dict[State, int]) -> dict[str, int]:
    return {state.value: count for state, count in counts.items()}


def invalid(exc: ValueError) -> ApiError:
    """422 from a domain ValueError, whose message is ``field: problem``."""
    field, _, problem = str(exc).partition(": ")
    return _problem(field, problem or field)


def _problem(field: str, problem: str) -> ApiError:
    return ApiError(422, "invalid request", [{"field": field, "problem": problem}])
