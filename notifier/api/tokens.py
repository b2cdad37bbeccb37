"""``POST /v1/recipients/{id}/tokens``: a backend mints a browser's token for one recipient.

The backend holds an API key with the ``read`` scope (the scope that reads any inbox);
the browser gets a short-lived recipient token (``notifier.pipeline.recipient_tokens``)
that reads this recipient's inbox alone. A recipient token never mints another: it is
refused here with 401 whatever it is for, so a leaked token cannot outlive its expiry.
Without ``NOTIFIER_API_TOKEN_SECRET`` nothing can be minted: 503 naming the variable.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel

from notifier.api.body import read_json
from notifier.api.errors import ApiError, responses
from notifier.api.inbox import invalid
from notifier.api.keys import bearer, require
from notifier.api.preferences import RecipientId
from notifier.pipeline.recipient_tokens import VERSION, Minted, issue
from notifier.settings import ConfigError
from notifier.storage.api_keys import KeyInfo, Scope

router = APIRouter(prefix="/v1/recipients", tags=["inbox"])

#: A token request is ``{"ttl": seconds}`` at most.
MAX_BODY_BYTES = 1024

_read_key = require(Scope.READ)


class Token(BaseModel):
    """A recipient token: give it to the browser, as ``Authorization: Bearer`` or
    ``?token=`` on this recipient's inbox routes, until ``expires_at``."""

    token: str
    recipient_id: str
    expires_at: datetime


async def minting_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> KeyInfo:
    """A read key; a recipient token is named as what it is, not as an unknown key."""
    if credentials is not None and credentials.credentials.strip().startswith(f"{VERSION}."):
        raise ApiError(401, "a recipient token cannot mint tokens: use an API key with the"
                            " read scope", headers={"WWW-Authenticate": "Bearer"})
    return await _read_key(credentials)


def _body_schema() -> dict[str, Any]:
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": False,
        "properties": {"ttl": {
            "type": "number", "exclusiveMinimum": 0,
            "description": "Seconds the token is valid: NOTIFIER_API_TOKEN_TTL when left"
                           " out, at most NOTIFIER_API_TOKEN_MAX_TTL"}},
    }}}}}


@router.post(
    "/{recipient_id}/tokens", response_model=Token, openapi_extra=_body_schema(),
    summary="Mint a short-lived token that reads this recipient's inbox (for a browser)",
    responses=responses(400, 401, 403, 413, 422, 429, 503),
)
async def mint_token(
    recipient_id: RecipientId, request: Request,
    key: Annotated[KeyInfo, Depends(minting_key)],
) -> JSONResponse:
    raw = await read_json(request, MAX_BODY_BYTES, optional=True)
    ttl = _ttl(raw)
    try:
        minted: Minted = issue(recipient_id, ttl)  # an HMAC: nothing to wait for
    except ConfigError as exc:
        raise ApiError(503, str(exc)) from None
    except ValueError as exc:
        raise invalid(exc) from None
    expires_at = datetime.fromtimestamp(minted.expires, UTC).isoformat()
    return JSONResponse({"token": minted.token, "recipient_id": recipient_id,
                         "expires_at": expires_at}, headers={"Cache-Control": "no-store"})


def _ttl(raw: Any) -> Any:
    """The ``ttl`` asked for (None: the default); ``issue`` checks its type and bounds."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ApiError(422, "invalid request", [{"field": "body", "problem":
                                                 'must be a JSON object: {"ttl": seconds}'}])
    unknown = sorted(set(raw) - {"ttl"})
    if unknown:
        raise ApiError(422, "invalid request", [{"field": str(name)[:64],
                                                 "problem": "is not a known field"}
                                                for name in unknown[:10]])
    return raw.get("ttl")
