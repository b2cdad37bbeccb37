"""Each status-callback receiver's signing secret, by origin (``scheme://host:port``).

Callbacks are signed exactly as webhook deliveries are (``notifier.channels.webhook``:
``X-Notifier-Signature``, ``verify_signature``), with a secret of the receiving origin:
one shared by every receiver would let any of them forge callbacks to any other, and a
receiver is a server (an origin), whatever paths its callback URLs use. Made on first
use (the first callback to it, or ``notifier callbacks secret URL``), ``whsec_``
like a webhook secret (``notifier.masking`` recognises it).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.orm import Session

from notifier.storage.webhook_secrets import SigningSecrets, new_secret


def signing_secrets(session: Session, origins: Iterable[str]) -> dict[str, SigningSecrets]:
    """The secrets of these origins, made for those that have none yet: one query when
    all have theirs; otherwise the missing ones are inserted (``ON CONFLICT DO
    NOTHING``: a concurrent batch may make one first, and then its secret is used)."""
    wanted = sorted(set(origins))
    found = _select(session, wanted)
    missing = [origin for origin in wanted if origin not in found]
    if missing:
        session.execute(
            text("""
            INSERT INTO callback_secrets (origin, secret)
            SELECT * FROM unnest(CAST(:origins AS text[]), CAST(:secrets AS text[]))
            ON CONFLICT (origin) DO NOTHING
            """),
            {"origins": missing, "secrets": [new_secret() for _ in missing]},
        )
        found |= _select(session, missing)
    return found


def _select(session: Session, origins: list[str]) -> dict[str, SigningSecrets]:
    rows = session.execute(
        text("SELECT origin, secret FROM callback_secrets WHERE origin = ANY(:origins)"),
        {"origins": origins},
    )
    return {row.origin: SigningSecrets(row.secret) for row in rows}
