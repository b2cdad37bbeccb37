"""Retention: forget what the pipeline no longer needs, in bounded steps.

Idempotency keys matter only within the dedup window; without this their table would
grow by one row per keyed notification forever. Deleting in bounded batches keeps each
transaction short however far behind the cleanup is.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session


def purge_expired_idempotency_keys(session: Session, batch_size: int = 10_000) -> int:
    """Delete up to ``batch_size`` keys whose dedup window has passed; returns how many."""
    result = session.execute(
        text(
            "DELETE FROM idempotency_keys WHERE key IN ("
            " SELECT key FROM idempotency_keys WHERE expires_at <= now()"
            " ORDER BY expires_at LIMIT :batch_size FOR UPDATE SKIP LOCKED)"
        ),
        {"batch_size": batch_size},
    )
    return result.rowcount
