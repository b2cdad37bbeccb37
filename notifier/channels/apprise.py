"""Apprise: one channel for the many services the ``apprise`` library speaks.

Channel URL: ``apprise://?allow_private=no``. The target is the recipient's
``addresses["apprise"]``, any Apprise URL (``json://host/path``, ``mailto://...``,
``tgram://bot_token/chat_id``); its secrets are shown only as Apprise's privacy form.

Limits, accepted with the convenience:

* Apprise has no idempotency key: a retry after a send that did arrive repeats it.
* ``notify`` answers only True or False, so every failure is retryable (a bad token
  is retried until the attempts run out) and the error cannot say why; Apprise's log
  (logger ``apprise``) has the reason.
* The private-address check covers the generic HTTP schemes (``json``, ``xml``,
  ``form`` and their ``s`` forms), whose host is whatever the address says; other
  plugins talk to their service's own host, or to one the operator configured.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

import apprise  # the library: absolute imports, this module is notifier.channels.apprise

from notifier.channels.base import (
    Channel,
    ConfigurationError,
    DeliveryError,
    OutgoingMessage,
    RetryableError,
    SendResult,
)
from notifier.channels.http import check_target, mask_target
from notifier.settings import get_settings

#: Apprise schemes that post to an arbitrary host, mapped to the HTTP scheme they use.
GENERIC_HTTP_SCHEMES: dict[str, str] = {
    "json": "http", "jsons": "https", "xml": "http", "xmls": "https",
    "form": "http", "forms": "https",
}


class AppriseChannel(Channel):
    """Send each message through the Apprise plugin its recipient's URL names."""

    name = "apprise"
    schemes = ("apprise",)
    address_field = "apprise"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.allow_private = self.flag("allow_private", get_settings().allow_private_targets)
        self._asset = apprise.AppriseAsset()

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> Iterator[SendResult]:
        """One ``notify`` per message; the Apprise object is made once per address."""
        targets: dict[str, apprise.Apprise | DeliveryError] = {}
        for message in messages:
            address = message.address or ""
            if address not in targets:
                targets[address] = self._target(message)
            target = targets[address]
            error = target if isinstance(target, DeliveryError) else self._notify(target, message)
            if error is not None:
                error.provider_failure = False  # the recipient's service, not the channel
            yield SendResult(message.delivery_id, error)

    def _target(self, message: OutgoingMessage) -> apprise.Apprise | DeliveryError:
        """An Apprise object for the message's address, or why there can be none."""
        address = message.address
        if not address:
            return ConfigurationError(
                f"apprise: recipient {message.recipient_id} has no Apprise URL"
            )
        target = apprise.Apprise(asset=self._asset)
        if not target.add(address):
            return ConfigurationError(
                f"apprise: the {_scheme(address)}:// address of recipient"
                f" {message.recipient_id} is not a URL Apprise knows"
            )
        try:
            self._check_host(address)
        except DeliveryError as error:
            return error
        return target

    def _check_host(self, address: str) -> None:
        """The private-address check, for the schemes that post to any host."""
        scheme = GENERIC_HTTP_SCHEMES.get(_scheme(address))
        if scheme is not None:
            parts = urlsplit(address)
            port = f":{parts.port}" if parts.port else ""
            check_target(f"{scheme}://{parts.hostname}{port}/", self.allow_private,
                         what="apprise")

    def _notify(self, target: apprise.Apprise, message: OutgoingMessage) -> DeliveryError | None:
        body = message.body or message.title
        if target.notify(title=message.title, body=body):
            return None
        shown = "; ".join(mask_target(server.url(privacy=True)).partition("?")[0]
                          for server in target)
        return RetryableError(f"apprise: sending to {shown} failed")


def _scheme(address: str) -> str:
    return address.partition("://")[0].lower() if "://" in address else "?"
