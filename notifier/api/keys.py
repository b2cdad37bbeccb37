"""Who is asking: ``Authorization: Bearer <key>``, the key's scopes, its rate limit.

:func:`require` is the one dependency every route takes. It runs in the thread pool
(a database lookup and a Redis call): no key, a malformed header, an unknown or revoked
key are 401; a key without the scope is 403; a key past its requests per minute is 429
with ``Retry-After``. Keys are looked up on every request, never cached, so a revoked
key fails on its next request in every process (``notifier.storage.api_keys``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from notifier.api.errors import ApiError
from notifier.pipeline.ratelimit import take_window
from notifier.settings import get_settings
from notifier.storage.api_keys import KeyInfo, Scope, authenticate
from notifier.storage.db import session_scope
from notifier.storage.state import state_redis

#: Documents the scheme in OpenAPI; the checks and their answers are ours.
bearer = HTTPBearer(auto_error=False, description="An API key: `notifier api-keys create`")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def require(scope: Scope) -> Callable[..., KeyInfo]:
    """The dependency of a route needing ``scope`` (an admin key has every scope)."""

    def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> KeyInfo:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise ApiError(401, "an API key is required: Authorization: Bearer <key>",
                           headers=_CHALLENGE)
        with session_scope() as session:
            key = authenticate(session, credentials.credentials.strip())
        if key is None:
            raise ApiError(401, "unknown or revoked API key", headers=_CHALLENGE)
        if not key.allows(scope):
            raise ApiError(403, f"this key lacks the {scope.value} scope",
                           [{"scope": scope.value, "key_scopes": list(key.scopes)}])
        _within_rate_limit(key)
        return key

    check.__name__ = f"require_{scope.value}"
    return check


def _within_rate_limit(key: KeyInfo) -> None:
    limit = key.rate_limit_per_minute
    if limit is None:
        limit = get_settings().api_rate_limit_per_minute
    if not limit:
        return
    reset = take_window(state_redis(), f"notifier.api.rate.{{key{key.id}}}.minute", limit, 60)
    if reset:
        wait = max(1, math.ceil(reset - time.time()))
        raise ApiError(429, f"rate limit of {limit} requests per minute reached",
                       [{"limit": limit, "retry_after": wait}],
                       headers={"Retry-After": str(wait)})
