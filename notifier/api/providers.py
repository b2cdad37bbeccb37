"""Providers' signed event formats: Twilio's status callbacks and Mailgun's webhooks.

Each is checked here (signature, age, shape) and turned into what
``notifier.pipeline.receipts`` applies; nothing here touches the database. Every
refusal is a :class:`Refused` with the reason the metric counts and one line naming
what is wrong.

* Twilio (``X-Twilio-Signature``): base64 of the HMAC-SHA1, keyed with the account's
  auth token, of the full URL Twilio called followed by every form parameter, sorted by
  name, as name and value with nothing between
  (https://www.twilio.com/docs/usage/security#validating-requests). The URL is ours as
  Twilio sees it (``NOTIFIER_EVENTS_PUBLIC_URL``), path and query included: the
  delivery id rides in the query of the ``StatusCallback`` we set, so it is signed.
* Mailgun: the body carries ``signature: {timestamp, token, signature}``, the hex
  HMAC-SHA256 of timestamp and token keyed with the webhook signing key
  (https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks).
  A timestamp older (or further ahead) than ``NOTIFIER_EVENTS_MAX_AGE`` is stale; a token
  seen within it is a replay (the caller remembers tokens in the state Redis).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from notifier.pipeline.receipts import Event

#: Twilio's statuses that say what became of the message; the others (queued, sending,
#: sent, read, ...) are steps on the way and are ignored.
TWILIO_EVENTS: dict[str, Event] = {
    "delivered": "delivered", "undelivered": "failed", "failed": "failed",
}
#: Twilio error codes that mean the number itself will never take a text: unknown
#: destination (30005), landline or unreachable carrier (30006), invalid or non-mobile
#: number (21211, 21614), the recipient replied STOP (21610). A failure with one of
#: these is permanent and suppresses the number; any other is soft.
TWILIO_PERMANENT_ERRORS = frozenset({"30005", "30006", "21211", "21614", "21610"})
#: Mailgun's events that say what became of the message (``failed`` is a bounce, hard
#: or soft by its ``severity``); the others (accepted, opened, clicked, ...) are ignored.
MAILGUN_EVENTS: dict[str, Event] = {
    "delivered": "delivered", "failed": "bounced", "complained": "complained",
}
#: Most form parameters a Twilio callback may carry (it sends about twenty).
MAX_FORM_FIELDS = 100
#: Our Message-ID (``notifier.channels.email``): ``<delivery id@notifier>``.
_MESSAGE_ID = re.compile(r"<?([0-9a-fA-F-]{36})@notifier>?")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Refused(Exception):
    """An event refused: the HTTP status, the metric's reason and one line."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class ProviderEvent:
    """A provider's event, checked: ours to apply (``event`` None: one we ignore)."""

    delivery_id: uuid.UUID
    event: Event | None
    permanent: bool
    detail: str
    at: datetime | None
    #: The provider's own name for it (metrics, logs).
    name: str
    #: The address the provider sent to, if it says.
    address: str | None = None


# --- Twilio --------------------------------------------------------------------------


def twilio_signature(auth_token: str, url: str, params: Sequence[tuple[str, str]]) -> str:
    """What Twilio puts in ``X-Twilio-Signature`` for this URL and form."""
    signed = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def check_twilio(
    auth_token: str, url: str, params: Sequence[tuple[str, str]], signature: str | None,
) -> None:
    if not signature:
        raise Refused(401, "unsigned", "X-Twilio-Signature is missing")
    expected = twilio_signature(auth_token, url, params)
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        raise Refused(401, "bad signature",
                      "X-Twilio-Signature does not match (auth token, or"
                      " NOTIFIER_EVENTS_PUBLIC_URL not the URL Twilio called)")


def twilio_event(delivery_id: str | None, form: Mapping[str, str]) -> ProviderEvent:
    """A signed Twilio status callback as an event of ours."""
    status = form.get("MessageStatus") or form.get("SmsStatus") or ""
    if not status:
        raise Refused(422, "malformed", "MessageStatus: missing")
    code = (form.get("ErrorCode") or "").strip()
    event = TWILIO_EVENTS.get(status)
    detail = f"Twilio {status}" + (f", error {code}" if code else "")
    return ProviderEvent(
        delivery_id=_delivery_id(delivery_id, "query.delivery_id"), event=event,
        permanent=code in TWILIO_PERMANENT_ERRORS, detail=detail[:500], at=None,
        name=status[:32], address=_address(form.get("To")),
    )


