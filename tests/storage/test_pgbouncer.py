"""notifier behind a real PgBouncer in transaction pooling mode (Debian's package).

In transaction mode each transaction may run on another server connection, and a
server connection goes to the next client as soon as a transaction ends: nothing may
rely on session state (a session ``SET``, a prepared statement, a temporary table, an
advisory lock, ``LISTEN``), and nothing a transaction leaves behind may reach another
client. A real worker (ingest, flush loop, beat's sweeper, delivery to an aiosmtpd
server) and the CLI run through PgBouncer on a pool of three server connections, or on one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from notifier.client import notify
from notifier.settings import get_settings
from tests.conftest import DATABASE_URL, SERVER_URL
from tests.smtp_server import SmtpServer
from tests.storage.pgbouncer import (
    BINARY,
    ONE_SERVER,
    SMALL_POOL,
    SMALL_POOL_SIZE,
    TWO_SERVERS,
    PgBouncer,
)
from tests.workers import ROOT, WorkerProcess, count_rows, wait_for_count

pytestmark = pytest.mark.skipif(
    BINARY is None, reason="pgbouncer is not installed (apt-get install -y pgbouncer)")

SENT = "SELECT count(*) FROM deliveries WHERE status = 'sent'"
#: The parameters PgBouncer itself sets on a server connection for each client.
_POOLER_PARAMETERS = {"application_name", "client_encoding", "datestyle", "timezone",
                      "standard_conforming_strings", "intervalstyle"}


@pytest.fixture(scope="module")
def pgbouncer() -> Iterator[PgBouncer]:
    database = make_url(DATABASE_URL).database
    assert database
    bouncer = PgBouncer(SERVER_URL, database).start()
    yield bouncer
    bouncer.stop()


def behind(bouncer: PgBouncer, database: str | None = None) -> dict[str, str]:
    """The environment of a process whose Postgres is PgBouncer: the URL alone (by
    default psycopg prepares nothing, which Debian 12's PgBouncer 1.18 needs)."""
    return {"NOTIFIER_DATABASE_URL": bouncer.url(database)}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("notifier")), *args], cwd=ROOT,
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def start_worker(env: dict[str, str], smtp: SmtpServer, concurrency: int = 1) -> WorkerProcess:
    """A worker on every queue with beat (flush ticks, sweeper) and its flush loop;
    ``-c 1``: with the critical lane two pool processes may deliver at once, which
    ``SMALL_POOL_SIZE`` server connections carry (docs/scaling.md, sizing PgBouncer)."""
    return WorkerProcess.start(
        "-B", "--schedule", tempfile.mktemp(prefix="beat-"), concurrency=concurrency,
        env={**env, "NOTIFIER_CHANNELS__EMAIL": smtp.url()},
    )


def to(user: str) -> dict[str, str]:
    return {"id": user, "email": f"{user}@example.com"}


