"""``GET /v1/dead-letters``: what failed for good, with the CLI's filters (admin scope).

The same query (``notifier.pipeline.dead_letters.find_dead_letters``) and the same
masked view as ``notifier dead-letters list --json``: secrets in reasons and payloads
are hidden, addresses shown as ``recipients show`` shows them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from notifier.api.errors import responses
from notifier.api.keys import require
from notifier.pipeline.dead_letters import DeadLetterFilter, dead_letter_view, find_dead_letters
from notifier.storage.api_keys import KeyInfo, Scope
from notifier.storage.db import session_scope

router = APIRouter(prefix="/v1/dead-letters", tags=["dead letters"])

#: No control characters (Postgres text holds no NUL; no filter needs a line break).
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"


class DeadLetterView(BaseModel):
    id: int
    stage: str
    reason: str
    error_class: str | None
    type: str | None
    channel: str | None
    notification_id: uuid.UUID | None
    delivery_id: uuid.UUID | None
    attempts: int
    created_at: datetime
    replayed_at: datetime | None
    #: The original message (ingest) or the delivery's content, secrets masked.
    payload: Any


@router.get(
    "", response_model=list[DeadLetterView],
    summary="The newest dead letters, filtered as `notifier dead-letters list` filters",
    responses=responses(401, 403, 422, 429, 503),
)
def list_dead_letters(
    key: Annotated[KeyInfo, Depends(require(Scope.ADMIN))],
    stage: Literal["ingest", "aggregate", "deliver"] | None = None,
    type: Annotated[str | None, Query(max_length=64, pattern=PRINTABLE,
                                      description="Notification type")] = None,
    channel: Annotated[str | None, Query(max_length=32, pattern=PRINTABLE)] = None,
    since: Annotated[datetime | None, Query(description="Created at or after (UTC if no"
                                                        " zone)")] = None,
    until: Annotated[datetime | None, Query(description="Created before")] = None,
    id: Annotated[list[Annotated[int, Query(ge=1, le=2**63 - 1)]], Query(
        max_length=1000, description="A dead letter id; repeat")] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[dict[str, Any]]:
    where = DeadLetterFilter(stage=stage, type=type, channel=channel, since=_utc(since),
                             until=_utc(until), ids=tuple(id))
    with session_scope() as session:
        return [dead_letter_view(row) for row in find_dead_letters(session, where, limit)]


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment and moment.tzinfo is None else moment
