"""Webhooks: each message is POSTed as JSON to the recipient's own URL.

Channel URL: ``webhook://?secret=<hmac key>&timeout=10&allow_private=no``. The target is
the recipient's ``addresses["webhook"]``.

Every request carries

* ``Idempotency-Key: <delivery id>``, the same on every attempt, so a receiver drops a
  message it already has (a retry after a timeout may repeat one it processed);
* ``X-Notifier-Timestamp: <unix seconds>``;
* with a secret, ``X-Notifier-Signature: sha256=<hex>``: HMAC-SHA256, keyed with the
  secret, of ``f"{timestamp}.{raw body}"``.

A receiver verifies by recomputing the HMAC over the raw body bytes as received (before
any JSON parsing), comparing in constant time, and refusing timestamps more than a few
minutes away from its clock, which stops a captured request from being replayed later;
``verify_signature`` does all three.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from typing import Any, ClassVar

from notifier.channels.base import ConfigurationError, OutgoingMessage
from notifier.channels.http import HttpChannel

SIGNATURE_HEADER = "X-Notifier-Signature"
TIMESTAMP_HEADER = "X-Notifier-Timestamp"


class WebhookChannel(HttpChannel):
    """POST a JSON document per message to the recipient's webhook URL."""

    name = "webhook"
    schemes = ("webhook",)
    address_field = "webhook"
    #: Every recipient has an endpoint of their own: its failures are not the channel's.
    target_is_provider: ClassVar[bool] = False

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._secret = self.options.get("secret", "").encode()

    def target(self, message: OutgoingMessage) -> str:
        if not message.address:
            raise ConfigurationError(
                f"webhook: recipient {message.recipient_id} has no webhook URL"
            )
        return message.address

    def request(self, message: OutgoingMessage) -> dict[str, Any]:
        now = time.time()
        body = encode_payload(message, now)
        timestamp = str(int(now))
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": message.idempotency_key,
            TIMESTAMP_HEADER: timestamp,
        }
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, timestamp, body)
        return {"content": body, "headers": headers}


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


def sign(secret: bytes | str, timestamp: str | int, body: bytes | str) -> str:
    """The ``X-Notifier-Signature`` value: ``sha256=`` and the hex HMAC of
    ``f"{timestamp}.{body}"``."""
    key = secret.encode() if isinstance(secret, str) else secret
    raw = body.encode() if isinstance(body, str) else body
    digest = hmac.new(key, f"{timestamp}.".encode() + raw, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: bytes | str,
    timestamp: str | int,
    body: bytes | str,
    header: str | None,
    tolerance: float | None = 300,
    now: float | None = None,
) -> bool:
    """Whether a received request is genuine: for receivers (and the tests).

    ``body`` must be the raw bytes received. ``tolerance`` is the most seconds the
    timestamp may be away from ``now`` (default: this clock); None skips that check.
    """
    if not header:
        return False
    try:
        sent = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if tolerance is not None and abs(current - sent) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header.strip())


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)
