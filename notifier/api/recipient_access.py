"""Who may read one recipient's inbox: a backend's API key, or a browser's recipient token.

Every ``/v1/recipients/{id}/inbox…`` route takes :func:`inbox_access`. It accepts:

- ``Authorization: Bearer nk_…``: an API key with the ``read`` scope (checked, rate
  limited and revoked at once exactly as everywhere else: ``notifier.api.keys``), for
  any recipient;
- ``Authorization: Bearer v1.…``: a recipient token (``notifier.pipeline.recipient_tokens``)
  minted for this recipient, unexpired;
- ``?token=v1.…``: the same token in the query string, because a browser's
  ``EventSource`` cannot send headers. Only a recipient token is taken there, never an
  API key (query strings end up in proxies' logs; a token expires, a key does not).

A token for another recipient, expired, altered or signed by an unknown key is 401 with
the reason; tokens are rate limited per recipient with the API's per-key limit, so a
leaked token cannot be used to flood the database.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from notifier.api.errors import ApiError
from notifier.api.keys import over_rate_limit, require
from notifier.api.preferences import RecipientId
from notifier.pipeline.ratelimit import take_window_async
from notifier.pipeline.recipient_tokens import MAX_TOKEN_LENGTH, VERSION, TokenError, verify
from notifier.settings import get_settings
from notifier.storage.api_keys import KeyInfo, Scope
from notifier.storage.state_async import async_state_redis

_bearer = HTTPBearer(auto_error=False, description="An API key with the read scope, or a"
                                                   " recipient token for this recipient")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_check_read_key = require(Scope.READ)


@dataclass(frozen=True)
class InboxAccess:
    """The recipient whose inbox is asked for, and who asks: ``key`` is None for a token."""

    recipient_id: str
    key: KeyInfo | None


async def inbox_access(
    recipient_id: RecipientId,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    token: Annotated[str | None, Query(
        max_length=MAX_TOKEN_LENGTH,
        description="A recipient token, for browsers' EventSource (which cannot send"
                    " headers); never an API key",
    )] = None,
) -> InboxAccess:
    """The dependency of every inbox route, on the event loop (a token's check is an
    HMAC and one Redis script, through ``redis.asyncio``: no thread hop)."""
    if credentials is not None and credentials.scheme.lower() == "bearer":
        given = credentials.credentials.strip()
        if not given.startswith(f"{VERSION}."):
            return InboxAccess(recipient_id, await _check_read_key(credentials))
        return await _by_token(recipient_id, given)
    if token is not None:
        return await _by_token(recipient_id, token)
    raise ApiError(401, "an API key or a recipient token is required: Authorization:"
                        " Bearer <key or token>, or ?token=<token>", headers=_CHALLENGE)


async def _by_token(recipient_id: str, token: str) -> InboxAccess:
    try:
        verify(token, recipient_id=recipient_id)
    except TokenError as exc:
        raise ApiError(401, str(exc), [{"field": "token", "reason": exc.reason}],
                       headers=_CHALLENGE) from None
    await _within_rate_limit(recipient_id)
    return InboxAccess(recipient_id, None)


async def _within_rate_limit(recipient_id: str) -> None:
    limit = get_settings().api_rate_limit_per_minute
    if not limit:
        return
    # The recipient id may hold any character but control ones; a digest keeps the key
    # short and free of braces (the tag is the digest: one slot per recipient).
    name = f"notifier.api.rate.{{t{_digest(recipient_id)}}}.minute"
    reset = await take_window_async(async_state_redis(), name, limit, 60)
    if reset:
        raise over_rate_limit(limit, reset, " for this recipient's tokens")


def _digest(recipient_id: str) -> str:
    return hashlib.blake2b(recipient_id.encode(), digest_size=12).hexdigest()


InboxAccessDep = Annotated[InboxAccess, Depends(inbox_access)]
