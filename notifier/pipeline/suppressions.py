"""The suppression list: addresses a channel no longer sends to.

A sender that keeps mailing addresses that bounce, or people who marked it as spam,
loses its reputation with the mailbox providers, and then everyone's mail lands in spam.
So a hard bounce or a complaint (``notifier.pipeline.receipts``) puts the address here
at once, N soft bounces within a window do too, and an operator may add or remove one
(``notifier suppressions``, ``/v1/suppressions``). The delivery step looks up a whole
batch's addresses in one query (:func:`suppressed_among`) and ends those deliveries
``suppressed``, untried.

Addresses are kept normalized (:func:`normalize`), so that ``Bob@Example.COM`` and
``bob@example.com`` are one entry: e-mail addresses are lowercased whole (no mailbox
provider of note treats the local part's case as significant, and missing a variant
costs more than matching one too many), phone numbers reduced to E.164.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from notifier.channels.base import DeliveryError

if TYPE_CHECKING:
    from psycopg import Cursor

#: Longest address kept (the column's size; RFC 5321's longest e-mail path is 256).
MAX_ADDRESS = 320
#: Longest reason kept (the column's size).
MAX_REASON = 500
#: What can put an address on the list.
SOURCES = ("bounce", "complaint", "soft-bounces", "manual")


def normalize(channel: str, address: str) -> str:
    """The form an address is kept and matched in."""
    address = address.strip()
    if channel == "email":
        return address.lower()
    if channel == "sms":
        from notifier.channels.sms import e164

        try:
            return e164(address)
        except DeliveryError:
            return address
    return address


@dataclass(frozen=True)
class SuppressionEntry:
    channel: str
    address: str
    reason: str
    source: str
    delivery_id: uuid.UUID | None
    created_at: datetime


def suppressed_among(
    cursor: Cursor[Any], channel: str, addresses: dict[uuid.UUID, str],
) -> dict[uuid.UUID, str]:
    """Of these deliveries (id -> address), those whose address is suppressed on the
    channel, with the reason to record: one query whatever their number."""
    if not addresses:
        return {}
    normalized = {key: normalize(channel, value) for key, value in addresses.items()}
    cursor.execute(
        "SELECT address, reason FROM suppressions"
        " WHERE channel = %s AND address = ANY(%s::text[])",
        (channel, sorted(set(normalized.values()))),
    )
    reasons = {address: reason for address, reason in cursor.fetchall()}
    return {key: f"suppressed: {reasons[value]}" for key, value in normalized.items()
            if value in reasons}


def suppress(
    session: Session, channel: str, address: str, reason: str, source: str,
    delivery_id: uuid.UUID | None = None,
) -> bool:
    """Put the address on the channel's list; False if it was there already (the first
    reason stays: it is the one that explains the rest)."""
    row = session.execute(text(
        "INSERT INTO suppressions (channel, address, reason, source, delivery_id)"
        " VALUES (:channel, :address, :reason, :source, :delivery_id)"
        " ON CONFLICT (channel, address) DO NOTHING RETURNING id"
    ), {"channel": channel, "address": normalize(channel, address)[:MAX_ADDRESS],
        "reason": reason[:MAX_REASON], "source": source, "delivery_id": delivery_id},
    ).first()
    return row is not None


def unsuppress(session: Session, channel: str, address: str) -> bool:
    """Take the address off the channel's list (and forget its soft bounces, so that
    the next one does not suppress it again at once); False if it was not there."""
    address = normalize(channel, address)
    session.execute(text("DELETE FROM soft_bounces WHERE channel = :c AND address = :a"),
                    {"c": channel, "a": address})
    row = session.execute(text(
        "DELETE FROM suppressions WHERE channel = :c AND address = :a RETURNING id"
    ), {"c": channel, "a": address}).first()
    return row is not None


def count_soft_bounce(
    session: Session, channel: str, address: str, delivery_id: uuid.UUID,
    window_days: float,
) -> int:
    """Record a soft bounce of this delivery (once, however often it is reported) and
    return how many the address has within the window; older ones are forgotten."""
    address = normalize(channel, address)[:MAX_ADDRESS]
    window = {"secs": window_days * 86400.0}
    session.execute(text(
        "DELETE FROM soft_bounces WHERE at < now() - make_interval(secs => :secs)"
    ), window)
    session.execute(text(
        "INSERT INTO soft_bounces (delivery_id, channel, address, at)"
        " VALUES (:id, :channel, :address, now()) ON CONFLICT (delivery_id) DO NOTHING"
    ), {"id": delivery_id, "channel": channel, "address": address})
    return int(session.execute(text(
        "SELECT count(*) FROM soft_bounces WHERE channel = :channel AND address = :address"
        " AND at >= now() - make_interval(secs => :secs)"
    ), {"channel": channel, "address": address, **window}).scalar_one())


@dataclass(frozen=True)
class SuppressionFilter:
    channel: str | None = None
    #: A part of the (normalized) address.
    address: str | None = None
    source: str | None = None
    since: datetime | None = None


def find_suppressions(
    session: Session, where: SuppressionFilter, limit: int,
) -> list[SuppressionEntry]:
    """The newest entries matching the filter."""
    clauses: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    if where.channel:
        clauses.append("channel = :channel")
        params["channel"] = where.channel
    if where.address:
        clauses.append("address LIKE :address ESCAPE '\\'")
        params["address"] = "%" + _like_escaped(where.address.strip().lower()) + "%"
    if where.source:
        clauses.append("source = :source")
        params["source"] = where.source
    if where.since:
        clauses.append("created_at >= :since")
        params["since"] = where.since
    sql = ("SELECT channel, address, reason, source, delivery_id, created_at"
           " FROM suppressions" + (" WHERE " + " AND ".join(clauses) if clauses else "")
           + " ORDER BY created_at DESC, id DESC LIMIT :limit")
    return [SuppressionEntry(**row._mapping) for row in session.execute(text(sql), params)]


def _like_escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def entry_view(entry: SuppressionEntry) -> dict[str, Any]:
    """An entry as listings show it: addresses masked as ``recipients show`` masks them."""
    from notifier.masking import mask_address

    return {"channel": entry.channel, "address": mask_address(entry.address),
            "reason": entry.reason, "source": entry.source,
            "delivery_id": str(entry.delivery_id) if entry.delivery_id else None,
            "created_at": entry.created_at.isoformat()}
