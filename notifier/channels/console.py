"""The console channel: one line per message on the worker's log, for development."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from notifier.channels.base import Channel, OutgoingMessage, SendResult

log = logging.getLogger("notifier.console")


class ConsoleChannel(Channel):
    """``console://`` prints what would be sent; nothing leaves the machine."""

    name = "console"
    schemes = ("console",)

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> Iterator[SendResult]:
        for message in messages:
            log.warning(
                "[console] to %s (%s, %s): %s — %s", message.recipient_id, message.type,
                message.priority, message.title, message.body[:200],
            )
            yield SendResult(message.delivery_id)
