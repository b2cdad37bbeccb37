"""Receipts: what a provider says became of a message after it accepted it.

Every way in (``POST /v1/events/{channel}``, Twilio's status callbacks, Mailgun's
webhooks: ``notifier.api.events``) ends here as one :class:`Receipt`, applied in one
transaction by :func:`apply_receipt`:

* the delivery moves forward only, from a status the provider accepted
  (``SENT_DELIVERY_STATUSES``): sent -> delivered -> undeliverable / bounced ->
  complained. A late ``delivered`` after a bounce, or the same event again (providers
  retry, attackers replay), changes nothing;
* a hard bounce, a permanent failure or a complaint suppresses the address on that
  channel at once; a soft bounce (``permanent`` false) leaves the status as it is (the
  provider is still trying; its ``delivered`` may follow) and counts towards
  ``suppression_soft_bounces`` within ``suppression_soft_bounce_window``.

The row is locked (``FOR UPDATE``) while its receipt is applied: two receipts of one
delivery at once take turns, and the stronger one wins whatever their order.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import text
from sqlalchemy.orm import Session

from notifier.channels import channel_class
from notifier.pipeline.delivery import address_of
from notifier.pipeline.suppressions import count_soft_bounce, suppress
from notifier.settings import Settings
from notifier.storage.models import SENT_DELIVERY_STATUSES, DeliveryStatus

Event = Literal["delivered", "bounced", "complained", "failed"]
EVENTS: tuple[Event, ...] = ("delivered", "bounced", "complained", "failed")

#: The status each event moves a delivery to.
STATUS_OF: dict[str, str] = {
    "delivered": DeliveryStatus.DELIVERED.value,
    "bounced": DeliveryStatus.BOUNCED.value,
    "complained": DeliveryStatus.COMPLAINED.value,
    "failed": DeliveryStatus.UNDELIVERABLE.value,
}
#: How far along each status is: a receipt only moves a delivery to a higher rank.
RANK: dict[str, int] = {
    DeliveryStatus.SENT.value: 0,
    DeliveryStatus.DELIVERED.value: 1,
    DeliveryStatus.UNDELIVERABLE.value: 2,
    DeliveryStatus.BOUNCED.value: 2,
    DeliveryStatus.COMPLAINED.value: 3,
}
assert set(RANK) == set(SENT_DELIVERY_STATUSES)  # one list of what a receipt may follow
#: Longest provider detail kept (``deliveries.provider_detail``).
MAX_DETAIL = 500

Result = Literal["applied", "unchanged", "unknown delivery", "not sent"]


@dataclass(frozen=True)
class Receipt:
    delivery_id: uuid.UUID
    channel: str
    event: Event
    #: For bounced and failed: the address itself is the problem (a hard bounce).
    permanent: bool
    detail: str
    #: When the provider says it happened; None: now.
    at: datetime | None = None
    #: The address the provider says it sent to (Mailgun's ``recipient``, Twilio's
    #: ``To``); None: the recipient's address now. The one that bounced is the one
    #: suppressed, even if the recipient has changed theirs since.
    address: str | None = None


@dataclass(frozen=True)
class ReceiptOutcome:
    result: Result
    #: The delivery's status after it (None if there is no such delivery).
    status: str | None = None
    #: This receipt put the address on the suppression list.
    suppressed: bool = False


def apply_receipt(session: Session, receipt: Receipt, settings: Settings) -> ReceiptOutcome:
    """Apply one receipt (see the module's docstring); the caller commits."""
    row = session.execute(text(
        "SELECT d.status, d.recipient_id, r.email, r.phone, r.addresses"
        " FROM deliveries d LEFT JOIN recipients r ON r.id = d.recipient_id"
        " WHERE d.id = :id AND d.channel = :channel FOR UPDATE OF d"
    ), {"id": receipt.delivery_id, "channel": receipt.channel}).first()
    if row is None:
        return ReceiptOutcome("unknown delivery")
    if row.status not in RANK:
        return ReceiptOutcome("not sent", row.status)
    soft = receipt.event in ("bounced", "failed") and not receipt.permanent
    status = row.status
    changed = False
    detail = storable_detail(receipt.detail)
    new = None if soft else STATUS_OF[receipt.event]
    if new is not None and RANK[new] > RANK[status]:
        session.execute(text(
            "UPDATE deliveries SET status = :status, provider_detail = :detail,"
            " provider_status_at = coalesce(:at, now()), updated_at = now() WHERE id = :id"
        ), {"status": new, "detail": detail, "at": receipt.at, "id": receipt.delivery_id})
        status, changed = new, True
    address = receipt.address or address_of(
        channel_class(receipt.channel).address_field, receipt.channel, row.email, row.phone,
        row.addresses or {})
    suppressed = False
    if address:
        suppressed = _suppress_if_due(session, receipt, address, detail, soft, settings)
    return ReceiptOutcome("applied" if changed or suppressed else "unchanged", status,
                          suppressed)


def storable_detail(text: str) -> str | None:
    """A provider's reason as a column holds it: one line, printable characters only (no
    NUL, no lone surrogate: Postgres refuses them), at most ``MAX_DETAIL``."""
    line = " ".join(text.split())
    return "".join(ch for ch in line if ch.isprintable())[:MAX_DETAIL] or None


def _suppress_if_due(
    session: Session, receipt: Receipt, address: str, detail: str | None, soft: bool,
    settings: Settings,
) -> bool:
    """Suppress the address if this receipt calls for it; True if it was added now."""
    why = f": {detail}" if detail else ""
    if receipt.event == "complained":
        return suppress(session, receipt.channel, address, f"complaint{why}", "complaint",
                        receipt.delivery_id)
    if receipt.event not in ("bounced", "failed"):
        return False
    if not soft:
        return suppress(session, receipt.channel, address, f"hard bounce{why}", "bounce",
                        receipt.delivery_id)
    count = count_soft_bounce(session, receipt.channel, address, receipt.delivery_id,
                              settings.suppression_soft_bounce_window)
    if count < settings.suppression_soft_bounces:
        return False
    days = settings.suppression_soft_bounce_window
    return suppress(session, receipt.channel, address,
                    f"{count} soft bounces within {days:g} days{why}", "soft-bounces",
                    receipt.delivery_id)
