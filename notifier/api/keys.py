"""Who is asking: ``Authorization: Bearer <key>``, the key's scopes, its rate limit.

:func:`require` is the one dependency every route takes. It runs on the event loop
(the Redis script through ``redis.asyncio``; Postgres, on a cache miss only, in the
thread pool): no key, a malformed header, an unknown or revoked key are 401; a key without the scope
is 403; a key past its requests per minute is 429 with ``Retry-After``.

Each process keeps the keys it authenticated (:class:`KeyCache`, by the key's SHA-256),
so a request costs no Postgres: a lookup there took a quarter of a request's CPU. What
keeps revocation immediate is the keys' *generation* in the state Redis
(``notifier.storage.api_keys.GENERATION_KEY``): ``notifier api-keys revoke`` sets a new
one after its commit, and the one script every request runs anyway (the rate limit,
even for a key without one) reads it. A process that sees another generation than the
one its cached keys were looked up under forgets them all and looks the key up again:
the next request after a revocation fails, whichever process takes it. If revoke could
not reach Redis, entries still expire :data:`CACHE_SECONDS` seconds after their lookup.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.concurrency import run_in_threadpool

from notifier.api.errors import ApiError
from notifier.api.key_windows import key_windows
from notifier.settings import get_settings
from notifier.storage.api_keys import (
    CACHE_SECONDS,
    KeyInfo,
    Scope,
    authenticate,
    hash_key,
)
from notifier.storage.db import session_scope

#: Documents the scheme in OpenAPI; the checks and their answers are ours.
bearer = HTTPBearer(auto_error=False, description="An API key: `notifier api-keys create`")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
#: Keys cached per process; past it the oldest is forgotten.
MAX_KEYS = 10_000


@dataclass(frozen=True)
class _Known:
    info: KeyInfo
    generation: str
    looked_up_at: float


class KeyCache:
    """The keys this process authenticated, each with the generation it was looked up
    under: valid while a request reads that generation, for :data:`CACHE_SECONDS` seconds."""

    def __init__(self, max_age: float = float(CACHE_SECONDS), max_keys: int = MAX_KEYS) -> None:
        self.max_age, self.max_keys = max_age, max_keys
        self._lock = threading.Lock()
        self._known: dict[str, _Known] = {}
        #: The last generation a request read (None: none read yet).
        self.generation: str | None = None

    def get(self, digest: str) -> _Known | None:
        with self._lock:
            known = self._known.get(digest)
            if known is not None and time.monotonic() - known.looked_up_at > self.max_age:
                del self._known[digest]
                return None
            return known

    def put(self, digest: str, info: KeyInfo, generation: str) -> None:
        with self._lock:
            if len(self._known) >= self.max_keys and digest not in self._known:
                del self._known[next(iter(self._known))]
            self._known[digest] = _Known(info, generation, time.monotonic())

    def observe(self, generation: str) -> bool:
        """Note the generation a request read; True (and every key forgotten) if it is
        not the one before."""
        with self._lock:
            if generation == self.generation:
                return False
            self.generation = generation
            self._known.clear()
            return True


cache = KeyCache()


def require(scope: Scope) -> Callable[..., Awaitable[KeyInfo]]:
    """The dependency of a route needing ``scope`` (an admin key has every scope)."""

    async def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> KeyInfo:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise _no_key()
        return await authorized(credentials.credentials.strip(), scope)

    check.__name__ = f"require_{scope.value}"
    return check


async def authorized_header(authorization: str | None, scope: Scope) -> KeyInfo:
    """:func:`require`'s check for a route that reads its own headers (the single send,
    which skips FastAPI's dependency solving): ``Authorization`` parsed as ``bearer``
    parses it, the same answers."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
        raise _no_key()
    return await authorized(credentials.strip(), scope)


def _no_key() -> ApiError:
    return ApiError(401, "an API key is required: Authorization: Bearer <key>",
                    headers=_CHALLENGE)


async def authorized(presented: str, scope: Scope) -> KeyInfo:
    """The live key ``presented`` is, allowed ``scope`` and within its rate limit; else
    the ApiError to answer. One Redis script per request; Postgres only on a cache miss."""
    digest = hash_key(presented)
    before = cache.generation  # read before a lookup, which it then vouches for
    known = cache.get(digest)
    key = (await run_in_threadpool(_looked_up, presented, scope) if known is None
           else _allowed(known.info, scope))
    limit = key.rate_limit_per_minute
    if limit is None:
        limit = get_settings().api_rate_limit_per_minute
    reset, generation = await key_windows().take(key.id, limit or 0)
    cache.observe(generation)
    if known is None:
        if before == generation:  # no revocation since before the lookup
            cache.put(digest, key, generation)
    elif known.generation != generation:  # a key was revoked since it was looked up
        key = await run_in_threadpool(_looked_up, presented, scope)
    if reset:
        raise over_rate_limit(limit or 0, reset)
    return key


def over_rate_limit(limit: int, reset: float, whose: str = "") -> ApiError:
    """The 429 of a rate window that resets at ``reset`` (epoch seconds), with
    ``Retry-After``; ``whose`` ends the sentence (" for this recipient's tokens")."""
    wait = max(1, math.ceil(reset - time.time()))
    return ApiError(429, f"rate limit of {limit} requests per minute reached{whose}",
                    [{"limit": limit, "retry_after": wait}], headers={"Retry-After": str(wait)})


def _looked_up(presented: str, scope: Scope) -> KeyInfo:
    with session_scope() as session:
        key = authenticate(session, presented)
    if key is None:
        raise ApiError(401, "unknown or revoked API key", headers=_CHALLENGE)
    return _allowed(key, scope)


def _allowed(key: KeyInfo, scope: Scope) -> KeyInfo:
    if not key.allows(scope):
        raise ApiError(403, f"this key lacks the {scope.value} scope",
                       [{"scope": scope.value, "key_scopes": list(key.scopes)}])
    return key
