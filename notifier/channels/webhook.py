"""Webhooks: each message is POSTed as JSON to the recipient's own URL, signed with
that recipient's own secret.

Channel URL: ``webhook://?timeout=10&allow_private=no``. The target is the recipient's
``addresses["webhook"]``. Every receiver (the recipient owning the endpoint) has a
signing secret of its own, made on first use and stored in Postgres
(``notifier.storage.webhook_secrets``); `notifier webhooks secret show RECIPIENT` prints it and
`notifier webhooks secret rotate RECIPIENT` replaces it. The former shared
``?secret=`` option is refused: with it any receiver could forge requests to any other.

Every request carries

* ``Idempotency-Key: <delivery id>``, the same on every attempt, so a receiver drops a
  message it already has (a retry after a timeout may repeat one it processed);
* ``X-Notifier-Timestamp: <unix seconds>``;
* ``X-Notifier-Signature: v1=<hex>``: HMAC-SHA256, keyed with the receiver's secret
  (its UTF-8 bytes), of ``f"{timestamp}.{idempotency_key}.".encode() + raw body``.
  While a rotation's overlap lasts, one ``v1=`` per secret, newest first, separated by
  commas: ``v1=<hex by the new secret>,v1=<hex by the old one>``.

A receiver verifies by recomputing the HMAC over the raw body bytes as received (before
any JSON parsing) with the two headers' values, comparing in constant time against each
``v1=`` entry, and refusing timestamps more than a few minutes away from its clock,
which stops a captured request from being replayed later; ``verify_signature`` does all
of it, needs no database and answers False, never an exception, on malformed input.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import math
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

from notifier.channels.base import (
    AddressError,
    ConfigurationError,
    OutgoingMessage,
    RetryableError,
    SendResult,
)
from notifier.channels.http import HttpChannel

SIGNATURE_HEADER = "X-Notifier-Signature"
TIMESTAMP_HEADER = "X-Notifier-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: The scheme of each signature in the header.
SIGNATURE_VERSION = "v1"
#: ``verify_signature`` refuses headers longer than this and looks at this many entries.
MAX_SIGNATURE_HEADER = 1024
MAX_SIGNATURES = 8


class WebhookChannel(HttpChannel):
    """POST a JSON document per message to the recipient's webhook URL."""

    name = "webhook"
    schemes = ("webhook",)
    address_field = "webhook"
    #: Every recipient has an endpoint of their own: its failures are not the channel's.
    target_is_provider: ClassVar[bool] = False

    def __init__(self, url: str) -> None:
        super().__init__(url)
        if "secret" in _option_names(self.parts.query):
            raise ConfigurationError(
                "webhook: option secret: no longer used: every receiver has its own signing"
                " secret (`notifier webhooks secret show RECIPIENT`); remove secret="
            )
        #: Recipient id -> signing secrets, for the batch being sent (see ``send_batch``).
        self._signing: dict[str, Any] = {}

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> Iterator[SendResult]:
        """Load the receivers' secrets (one query), then send as every HTTP channel does.

        The secrets live on a copy of the channel made for this batch, so batches sent
        at the same time by one instance never see each other's.
        """
        from sqlalchemy.exc import SQLAlchemyError

        from notifier.storage.db import describe_db_error, session_scope
        from notifier.storage.webhook_secrets import signing_secrets

        try:
            with session_scope() as session:
                signing = signing_secrets(session, (m.recipient_id for m in messages))
        except SQLAlchemyError as exc:
            reason = f"webhook: cannot read the signing secrets: {describe_db_error(exc)}"
            yield from (SendResult(m.delivery_id, RetryableError(reason)) for m in messages)
            return
        batch = copy.copy(self)
        batch._signing = signing
        yield from HttpChannel.send_batch(batch, messages)

    def target(self, message: OutgoingMessage) -> str:
        if not message.address:
            raise AddressError(
                f"webhook: recipient {message.recipient_id} has no webhook URL"
            )
        return message.address

    def request(self, message: OutgoingMessage) -> dict[str, Any]:
        signing = self._signing.get(message.recipient_id)
        if signing is None:
            raise AddressError(
                f"webhook: recipient {message.recipient_id} has no signing secret"
                " (it is not a recipient any more)"
            )
        return signed_request(message, signing.all, time.time())


def signed_request(
    message: OutgoingMessage, secrets: Sequence[bytes | str], now: float
) -> dict[str, Any]:
    """Keyword arguments of ``httpx.Client.post`` for one message: the JSON body and its
    headers, signed with each of ``secrets`` (newest first)."""
    body = encode_payload(message, now)
    return {"content": body, "headers": signed_headers(secrets, message.idempotency_key,
                                                       body, now)}


def signed_headers(
    secrets: Sequence[bytes | str], idempotency_key: str, body: bytes, now: float
) -> dict[str, str]:
    """The headers of a signed JSON POST of ``body``: what webhook deliveries and status
    callbacks (``notifier.channels.callback``) carry alike, so that one
    ``verify_signature`` checks both."""
    timestamp = str(int(now))
    return {
        "Content-Type": "application/json",
        IDEMPOTENCY_HEADER: idempotency_key,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature_header(secrets, timestamp, idempotency_key, body),
    }