# --- Mailgun -------------------------------------------------------------------------


def check_mailgun(body: Any, signing_key: str, max_age: float) -> str:
    """Check a Mailgun webhook's signature and age; return its token (for the replay
    check)."""
    if not isinstance(body, dict):
        raise Refused(422, "malformed", "the body is not a JSON object")
    signature = body.get("signature")
    if signature is None:
        raise Refused(401, "unsigned", "signature: missing")
    if not isinstance(signature, dict):
        raise Refused(422, "malformed", "signature: not an object")
    timestamp = _text(signature, "timestamp", 20)
    token = _text(signature, "token", 200)
    digest = _text(signature, "signature", 64)
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise Refused(422, "malformed", "signature.timestamp: not a number of seconds")
    expected = hmac.new(signing_key.encode(), (timestamp + token).encode(),
                        hashlib.sha256).hexdigest()
    if not _HEX64.fullmatch(digest) or not hmac.compare_digest(expected, digest):
        raise Refused(401, "bad signature", "signature.signature does not match"
                      " (NOTIFIER_MAILGUN_WEBHOOK_SIGNING_KEY)")
    if abs(time.time() - int(timestamp)) > max_age:
        raise Refused(401, "stale", f"signature.timestamp: more than {max_age:g}s from now"
                      " (NOTIFIER_EVENTS_MAX_AGE)")
    return token


def mailgun_event(body: dict[str, Any]) -> ProviderEvent:
    """A signed Mailgun webhook's ``event-data`` as an event of ours."""
    data = body.get("event-data")
    if not isinstance(data, dict):
        raise Refused(422, "malformed", "event-data: missing or not an object")
    name = data.get("event")
    if not isinstance(name, str) or not name:
        raise Refused(422, "malformed", "event-data.event: missing")
    event = MAILGUN_EVENTS.get(name)
    return ProviderEvent(
        delivery_id=_mailgun_delivery_id(data), event=event,
        permanent=name == "failed" and data.get("severity") == "permanent",
        detail=_mailgun_detail(data), at=_epoch(data.get("timestamp")), name=name[:32],
        address=_address(data.get("recipient")),
    )


def _mailgun_delivery_id(data: dict[str, Any]) -> uuid.UUID:
    """Ours: ``user-variables.notifier_delivery_id`` if a sender set it, else the
    Message-ID the e-mail channel writes (``<delivery id@notifier>``)."""
    variables = data.get("user-variables")
    if isinstance(variables, dict) and variables.get("notifier_delivery_id"):
        return _delivery_id(variables["notifier_delivery_id"],
                            "event-data.user-variables.notifier_delivery_id")
    message = data.get("message")
    headers = message.get("headers") if isinstance(message, dict) else None
    message_id = headers.get("message-id") if isinstance(headers, dict) else None
    found = _MESSAGE_ID.fullmatch(message_id.strip()) if isinstance(message_id, str) else None
    if found is None:
        raise Refused(422, "malformed", "event-data.message.headers.message-id: not one of"
                      " ours (<delivery id@notifier>)")
    return _delivery_id(found.group(1), "event-data.message.headers.message-id")


def _mailgun_detail(data: dict[str, Any]) -> str:
    status = data.get("delivery-status")
    parts = [str(data.get("severity") or ""), str(data.get("reason") or "")]
    if isinstance(status, dict):
        parts += [str(status.get("code") or ""),
                  str(status.get("message") or status.get("description") or "")]
    return " ".join(part for part in parts if part)[:500]


# --- shared --------------------------------------------------------------------------


def _text(fields: dict[str, Any], name: str, limit: int) -> str:
    value = fields.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise Refused(422, "malformed", f"signature.{name}: missing, not text, or over"
                      f" {limit} characters")
    return value


def _address(value: Any) -> str | None:
    """A reported address worth keeping: text, printable, at most 320 characters."""
    if not isinstance(value, str) or not value.strip() or len(value) > 320:
        return None
    return value.strip() if value.isprintable() else None


def _delivery_id(value: Any, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value)) if value and len(str(value)) <= 40 else _invalid(field)
    except ValueError:
        return _invalid(field)


def _invalid(field: str) -> uuid.UUID:
    raise Refused(422, "malformed", f"{field}: not a delivery id (a UUID)")


def _epoch(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (OverflowError, OSError, ValueError):
        return None
