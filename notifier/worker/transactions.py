"""One transaction, then what it produced is published: never before the commit (a task
must not point at rows that do not exist yet), and never when it rolled back.

Every task that writes rows and then queues work for them goes through
:func:`transaction`::

    with transaction() as tx:
        tasks = sweep_due_deliveries(tx.cursor, settings)
        tx.after_commit(publish, tasks)

If this process dies between the commit and the publishing, the rows stay ``pending``
and the outbox sweep publishes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ParamSpec

import psycopg
from sqlalchemy.orm import Session

from notifier.settings import Settings, get_settings
from notifier.storage.db import raw_cursor, session_scope

P = ParamSpec("P")


@dataclass
class Transaction:
    """A session, its raw cursor, and what to publish once it commits."""

    session: Session
    _after_commit: list[Callable[[], Any]] = field(default_factory=list)

    @cached_property
    def cursor(self) -> psycopg.Cursor[Any]:
        """The session's psycopg cursor, in the same transaction."""
        return raw_cursor(self.session)

    def after_commit(self, publish: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
        """Call ``publish(*args, **kwargs)`` once the transaction has committed, in the
        order given."""
        self._after_commit.append(lambda: publish(*args, **kwargs))


@contextmanager
def transaction(settings: Settings | None = None) -> Iterator[Transaction]:
    """Commit when the block ends (roll back if it raises), then publish. The
    transaction's idle time and lock waits are bounded (``db.bound_transaction``): a
    worker cut off in the middle of it must not hold its row locks for long."""
    with session_scope(bounds=settings or get_settings()) as session:
        tx = Transaction(session)
        yield tx
    for publish in tx._after_commit:
        publish()
