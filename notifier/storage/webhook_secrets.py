"""Each webhook receiver's own signing secret: made on first use, rotated with an
overlap, printed only by `notifier webhooks secret show`.

The receiver is the recipient owning the webhook endpoint. A secret shared by all
receivers would let any of them forge requests to any other; with one each, a receiver
can verify only what was meant for it. Secrets are ``whsec_`` and 43 URL-safe characters
(256 random bits); the prefix lets ``notifier.masking`` recognise one anywhere.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class SigningSecrets:
    """What a request to one receiver is signed with right now."""

    current: str
    #: The secret before the last rotation, while its overlap lasts.
    previous: str | None = None

    @property
    def all(self) -> tuple[str, ...]:
        return (self.current, self.previous) if self.previous else (self.current,)


@dataclass(frozen=True)
class SecretInfo:
    """A receiver's secret as `notifier webhooks secret show` reports it."""

    recipient_id: str
    secret: str
    created_at: datetime
    rotated_at: datetime | None
    #: Until when the previous secret still signs too; None once it no longer does.
    previous_valid_until: datetime | None


def signing_secrets(session: Session, recipient_ids: Iterable[str]) -> dict[str, SigningSecrets]:
    """The secrets of these recipients, made for those that have none yet.

    One query when every recipient has its secret (the usual case); otherwise the
    missing ones are inserted (``ON CONFLICT DO NOTHING``: a concurrent batch may make
    the same one first, and then its secret is the one used) and read again. A
    recipient id with no recipient row gets nothing.
    """
    ids = sorted(set(recipient_ids))
    found = _select(session, ids)
    missing = [recipient_id for recipient_id in ids if recipient_id not in found]
    if missing:
        session.execute(
            text("""
            INSERT INTO webhook_secrets (recipient_id, secret)
            SELECT r.id, w.secret
            FROM unnest(CAST(:ids AS text[]), CAST(:secrets AS text[])) AS w(id, secret)
            JOIN recipients r ON r.id = w.id
            ON CONFLICT (recipient_id) DO NOTHING
            """),
            {"ids": missing, "secrets": [new_secret() for _ in missing]},
        )
        found |= _select(session, missing)
    return found


def _select(session: Session, ids: list[str]) -> dict[str, SigningSecrets]:
    rows = session.execute(
        text("""
        SELECT recipient_id, secret,
               CASE WHEN previous_valid_until > now() THEN previous_secret END AS previous
        FROM webhook_secrets WHERE recipient_id = ANY(:ids)
        """),
        {"ids": ids},
    )
    return {row.recipient_id: SigningSecrets(row.secret, row.previous) for row in rows}


def secret_info(session: Session, recipient_id: str) -> SecretInfo | None:
    """The recipient's secret, made now if it has none; None if there is no such
    recipient."""
    signing_secrets(session, [recipient_id])
    row = session.execute(
        text("""
        SELECT recipient_id, secret, created_at, rotated_at,
               CASE WHEN previous_valid_until > now() THEN previous_valid_until END AS until
        FROM webhook_secrets WHERE recipient_id = :id
        """),
        {"id": recipient_id},
    ).one_or_none()
    if row is None:
        return None
    return SecretInfo(row.recipient_id, row.secret, row.created_at, row.rotated_at, row.until)


def rotate_secret(session: Session, recipient_id: str, overlap: timedelta) -> SecretInfo | None:
    """Give the recipient a new secret; the current one keeps signing too for ``overlap``
    (none: it stops at once). A second rotation within an overlap ends the first one's:
    only the secret just replaced stays valid. None if there is no such recipient."""
    row = session.execute(
        text("""
        INSERT INTO webhook_secrets AS w (recipient_id, secret)
        SELECT id, :secret FROM recipients WHERE id = :id
        ON CONFLICT (recipient_id) DO UPDATE SET
            secret = EXCLUDED.secret,
            previous_secret = CASE WHEN :overlap > interval '0' THEN w.secret END,
            previous_valid_until = CASE WHEN :overlap > interval '0'
                                        THEN now() + :overlap END,
            rotated_at = now()
        RETURNING recipient_id, secret, created_at, rotated_at, previous_valid_until
        """),
        {"id": recipient_id, "secret": new_secret(), "overlap": overlap},
    ).one_or_none()
    if row is None:
        return None
    return SecretInfo(row.recipient_id, row.secret, row.created_at, row.rotated_at,
                      row.previous_valid_until)
