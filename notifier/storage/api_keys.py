"""The HTTP API's keys: made, listed, revoked, and checked on each request.

A key is ``nk_`` and 43 URL-safe characters (a 32-byte random token); it is shown once,
when made, and only its SHA-256 is stored. A fast unsalted hash is right here, where a
slow one (bcrypt, scrypt) is not: those slow down guessing *low-entropy* passwords,
while 256 random bits cannot be guessed at any speed, and bcrypt's ~100 ms of CPU per
request would cap a process at a few requests per second. A key's first 11 characters
(``prefix``, not secret) find its row, and the stored hash is compared with the
presented one in constant time (:func:`hmac.compare_digest`).

The API keeps the keys it authenticated in a per-process cache (``notifier.api.keys``),
made safe by a *generation* in the state Redis (:data:`GENERATION_KEY`): revoking bumps
it after the Postgres commit (:func:`bump_generation`), and every request's rate-limit
script reads it, so a process that sees a new generation forgets every key it knew and
the next request of a revoked key fails, in every API process. A key is looked up in
Postgres (one index scan) when a process first sees it, after a generation change, and
at least once a minute; ``last_used_at`` is written then, at most once a minute per key.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from notifier.schemas import callback_url_problem
from notifier.storage.models import ApiKey
from notifier.storage.state import StateRedis

KEY_PREFIX = "nk_"
#: Characters of a key kept as its display prefix (``nk_`` and 8 of the token).
PREFIX_CHARS = 11
#: A key is exactly this long: ``nk_`` and ``token_urlsafe(32)``.
KEY_CHARS = len(KEY_PREFIX) + 43
#: ``last_used_at`` is written when it is older than this (seconds).
TOUCH_INTERVAL = 60
#: The keys' generation in the state Redis: a new random value on every revocation. Its
#: hash tag is the one of the keys' rate windows (:func:`rate_window_key`), so the one
#: script a request runs reads both on a Redis Cluster too (one slot for all API keys).
GENERATION_KEY = "notifier.api.{keys}.generation"
#: Seconds an API process trusts a key it looked up (the bound of a revocation that
#: could not reach Redis); also how often a busy key's ``last_used_at`` can move.
CACHE_SECONDS = 60


def rate_window_key(key_id: int) -> str:
    """Where a key's requests of the current minute are counted (beside the generation)."""
    return f"notifier.api.{{keys}}.rate.{key_id}.minute"


def bump_generation(client: StateRedis) -> None:
    """Tell every API process to forget the keys it knew (after a revocation commits).
    A random value, not a counter: a state Redis that lost its data and counted again
    could repeat a value a process holds; a random one never comes back (nor does the
    clock-made one the API's script sets when the value is missing)."""
    client.set(GENERATION_KEY, uuid.uuid4().hex)


class Scope(enum.StrEnum):
    """What a key may do. ``admin`` may do everything."""

    SEND = "send"  # POST /v1/notifications
    READ = "read"  # the GETs
    EVENTS = "events"  # POST /v1/events/{channel}: provider receipts, nothing else
    ADMIN = "admin"  # dead letters, and everything else


@dataclass(frozen=True)
class KeyInfo:
    """A key as listings and the API see it (never the key itself)."""

    id: int
    name: str
    prefix: str
    scopes: tuple[Scope, ...]
    rate_limit_per_minute: int | None
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    #: The ``callback_url`` given to this key's notifications that name none.
    callback_url: str | None = None

    def allows(self, scope: Scope) -> bool:
        return Scope.ADMIN in self.scopes or scope in self.scopes


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


