"""SMS through Twilio's Messages API.

Channel URL: ``twilio://ACCOUNT_SID:AUTH_TOKEN@api.twilio.com?from=%2B15550001111``,
options ``https=yes`` (``no`` for a local fake server in tests), ``timeout`` and
``allow_private``. The target is the recipient's ``phone``, in E.164 form.

When ``NOTIFIER_EVENTS_PUBLIC_URL`` is set, every message asks Twilio for status
callbacks (``StatusCallback``) to our ``/v1/events/twilio``, the delivery id in its
query: Twilio signs the whole URL, so the id it reports back is the one we gave
(``docs/receipts.md``).

Twilio's Messages API takes no idempotency key: when a request times out after Twilio
accepted it, the retry sends the text a second time. That is the accepted price of
at-least-once delivery for SMS.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote, urlencode

import httpx

from notifier.channels.base import ConfigurationError, OutgoingMessage, PermanentError
from notifier.channels.http import HttpChannel, raise_for_response
from notifier.settings import get_settings

#: Twilio's longest message body, in characters.
MAX_BODY = 1600
#: Twilio error codes that say the number itself is wrong (invalid, or not a mobile).
INVALID_NUMBER_CODES = frozenset({21211, 21614})

_E164 = re.compile(r"\+[1-9]\d{7,14}")
#: Separators people write in phone numbers; dropped before the E.164 check.
_SEPARATORS = re.compile(r"[\s().-]")


class SmsChannel(HttpChannel):
    """POST each message as a form to Twilio's ``Messages.json``."""

    name = "sms"
    schemes = ("twilio",)
    address_field = "phone"
    has_providers = True

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._sid = unquote(self.parts.username or "")
        self._token = unquote(self.parts.password or "")
        self._from = self.options.get("from", "")
        if not (self._sid and self._token and self._from):
            raise ConfigurationError(
                f"sms: expected twilio://ACCOUNT_SID:AUTH_TOKEN@host?from=+1..., got"
                f" {self.masked_url!r}"
            )
        scheme = "https" if self.flag("https", True) else "http"
        host = self.parts.hostname or "api.twilio.com"
        netloc = f"{host}:{self.parts.port}" if self.parts.port else host
        self.api_url = (
            f"{scheme}://{netloc}/2010-04-01/Accounts/{quote(self._sid, safe='')}/Messages.json"
        )

    @property
    def auth_token(self) -> str:
        """What Twilio signs its callbacks with (``notifier.api.providers``)."""
        return self._token

    def target(self, message: OutgoingMessage) -> str:
        return self.api_url

    def request(self, message: OutgoingMessage) -> dict[str, Any]:
        form = {"To": e164(message.address), "From": self._from, "Body": sms_text(message)}
        callback = status_callback(message)
        if callback:
            form["StatusCallback"] = callback
        return {"data": form, "auth": (self._sid, self._token)}

    def check_response(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        code, text = _twilio_error(response)
        if code in INVALID_NUMBER_CODES:
            raise PermanentError(f"Twilio error {code}: invalid or non-mobile 'To' number")
        if response.status_code in (401, 403):
            raise ConfigurationError(
                f"sms: Twilio refused the credentials (HTTP {response.status_code})"
            )
        raise_for_response(response, detail=f"Twilio error {code}: {text}" if code else None)


def status_callback(message: OutgoingMessage) -> str | None:
    """The URL Twilio reports this message's statuses to, if we take them."""
    public = get_settings().events_public_url
    if not public:
        return None
    query = urlencode({"delivery_id": str(message.delivery_id)})
    return f"{public.rstrip('/')}/v1/events/twilio?{query}"


def e164(address: str | None) -> str:
    """The phone number in E.164 (``+`` and 8 to 15 digits), separators removed."""
    number = _SEPARATORS.sub("", address or "")
    if not _E164.fullmatch(number):
        raise PermanentError("sms: phone number is not in E.164 form (+ and 8 to 15 digits)")
    return number


def sms_text(message: OutgoingMessage) -> str:
    """Title and body on separate lines, cut to Twilio's 1600 characters."""
    text = "\n".join(part for part in (message.title, message.body) if part)
    return text if len(text) <= MAX_BODY else text[: MAX_BODY - 1] + "…"


def _twilio_error(response: httpx.Response) -> tuple[int | None, str]:
    """Twilio's error code and message from a failed answer, (None, "") if not its shape."""
    try:
        payload = response.json()
        code = int(payload["code"])
    except (ValueError, KeyError, TypeError):
        return None, ""
    return code, " ".join(str(payload.get("message", "")).split())[:200]
