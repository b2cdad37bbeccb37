"""``/v1/suppressions``: the suppression list, as ``notifier suppressions`` shows and
edits it (admin scope): addresses a channel no longer sends to
(``notifier.pipeline.suppressions``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from notifier.api import metrics
from notifier.api.body import read_json
from notifier.api.errors import ApiError, responses
from notifier.api.keys import require
from notifier.pipeline.suppressions import (
    MAX_ADDRESS,
    SOURCES,
    SuppressionFilter,
    entry_view,
    find_suppressions,
    suppress,
    unsuppress,
)
from notifier.settings import CHANNEL_NAMES
from notifier.storage.api_keys import KeyInfo, Scope
from notifier.storage.db import session_scope

router = APIRouter(prefix="/v1/suppressions", tags=["suppressions"])

#: No control characters (Postgres text holds no NUL; an address has no line break).
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
Channel = Annotated[str, Query(max_length=32, pattern=r"^[a-z_]+$")]
#: A suppression's body is three short fields.
MAX_BODY_BYTES = 4096
Address = Annotated[str, Query(min_length=1, max_length=MAX_ADDRESS, pattern=PRINTABLE)]


class SuppressionView(BaseModel):
    channel: str
    address: str
    reason: str
    source: str
    delivery_id: str | None
    created_at: datetime


class SuppressionAdded(BaseModel):
    channel: str
    #: False: the address was suppressed already (its first reason stays).
    added: bool


class SuppressionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channel: str = Field(max_length=32, pattern=r"^[a-z_]+$")
    address: str = Field(min_length=1, max_length=MAX_ADDRESS, pattern=PRINTABLE)
    reason: str = Field("added by an operator", min_length=1, max_length=500,
                        pattern=PRINTABLE)


@router.get(
    "", response_model=list[SuppressionView],
    summary="The newest suppressions, filtered as `notifier suppressions list` filters",
    responses=responses(401, 403, 422, 429, 503),
)
def list_suppressions(
    key: Annotated[KeyInfo, Depends(require(Scope.ADMIN))],
    channel: Annotated[str | None, Query(max_length=32, pattern=r"^[a-z_]+$")] = None,
    address: Annotated[str | None, Query(max_length=MAX_ADDRESS, pattern=PRINTABLE,
                                         description="A part of the address")] = None,
    source: Literal["bounce", "complaint", "soft-bounces", "manual"] | None = None,
    since: Annotated[datetime | None, Query(description="Added at or after")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[dict[str, Any]]:
    assert source is None or source in SOURCES
    where = SuppressionFilter(channel, address, source,
                              since.replace(tzinfo=UTC) if since and not since.tzinfo
                              else since)
    with session_scope() as session:
        return [entry_view(entry) for entry in find_suppressions(session, where, limit)]


@router.post(
    "", status_code=201, response_model=SuppressionAdded,
    summary="Suppress an address on a channel (200 if it already was)",
    responses={200: {"model": SuppressionAdded, "description": "Already suppressed"},
               **responses(400, 401, 403, 413, 422, 429, 503)},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/SuppressionIn"}}}}},
)
async def add_suppression(
    request: Request, key: Annotated[KeyInfo, Depends(require(Scope.ADMIN))],
) -> JSONResponse:
    try:
        body = SuppressionIn.model_validate(await read_json(request, MAX_BODY_BYTES))
    except ValidationError as exc:
        raise ApiError(422, "invalid suppression", [
            {"field": ".".join(str(p) for p in error["loc"]) or "body",
             "problem": error["msg"][:300]} for error in exc.errors()
        ]) from None
    _known(body.channel)
    added = await run_in_threadpool(_add, body)
    if added:
        metrics.SUPPRESSIONS.labels(body.channel, "manual").inc()
    return JSONResponse({"channel": body.channel, "added": added},
                        status_code=201 if added else 200)


def _add(body: SuppressionIn) -> bool:
    with session_scope() as session:
        return suppress(session, body.channel, body.address, body.reason, "manual")


@router.delete(
    "", status_code=204, summary="Take an address off a channel's suppression list",
    responses=responses(401, 403, 404, 422, 429, 503),
)
def remove_suppression(
    channel: Channel, address: Address,
    key: Annotated[KeyInfo, Depends(require(Scope.ADMIN))],
) -> Response:
    _known(channel)
    with session_scope() as session:
        removed = unsuppress(session, channel, address)
    if not removed:
        raise ApiError(404, f"{address!r} is not suppressed on {channel}")
    metrics.SUPPRESSIONS.labels(channel, "removed").inc()
    return Response(status_code=204)


def _known(channel: str) -> None:
    if channel not in CHANNEL_NAMES:
        raise ApiError(422, f"no channel {channel!r}",
                       [{"field": "channel", "problem": "not a channel name"}])