def create_key(
    session: Session, name: str, scopes: Iterable[Scope], rate_limit_per_minute: int | None = None,
    callback_url: str | None = None,
) -> tuple[KeyInfo, str]:
    """A new key: its row and the key itself (shown once, never stored). ``callback_url``:
    its notifications' default (checked as a notification's own)."""
    name = name.strip()
    if callback_url is not None:
        problem = callback_url_problem(callback_url)
        if problem:
            raise ValueError(f"--callback-url: {problem}")
    if not name or len(name) > 255 or not name.isprintable():
        raise ValueError("NAME: must be 1 to 255 printable characters")
    chosen = sorted(set(scopes), key=list(Scope).index)
    if not chosen:
        raise ValueError(
            f"--scope: give at least one of {', '.join(s.value for s in Scope)}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, prefix=key[:PREFIX_CHARS], key_hash=hash_key(key),
                 scopes=[scope.value for scope in chosen],
                 rate_limit_per_minute=rate_limit_per_minute, callback_url=callback_url)
    session.add(row)
    session.flush()
    session.refresh(row)
    return _info(row), key


def list_keys(session: Session, *, include_revoked: bool = False) -> list[KeyInfo]:
    query = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return [_info(row) for row in session.scalars(query)]


def revoke_key(session: Session, name_or_prefix: str) -> list[KeyInfo]:
    """Revoke the live keys of this name, or the one of this prefix (or id); returns
    them. Call :func:`bump_generation` after the commit: the API processes' caches of
    keys then forget them before their next request."""
    condition = (ApiKey.prefix == name_or_prefix) | (ApiKey.name == name_or_prefix)
    if name_or_prefix.isdigit():
        condition = condition | (ApiKey.id == int(name_or_prefix))
    rows = session.scalars(
        update(ApiKey).where(condition, ApiKey.revoked_at.is_(None))
        .values(revoked_at=text("now()")).returning(ApiKey)
    ).all()
    return [_info(row) for row in rows]


#: One index scan (``ix_api_keys_prefix``), without the ORM: loading an entity cost
#: three times the query itself (3.8 ms against 1.4 ms median, on a loaded machine).
_LIVE_BY_PREFIX = text(
    "SELECT id, name, prefix, key_hash, scopes, rate_limit_per_minute, created_at,"
    " revoked_at, last_used_at, callback_url"
    " FROM api_keys WHERE prefix = :prefix AND revoked_at IS NULL"
)


def authenticate(session: Session, key: str) -> KeyInfo | None:
    """The live key ``key`` is, or None (unknown, malformed or revoked)."""
    if len(key) != KEY_CHARS or not key.startswith(KEY_PREFIX) or not key.isascii():
        return None
    presented = hash_key(key)
    rows = session.execute(_LIVE_BY_PREFIX, {"prefix": key[:PREFIX_CHARS]}).mappings().all()
    found = None
    for row in rows:  # every row compared, so the time says nothing of which matched
        if hmac.compare_digest(row["key_hash"], presented):
            found = row
    if found is None:
        return None
    info = KeyInfo(
        id=found["id"], name=found["name"], prefix=found["prefix"],
        scopes=tuple(Scope(scope) for scope in found["scopes"]),
        rate_limit_per_minute=found["rate_limit_per_minute"],
        created_at=found["created_at"], revoked_at=None, last_used_at=found["last_used_at"],
        callback_url=found["callback_url"],
    )
    touch(session, info)
    return info


def touch(session: Session, info: KeyInfo) -> None:
    """Record that the key was used, at most once per :data:`TOUCH_INTERVAL` (by this
    host's clock: a skew of seconds only moves when the next write happens)."""
    last = info.last_used_at
    if last is not None and (datetime.now(UTC) - last).total_seconds() < TOUCH_INTERVAL:
        return
    session.execute(
        update(ApiKey).where(ApiKey.id == info.id).values(last_used_at=text("now()"))
    )


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        id=row.id, name=row.name, prefix=row.prefix,
        scopes=tuple(Scope(scope) for scope in row.scopes),
        rate_limit_per_minute=row.rate_limit_per_minute, created_at=row.created_at,
        revoked_at=row.revoked_at, last_used_at=row.last_used_at,
        callback_url=row.callback_url,
    )
