"""``Idempotency-Key`` on ``POST /v1/notifications``: a retry gets the first answer.

Why: a 202's ids are made per request. Without this, a client retrying after a timeout
or a lost answer would get new ids that point at nothing (ingest drops the repeat by
its idempotency key). So the first successful answer (the ids, in order) is kept in the
state Redis with a digest of the request body, for ``NOTIFIER_DEDUP_WINDOW`` seconds
(as long as ingest remembers the key), under a key made of the API key's id and a hash
of the header, so two API keys never meet:

* a repeat with the same body (the parsed JSON, canonically dumped) gets the same ids;
* a repeat with another body is 422 naming ``Idempotency-Key``;
* a repeat while the first is in flight is 409 with ``Retry-After``: the first holds
  the key with a pending token (``SET NX`` with an expiry) until it stores its answer
  over it or, failing (422, 413, 503), deletes it, so a retry is processed afresh.

It is all in Redis, so every API process agrees. A Redis that does not answer while a
request begins is the API's 503 (``notifier.api.errors``); once the notifications are
published, their 202 stands even if Redis fails to keep it (logged).

The header also becomes each item's ``idempotency_key``, in the API key's own namespace
(:func:`item_key`), so that ingest drops a second publish should the stored answer be
lost; an ``idempotency_key`` field in the body stays the producer's, as over the broker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from notifier.api.errors import ApiError
from notifier.storage.state import Script, StateRedis, run_scripts

log = logging.getLogger("notifier.api")

#: The header, as it is named in errors.
HEADER = "Idempotency-Key"
#: Longest header: its item keys (``api:<key id>:<header>:<index>``) stay within 255.
HEADER_CHARS = 200
#: Answered on a replay.
REPLAYED_HEADER = "Idempotent-Replayed"
#: Item keys in an API key's namespace start so; a body's own field may not.
ITEM_KEY_PREFIX = "api:"
#: Seconds the first request holds the key: well over its longest run (each publish
#: waits at most ``NOTIFIER_BROKER_CONFIRM_TIMEOUT``), short enough that a process dying
#: mid-request blocks retries for a minute only.
LOCK_SECONDS = 60
#: What a 409 asks the client to wait.
RETRY_AFTER_SECONDS = 1
#: A held key's value starts with this, a kept answer's with ``_ANSWER`` (then the body's
#: digest and each id, as bytes: 16 bytes an id, so a list of 1,000 keeps 16 kB).
_PENDING, _ANSWER = b"P", b"A"
#: Delete the key only while it still holds this request's pending token.
_RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


@dataclass(frozen=True)
class Claim:
    """This request holds the key: it stores its answer (:func:`store`) or lets go
    (:func:`release`)."""

    name: str
    token: str
    digest: bytes
    window: int


@dataclass(frozen=True)
class Replay:
    """The first request's answer, for a repeat with the same body."""

    ids: list[str]


def checked_header(value: str) -> str:
    """The header, stripped: 422 naming it if it is empty, too long or not printable."""
    value = value.strip()
    if not value or len(value) > HEADER_CHARS or not value.isprintable():
        raise ApiError(422, f"invalid {HEADER} header", [{
            "field": HEADER,
            "problem": f"must be 1 to {HEADER_CHARS} printable characters",
        }])
    return value


def item_key(key_id: int, header: str, index: int | None) -> str:
    """An item's ``idempotency_key`` from the header: the API key's namespace, and
    ``:<index>`` for an item of a list (``index`` None for a single notification)."""
    scoped = f"{ITEM_KEY_PREFIX}{key_id}:{header}"
    return scoped if index is None else f"{scoped}:{index}"


def redis_key(key_id: int, header: str) -> str:
    """Where the answer is kept: bounded whatever the header, one per API key and header."""
    digest = hashlib.sha256(header.encode("utf-8", "surrogatepass")).hexdigest()
    return f"notifier.api.idempotency.{{key{key_id}}}.{digest}"


def body_digest(body: Any) -> bytes:
    """The parsed JSON's digest: the same for bodies that differ only in spacing or in
    the order of an object's keys."""
    try:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        raise ApiError(400, "the body nests too deep") from None
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).digest()


def begin(
    client: StateRedis, key_id: int, header: str, body: Any, window: int,
) -> Claim | Replay | None:
    """Claim the key, or the first answer to replay; 409 while the first is in flight,
    422 if it had another body. None when nothing is remembered (a window of 0)."""
    if window <= 0:
        return None
    name, digest = redis_key(key_id, header), body_digest(body)
    token = f"{_PENDING.decode()}{uuid.uuid4().hex}"
    for _ in range(3):  # the holder may let go between our two calls: ask again
        if client.set(name, token, nx=True, ex=LOCK_SECONDS):
            return Claim(name, token, digest, window)
        held = client.get(name)
        if held is not None:
            assert isinstance(held, bytes)  # connect() never decodes responses
            return _replay(held, digest)
    raise _in_flight()


def store(client: StateRedis, claim: Claim, ids: list[str]) -> None:
    """Keep the answer over the pending token, for the window."""
    answer = _ANSWER + claim.digest + b"".join(uuid.UUID(id_).bytes for id_ in ids)
    try:
        client.set(claim.name, answer, ex=claim.window)
    except RedisError as exc:
        log.warning("%s: the answer was published but not kept (%s); a retry is"
                    " processed afresh and its repeats dropped at ingest", HEADER, exc)


def release(client: StateRedis, claim: Claim) -> None:
    """Let go after a failure, so that a retry is processed afresh (else the lock
    expires on its own)."""
    try:
        run_scripts(client, [(_RELEASE, [claim.name], [claim.token])])
    except RedisError as exc:
        log.warning("%s: could not let go of a failed request's key (%s); retries get"
                    " 409 for up to %d s", HEADER, exc, LOCK_SECONDS)


def _replay(held: bytes, digest: bytes) -> Replay:
    if held.startswith(_PENDING):
        raise _in_flight()
    kept, ids = held[1:1 + len(digest)], held[1 + len(digest):]
    if kept != digest:
        raise ApiError(422, f"{HEADER} reused with a different body", [{
            "field": HEADER,
            "problem": "reused with a different body; a new request needs a new key",
        }])
    return Replay([str(uuid.UUID(bytes=ids[at:at + 16])) for at in range(0, len(ids), 16)])


def _in_flight() -> ApiError:
    return ApiError(409, f"a request with this {HEADER} is still in flight; try again",
                    [{"field": HEADER, "retry_after": RETRY_AFTER_SECONDS}],
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
