"""Recipient tokens: short-lived proof, for a browser, that it may read one recipient's inbox.

A backend that holds an API key mints one per page load (``mint``) and hands it to the
browser; the inbox endpoints accept it for that recipient alone (``verify``), until it
expires. No state is kept: a token is its own record, signed.

Format (ASCII, at most :data:`MAX_TOKEN_LENGTH` characters)::

    v1.<key id>.<payload>.<signature>

``payload`` is base64url (no padding) of the expiry (unix seconds, signed 64-bit
big-endian) followed by the recipient id in UTF-8: readable by anyone, so it holds nothing
secret. ``signature`` is base64url of HMAC-SHA256, keyed with
``NOTIFIER_API_TOKEN_SECRET``, over ``v1.<key id>.<payload>``, compared in constant time.
``key id`` names the key (8 characters derived from it, revealing nothing of it), so
after a rotation tokens signed by ``NOTIFIER_API_TOKEN_PREVIOUS_SECRET`` are still
accepted until they expire. The checks run in an order that tells an attacker nothing
before the signature holds: length and shape, key, signature, then expiry and recipient.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import struct
import time
from dataclasses import dataclass

from notifier.pipeline.inbox import check_recipient
from notifier.settings import ConfigError, Settings, get_settings

VERSION = "v1"
#: Longest token accepted (a 255-character recipient id of 4-byte characters, encoded,
#: is about 1,420): anything longer is refused before it is decoded.
MAX_TOKEN_LENGTH = 2048
_PIECE = re.compile(r"[A-Za-z0-9_-]+")
_EXPIRY = struct.Struct(">q")
_KEY_ID_LABEL = b"notifier recipient token key id"


class TokenError(ValueError):
    """A token refused; ``reason`` is one of ``malformed``, ``unknown key``,
    ``bad signature``, ``expired``, ``other recipient``; ``str()`` one line naming
    ``token``."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"token: {reason}: {detail}")


@dataclass(frozen=True)
class Minted:
    """A new token and when it expires (unix seconds: what the token itself says)."""

    token: str
    expires: int


def mint(recipient_id: str, ttl: float | None = None, *, settings: Settings | None = None,
         now: float | None = None) -> str:
    """A token for ``recipient_id`` valid ``ttl`` seconds (``NOTIFIER_API_TOKEN_TTL`` by
    default, at most ``NOTIFIER_API_TOKEN_MAX_TTL``). ValueError names a bad
    ``recipient_id`` or ``ttl``; ConfigError when no secret is set."""
    return issue(recipient_id, ttl, settings=settings, now=now).token


def issue(recipient_id: str, ttl: float | None = None, *, settings: Settings | None = None,
          now: float | None = None) -> Minted:
    """:func:`mint`, answering the expiry too (what ``POST …/tokens`` tells its caller)."""
    settings = settings or get_settings()
    if settings.api_token_secret is None:
        raise ConfigError("NOTIFIER_API_TOKEN_SECRET: not set: recipient tokens cannot be"
                          " minted (docs/inbox.md)")
    check_recipient(recipient_id)
    ttl = settings.api_token_ttl if ttl is None else ttl
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not (
            0 < ttl <= settings.api_token_max_ttl):
        raise ValueError(f"ttl: seconds, above 0 and at most NOTIFIER_API_TOKEN_MAX_TTL"
                         f" ({settings.api_token_max_ttl:g}), got {ttl!r}")
    expires = int((time.time() if now is None else now) + ttl)
    secret = settings.api_token_secret.get_secret_value().encode()
    payload = _b64(_EXPIRY.pack(expires) + recipient_id.encode())
    signed = f"{VERSION}.{key_id(secret)}.{payload}"
    return Minted(f"{signed}.{_sign(secret, signed)}", expires)


def verify(token: object, *, recipient_id: str | None = None,
           settings: Settings | None = None, now: float | None = None) -> str:
    """The recipient a genuine, unexpired token is for (and it must be ``recipient_id``
    when given); :class:`TokenError` with the reason otherwise, whatever ``token`` is."""
    settings = settings or get_settings()
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("malformed", f"a string of at most {MAX_TOKEN_LENGTH} characters")
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != VERSION or not all(_PIECE.fullmatch(p) for p in parts[1:]):
        raise TokenError("malformed", f"expected {VERSION}.<key id>.<payload>.<signature>")
    _, kid, payload, signature = parts
    secret = _keys(settings).get(kid)
    if secret is None:
        raise TokenError("unknown key", "signed by a key not (or no longer) in use")
    if not hmac.compare_digest(_sign(secret, token.rsplit(".", 1)[0]).encode(),
                               signature.encode()):
        raise TokenError("bad signature", "not signed by this service, or altered")
    try:  # signed, so made by mint(): only a leaked key could make this fail
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        (expires,) = _EXPIRY.unpack_from(raw)
        recipient = raw[_EXPIRY.size:].decode()
    except (ValueError, struct.error):
        raise TokenError("malformed", "a payload mint() never makes") from None
    if (time.time() if now is None else now) >= expires:
        raise TokenError("expired", "mint a new one")
    if recipient_id is not None and recipient != recipient_id:
        raise TokenError("other recipient", "this token is for another recipient")
    return recipient


def key_id(secret: bytes) -> str:
    """The name a token gives its key: 8 characters of an HMAC of a fixed label."""
    return _b64(hmac.new(secret, _KEY_ID_LABEL, hashlib.sha256).digest()[:6])


def _keys(settings: Settings) -> dict[str, bytes]:
    """The keys tokens are accepted from, by key id (the previous one first: the current
    one wins should both be the same)."""
    secrets = (settings.api_token_previous_secret, settings.api_token_secret)
    keys = [s.get_secret_value().encode() for s in secrets if s is not None]
    return {key_id(key): key for key in keys}


def _sign(secret: bytes, signed: str) -> str:
    return _b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
