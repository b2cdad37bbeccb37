"""Slack: each message is POSTed to the recipient's incoming-webhook URL.

Channel URL: ``slack://?timeout=10&allow_private=no``; the target is the recipient's
``addresses["slack"]`` (``https://hooks.slack.com/services/T.../B.../...``, a secret:
errors show it only through ``mask_target``). Slack answers ``200 ok``; its errors are
short codes in the body (``no_service``, ``invalid_token``, ``channel_is_archived``)
that are kept in the error message. Slack webhooks take no idempotency key.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx

from notifier.channels.base import AddressError, OutgoingMessage, endpoint_of
from notifier.channels.http import HttpChannel, raise_for_response


class SlackChannel(HttpChannel):
    """POST ``{"text": ...}`` per message to the recipient's Slack incoming webhook."""

    name = "slack"
    schemes = ("slack",)
    address_field = "slack"
    #: Each recipient names their own webhook URL (hooks.slack.com or a compatible
    #: server they run): its failures are that endpoint's, never the channel's.
    target_is_provider: ClassVar[bool] = False

    def target(self, message: OutgoingMessage) -> str:
        if not message.address:
            raise AddressError(
                f"slack: recipient {message.recipient_id} has no Slack webhook URL"
            )
        return message.address

    def endpoint(self, message: OutgoingMessage) -> str | None:
        """Each hook is an endpoint of its own: every recipient's hook lives on
        hooks.slack.com, so one workspace's rate limit (429) or archived channel must not
        hold everybody's. The hook's path is a secret: only a digest of it is named."""
        origin = endpoint_of(message.address)
        if origin is None:
            return None
        path = urlsplit(message.address or "").path
        return f"{origin}#{hashlib.sha256(path.encode()).hexdigest()[:12]}"

    def request(self, message: OutgoingMessage) -> dict[str, Any]:
        return {"json": {"text": slack_text(message.title, message.body)}}

    def check_response(self, response: httpx.Response) -> None:
        raise_for_response(response, detail=_error_code(response))


def slack_text(title: str, body: str) -> str:
    """``*title*`` on its own line, then the body; both escaped, so that text such as
    ``<!channel>`` or ``<http://x|y>`` shows as written instead of pinging or linking."""
    if not title:
        return escape(body)
    if not body:
        return f"*{escape(title)}*"
    return f"*{escape(title)}*\n{escape(body)}"


def escape(text: str) -> str:
    """Slack's escaping: ``&``, ``<`` and ``>`` become entities (nothing else)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _error_code(response: httpx.Response) -> str | None:
    """Slack's short error code from a failed answer; None for anything longer (an HTML
    page from a proxy is no reason worth storing)."""
    if response.is_success:
        return None
    text = response.text.strip()
    return text if text and len(text) <= 64 and text.isprintable() else None
