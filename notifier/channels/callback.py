"""Status callbacks' POSTs: a delivery's terminal status, signed, to the notification's
``callback_url`` (``notifier.pipeline.callbacks`` decides what and when).

Not a channel a notification can name: ``CallbackSender`` is the HTTP channels' batch
loop (``HttpChannel``: the process's guarded pool, the egress guard checked and pinned,
one deadline per request, a capped answer, a host that does not answer skipped for the
rest of the batch) with a target and a body of its own, signed by the webhook
channel's code (``signed_headers``), so one ``verify_signature`` checks webhooks and
callbacks alike. Its ``name`` is set after the class is made, so it registers nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

from notifier.channels.base import (
    AddressError,
    OutgoingMessage,
    SendResult,
    endpoint_of,
)
from notifier.channels.http import HttpChannel
from notifier.channels.webhook import signed_headers
from notifier.storage.webhook_secrets import SigningSecrets


class CallbackSender(HttpChannel):
    """POST each callback event (an ``OutgoingMessage`` whose ``data`` is the event and
    ``address`` the callback URL) signed with its origin's secret."""

    schemes = ("callback",)
    #: Every caller's receiver is its own server: one failing receiver backs off on its
    #: own circuit, never holding the others' callbacks.
    target_is_provider: ClassVar[bool] = False

    def __init__(self, timeout: float, allow_private: bool) -> None:
        flag = "yes" if allow_private else "no"
        super().__init__(f"callback://?timeout={timeout:g}&allow_private={flag}")
        #: Origin -> its signing secrets, for the batch being sent.
        self._signing: Mapping[str, SigningSecrets] = {}

    def send_signed(
        self, messages: Sequence[OutgoingMessage], signing: Mapping[str, SigningSecrets]
    ) -> Iterator[SendResult]:
        """Send as every HTTP channel does, signed with ``signing`` (by origin, loaded
        by the caller: this module reads no database). The secrets live on a copy made
        for this batch, so two batches of one sender never see each other's."""
        batch = CallbackSender.__new__(CallbackSender)
        batch.__dict__.update(self.__dict__)
        batch._signing = signing
        yield from HttpChannel.send_batch(batch, messages)

    def target(self, message: OutgoingMessage) -> str:
        if not message.address:
            raise AddressError("callback: no callback URL")
        return message.address

    def request(self, message: OutgoingMessage) -> dict[str, Any]:
        origin = endpoint_of(message.address)
        signing = self._signing.get(origin or "")
        if signing is None:
            raise AddressError("callback: no signing secret for its receiver")
        body = encode_event(message.data)
        return {"content": body,
                "headers": signed_headers(signing.all, message.idempotency_key, body,
                                          time.time())}


CallbackSender.name = "callback"


def encode_event(event: Mapping[str, Any]) -> bytes:
    """The request body: compact JSON with sorted keys, as a webhook's."""
    return json.dumps(event, separators=(",", ":"), sort_keys=True, ensure_ascii=False,
                      default=str).encode()