def _option_names(query: str) -> set[str]:
    return {pair.partition("=")[0].lower() for pair in query.split("&") if pair}


def encode_payload(message: OutgoingMessage, now: float) -> bytes:
    """The request body: compact JSON with sorted keys, so the signed bytes are stable."""
    payload = {
        "id": str(message.delivery_id),
        "notification_id": _str_or_none(message.notification_id),
        "digest_id": _str_or_none(message.digest_id),
        "recipient": message.recipient_id,
        "type": message.type,
        "priority": message.priority,
        "title": message.title,
        "body": message.body,
        "data": message.data,
        "sent_at": datetime.fromtimestamp(now, UTC).isoformat(),
    }
    return json.dumps(
        payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False, default=str
    ).encode()


def sign(secret: bytes | str, timestamp: str | int, idempotency_key: str,
         body: bytes | str) -> str:
    """One signature: ``v1=`` and the hex HMAC-SHA256, keyed with ``secret``, of
    ``f"{timestamp}.{idempotency_key}.".encode() + body``."""
    key = secret.encode() if isinstance(secret, str) else secret
    raw = body.encode() if isinstance(body, str) else body
    signed = f"{timestamp}.{idempotency_key}.".encode() + raw
    return f"{SIGNATURE_VERSION}={hmac.new(key, signed, hashlib.sha256).hexdigest()}"


def signature_header(secrets: Sequence[bytes | str], timestamp: str | int,
                     idempotency_key: str, body: bytes | str) -> str:
    """The ``X-Notifier-Signature`` value: one signature per secret, newest first."""
    return ",".join(sign(secret, timestamp, idempotency_key, body) for secret in secrets)


def verify_signature(
    secret: bytes | str | Sequence[bytes | str],
    timestamp: object,
    idempotency_key: object,
    body: object,
    header: object,
    tolerance: float | None = 300,
    now: float | None = None,
) -> bool:
    """Whether a received request is genuine: for receivers (and the tests).

    ``secret`` is the receiver's secret, or several (a receiver switching to a new one
    may accept both); ``timestamp``, ``idempotency_key`` and ``header`` are the values
    of ``X-Notifier-Timestamp``, ``Idempotency-Key`` and ``X-Notifier-Signature``;
    ``body`` must be the raw bytes received. True when any ``v1=`` signature in the
    header matches any secret (compared in constant time) and the timestamp is at most
    ``tolerance`` seconds away from ``now`` (default: this clock; None skips that
    check). Anything malformed (wrong types, non-ASCII, an empty or oversized header,
    a timestamp that is not a whole number of seconds) answers False, never raises.
    """
    try:
        return _verify(secret, timestamp, idempotency_key, body, header, tolerance, now)
    except Exception:  # a receiver's check must answer, whatever it was sent
        return False


def _verify(secret: Any, timestamp: Any, idempotency_key: Any, body: Any, header: Any,
            tolerance: Any, now: Any) -> bool:
    keys = _secrets(secret)
    sent = _timestamp(timestamp)
    key = _ascii(idempotency_key)
    raw = _body(body)
    candidates = _signatures(header)
    if not keys or sent is None or key is None or "." in key or raw is None or not candidates:
        return False
    if tolerance is not None:
        current = time.time() if now is None else float(now)
        limit = float(tolerance)
        if not (math.isfinite(current) and math.isfinite(limit) and abs(current - sent) <= limit):
            return False
    expected = [sign(k, sent, key, raw).encode("ascii") for k in keys]
    matched = False
    for candidate in candidates:
        for wanted in expected:
            matched |= hmac.compare_digest(wanted, candidate)
    return matched


def _secrets(secret: Any) -> list[bytes]:
    items = [secret] if isinstance(secret, str | bytes) else list(secret)
    keys = [item.encode() if isinstance(item, str) else item for item in items]
    return [key for key in keys if isinstance(key, bytes) and key]


def _body(body: Any) -> bytes | None:
    if isinstance(body, str):
        return body.encode()
    return bytes(body) if isinstance(body, bytes | bytearray | memoryview) else None


def _timestamp(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    text = _ascii(value)
    if text is None or not text.isdigit() or len(text) > 15:
        return None
    return int(text)


def _ascii(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("ascii")
    if not isinstance(value, str) or not value.isascii() or not value.isprintable():
        return None
    return value.strip() or None


def _signatures(header: Any) -> list[bytes]:
    text = _ascii(header)
    if text is None or len(text) > MAX_SIGNATURE_HEADER:
        return []
    entries = [entry.strip() for entry in text.split(",")][:MAX_SIGNATURES]
    prefix = f"{SIGNATURE_VERSION}="
    return [entry.encode("ascii") for entry in entries if entry.startswith(prefix)]


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)