def test_ingest_flush_delivery_and_the_cli_through_pgbouncer(pgbouncer, smtp_server):
    """Ten critical e-mails (three sent twice with their idempotency key), four groups of
    three alerts (each a digest), a recipient's preferences set by the CLI, and one
    refused address replayed from its dead letter: every notification stored once,
    every digest made once, every e-mail received once, on three server connections."""
    env = behind(pgbouncer)
    cli(env, "recipients", "set", "pref-user", "--email", "pref@example.com",
        "--channels", "email", "--opt-out", "reminder")
    smtp_server.refuse_recipient("dead@example.com", code=550)
    worker = start_worker(env, smtp_server)
    try:
        ids = [notify(recipient=to(f"user-{i}"), type="alert", priority="critical",
                      title=f"Alert {i}", channels=["email"], idempotency_key=f"pgb-{i}")
               for i in range(10)]
        for i in range(3):  # a producer's retry: the same key again
            notify(recipient=to(f"user-{i}"), type="alert", priority="critical",
                   title=f"Alert {i}", channels=["email"], idempotency_key=f"pgb-{i}")
        ids += [notify(recipient=to(f"group-{g}"), type="alert", title=f"Group {g}.{n}",
                       channels=["email"]) for g in range(4) for n in range(3)]
        ids.append(notify(recipient="pref-user", type="alert", priority="critical",
                          title="By the recipient's channels"))
        ids.append(notify(recipient="pref-user", type="reminder", priority="critical",
                          title="Opted out"))
        ids.append(notify(recipient=to("dead"), type="alert", priority="critical",
                          title="Refused", channels=["email"]))

        wait_for_count(SENT, 10 + 4 + 1, timeout=60)
        wait_for_count("SELECT count(*) FROM dead_letters WHERE stage = 'deliver'", 1)
        [dead] = json.loads(cli(env, "dead-letters", "list", "--json").stdout)
        assert "dead@example.com" in dead["reason"] or "550" in dead["reason"]
        received = smtp_server.message_ids()
        smtp_server.reset()
        replay = cli(env, "dead-letters", "replay", "--stage", "deliver", "--yes")
        assert "replayed 1 dead letters" in replay.stdout
        wait_for_count(SENT, 16, timeout=60)
        received += smtp_server.message_ids()
        shown = json.loads(cli(env, "recipients", "show", "pref-user", "--json").stdout)
        cli(env, "health", "--check", "database", "--check", "pending")  # exits 0

        clients = [c for c in pgbouncer.show("CLIENTS") if c["database"] == pgbouncer.database]
        servers = [s for s in pgbouncer.show("SERVERS") if s["database"] == pgbouncer.database]
    finally:
        worker.stop()

    assert count_rows("SELECT count(*) FROM notifications") == len(ids) == 25
    assert count_rows("SELECT count(DISTINCT id) FROM notifications WHERE id = ANY(:ids)",
                      ids=[uuid.UUID(i) for i in ids]) == 25
    assert count_rows("SELECT count(*) FROM idempotency_keys WHERE key LIKE 'pgb-%'") == 10
    assert count_rows("SELECT count(*) FROM digests WHERE cardinality(notification_ids) = 3"
                      ) == count_rows("SELECT count(*) FROM digests") == 4
    assert count_rows("SELECT count(*) FROM notifications WHERE status = 'digested'") == 12
    assert count_rows("SELECT count(*) FROM notifications WHERE status = 'suppressed'") == 1
    assert count_rows("SELECT count(*) FROM deliveries WHERE status <> 'sent'") == 0
    assert count_rows("SELECT count(*) FROM dead_letters WHERE replayed_at IS NOT NULL") == 1

    by_delivery = Counter(received)
    assert len(by_delivery) == 16 and max(by_delivery.values()) == 1, by_delivery.most_common(2)
    assert count_rows("SELECT count(*) FROM deliveries WHERE id::text = ANY(:ids)",
                      ids=list(by_delivery)) == 16
    assert shown["email"] == "pref@example.com" and shown["channels"] == ["email"]

    # The worker's processes were more clients than there were server connections.
    assert 1 <= len(servers) <= pgbouncer.pool_size < len(clients), (servers, clients)
    assert "prepared statement" not in worker.log()


def test_deliveries_go_out_once_on_fewer_server_connections_than_claims(
    pgbouncer, smtp_server
):
    """A ``-c 2`` worker (three processes may deliver at once: two slots and the
    critical lane) on two server connections, the SMTP server slow (each batch holds its
    claim for a while): two batches can hold both connections with their claims while
    each waits for a second one for its recorder. Before, they waited so until
    PgBouncer's ``query_wait_timeout`` (120 s) failed them; now a batch that gets no
    second connection within ``NOTIFIER_DELIVERY_CLAIM_WAIT`` gives its claim back and
    tries again. Every e-mail is received once, well within the 120 s, nothing is left
    claimed, and no client ever met the timeout."""
    env = {**behind(pgbouncer, TWO_SERVERS), "NOTIFIER_DELIVERY_CLAIM_WAIT": "1"}
    smtp_server.delay = 0.2
    worker = start_worker(env, smtp_server, concurrency=2)
    started = time.monotonic()
    try:
        for i in range(30):
            notify(recipient=to(f"few-{i}"), type="alert", priority="critical",
                   title=f"Critical {i}", channels=["email"])
        for g in range(10):
            for n in range(3):
                notify(recipient=to(f"few-group-{g}"), type="alert", title=f"Group {g}.{n}",
                       channels=["email"])
        wait_for_count(SENT, 40, timeout=100)  # a single stall would take 120 s
        took = time.monotonic() - started
    finally:
        worker.stop()
    by_delivery = Counter(smtp_server.message_ids())
    assert len(by_delivery) == 40 and max(by_delivery.values()) == 1, by_delivery.most_common(2)
    assert count_rows("SELECT count(*) FROM deliveries WHERE status <> 'sent'") == 0
    assert count_rows("SELECT count(*) FROM deliveries WHERE attempts <> 1") == 0
    assert "query_wait_timeout" not in pgbouncer.log() + worker.log(), took
    servers = [s for s in pgbouncer.show("SERVERS") if s["database"] == TWO_SERVERS]
    assert len(servers) <= 2
    print(f"40 e-mails in {took:.1f} s; claims given back:"
          f" {worker.log().count('gave its claim back')}, batches queued again:"
          f" {worker.log().count('queued again in')}")


def _session_state(cursor: psycopg.Cursor[Any]) -> dict[str, Any]:
    """What a server connection carries from one transaction to the next."""
    def rows(sql: str) -> list[Any]:
        cursor.execute(sql)
        return [row[0] for row in cursor.fetchall()]

    return {
        "prepared statements": rows("SELECT name FROM pg_prepared_statements"),
        "temporary tables": rows(
            "SELECT relname FROM pg_class WHERE relpersistence = 't' AND relkind = 'r'"
            " AND pg_table_is_visible(oid)"),
        "advisory locks": rows("SELECT objid FROM pg_locks WHERE locktype = 'advisory'"
                               " AND pid = pg_backend_pid()"),
        "listening": rows("SELECT pg_listening_channels()"),
        "session settings": [name for name in rows(
            "SELECT name FROM pg_settings WHERE source = 'session'")
            if name.lower() not in _POOLER_PARAMETERS],
    }


def _one_server(bouncer: PgBouncer, **options: Any) -> psycopg.Connection[Any]:
    url = make_url(bouncer.url(ONE_SERVER))
    return psycopg.connect(host=url.host, port=url.port, user=url.username,
                           dbname=url.database, autocommit=True, **options)


def _server_connection(bouncer: PgBouncer, alias: str) -> psycopg.Connection[Any]:
    url = make_url(bouncer.url(alias))
    return psycopg.connect(host=url.host, port=url.port, user=url.username,
                           dbname=url.database)


def test_nothing_is_left_on_the_server_connections_all_clients_share(pgbouncer, smtp_server):
    """Ingest, flush, delivery (its claim's and its recorder's transactions), the CLI and
    the health check on a small pool of server connections (the fewest a worker runs on),
    then ingest's slow path and retention on one; what they leave on a server connection
    is what every later client meets. A temporary table of another shape (left by an
    older notifier whose transaction ran there before) must not reach ingest's staging."""
    env = behind(pgbouncer, SMALL_POOL)
    cli(env, "recipients", "set", "one-user", "--email", "one@example.com")
    worker = start_worker(env, smtp_server)
    try:
        for i in range(5):
            notify(recipient=to(f"one-{i}"), type="alert", priority="critical",
                   title=f"Alert {i}", channels=["email"])
        for n in range(3):
            notify(recipient="one-user", type="alert", title=f"Grouped {n}", channels=["email"])
        wait_for_count(SENT, 6, timeout=60)
        cli(env, "dead-letters", "list")
        cli(env, "health", "--check", "database", "--check", "pending")
        cli(env, "status")
    finally:
        worker.stop()
    clean = {"prepared statements": [], "temporary tables": [], "advisory locks": [],
             "listening": [], "session settings": []}
    # As many transactions open at once as the alias has server connections: each one.
    connections = [_server_connection(pgbouncer, SMALL_POOL) for _ in range(SMALL_POOL_SIZE)]
    try:
        for connection in connections:
            with connection.cursor() as cursor:
                assert _session_state(cursor) == clean
        pids = {c.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
                for c in connections}
    finally:
        for connection in connections:
            connection.close()
    assert len(pids) == SMALL_POOL_SIZE
    servers = [s for s in pgbouncer.show("SERVERS") if s["database"] == SMALL_POOL]
    assert len(servers) <= SMALL_POOL_SIZE

    _store_a_message_a_second_transaction_is_storing(pgbouncer)
    _purge_every_table_once(pgbouncer)
    with _one_server(pgbouncer) as after, after.cursor() as cursor:
        assert _session_state(cursor) == clean
    assert count_rows("SELECT count(*) FROM digests") == 1
    assert sorted(Counter(smtp_server.message_ids()).values()) == [1] * 6
    servers = [s for s in pgbouncer.show("SERVERS") if s["database"] == ONE_SERVER]
    assert len(servers) == 1


def _store_a_message_a_second_transaction_is_storing(bouncer: PgBouncer) -> None:
    """Ingest's slower way (its COPY met a row stored meanwhile: a temporary table and
    ``INSERT ... ON CONFLICT DO NOTHING``), on the one server connection where a table
    ``ingest_staging`` of another shape was left: only the new row is stored."""
    from sqlalchemy.orm import Session

    from notifier.pipeline.ingest import (
        IngestMessage,
        copy_notifications,
        split_messages,
        upsert_recipients,
    )
    from notifier.pipeline.routing import Routed
    from notifier.storage.db import get_engine, raw_cursor

    settings = get_settings()  # prepares nothing (the default)
    engine = get_engine(bouncer.url(ONE_SERVER), settings)
    with _one_server(bouncer) as other:  # as an older notifier would have left it
        other.execute("CREATE TEMP TABLE IF NOT EXISTS ingest_staging (id uuid)"
                      " ON COMMIT DELETE ROWS")
    candidates, _ = split_messages([IngestMessage("staging", [
        {"recipient": "staging-user", "type": "alert", "title": f"Staged {n}"}
        for n in range(2)])], settings)
    pairs = [(c, Routed("suppressed", "test")) for c in candidates]
    with Session(engine) as session, session.begin():
        cursor = raw_cursor(session)
        upsert_recipients(cursor, candidates)
        assert copy_notifications(cursor, pairs[:1]) == [candidates[0].id]
    with Session(engine) as session, session.begin():
        # The first is stored already (committed by "another transaction"): the way
        # ingest takes once its COPY met it (route_and_store).
        stored = copy_notifications(raw_cursor(session), pairs, careful=True)
    assert stored == [candidates[1].id]
    assert count_rows("SELECT count(*) FROM notifications WHERE recipient_id = 'staging-user'"
                      ) == 2


def _purge_every_table_once(bouncer: PgBouncer) -> None:
    """A retention batch per table (each sets its lock timeout for its transaction)."""
    from sqlalchemy.orm import Session

    from notifier.pipeline.retention import PURGES, purge_batch
    from notifier.storage.db import get_engine

    settings = get_settings()
    with Session(get_engine(bouncer.url(ONE_SERVER), settings)) as session:
        for purge in PURGES:
            age = purge.age(settings)
            if age is not None:
                with session.begin():
                    purge_batch(session, purge, age, 100, settings.retention_lock_timeout)


def test_psycopg_prepares_nothing_unless_told_to_which_pgbouncer_1_18_needs(pgbouncer):
    """Two clients on one server connection: a psycopg told to prepare does so for a
    statement run five times, under a name of its own numbering, which the other
    client's psycopg picks too (or looks for on a server that never had it). By
    default (``NOTIFIER_DATABASE_PREPARED_STATEMENTS`` off) it never prepares."""
    from notifier.storage.db import connect_args

    def six_times_each(settings: Any) -> None:
        options = {k: v for k, v in connect_args(settings).items() if k == "prepare_threshold"}
        with _one_server(pgbouncer, **options) as first, \
                _one_server(pgbouncer, **options) as second:
            for _ in range(6):
                for connection in (first, second):
                    connection.execute("SELECT count(*) FROM recipients WHERE id = %s", ("x",))

    told = get_settings().model_copy(update={"database_prepared_statements": True})
    with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
        six_times_each(told)  # psycopg's own default: prepare_threshold=5
    with _one_server(pgbouncer) as cleanup:
        cleanup.execute("DEALLOCATE ALL")

    assert not get_settings().database_prepared_statements
    six_times_each(get_settings())
    with _one_server(pgbouncer) as after, after.cursor() as cursor:
        assert _session_state(cursor)["prepared statements"] == []


def test_the_health_checks_query_timeout_holds_behind_pgbouncer(pgbouncer):
    """The health check's statement timeout is set inside its transaction (PgBouncer
    refuses it as a startup option): a query stuck behind a lock fails at the timeout,
    and the server connection keeps no timeout for the next client."""
    url = make_url(DATABASE_URL)
    with psycopg.connect(host=url.host, port=url.port, user=url.username,
                         dbname=url.database) as holder:
        holder.execute("LOCK TABLE notifications IN ACCESS EXCLUSIVE MODE")
        result = subprocess.run(
            [str(Path(sys.executable).with_name("notifier")), "health", "--check", "pending",
             "--timeout", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={**os.environ, **behind(pgbouncer, ONE_SERVER)},
        )
        holder.rollback()
    assert result.returncode == 1
    assert "canceling statement due to statement timeout" in result.stdout, result.stdout
    with _one_server(pgbouncer) as after, after.cursor() as cursor:  # where it ran
        assert _session_state(cursor)["session settings"] == []
