"""The notifier command, run as a real process against the run's database and broker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from notifier.storage import migrate
from notifier.storage.db import session_scope
from tests.conftest import SERVER_URL
from tests.workers import ROOT

NOTIFIER = str(Path(sys.executable).with_name("notifier"))


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None):
    return subprocess.run(
        [NOTIFIER, *args], cwd=ROOT, capture_output=True, text=True, input=stdin,
        env={**os.environ, **(env or {})}, timeout=60,
    )


@pytest.mark.parametrize(("option", "expected"), [
    ("--ingest", "notifier.critical,notifier.high,notifier.normal,notifier.low"),
    ("--deliver", "notifier.deliver.critical,notifier.deliver.apprise,notifier.deliver.console,"
     "notifier.deliver.email,notifier.deliver.inapp,notifier.deliver.slack,"
     "notifier.deliver.sms,notifier.deliver.webhook"),
    ("--critical", "notifier.critical,notifier.deliver.critical"),
])
def test_queues_prints_the_names_for_a_worker(option, expected):
    """`notifier queues` prints the queue names (a public contract), most urgent first."""
    result = run("queues", option)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_queues_by_default_are_every_queue_the_app_declares():
    """Without an option, every queue in the order a worker without -Q consumes them."""
    from notifier.worker.app import app

    result = run("queues")
    assert result.stdout.strip().split(",") == [queue.name for queue in app.conf.task_queues]
    assert run("queues", "--all").stdout == result.stdout


def test_makefile_workers_take_their_queues_from_the_command():
    """The Makefile's workers run `notifier queues` with options it has, and name no
    queue themselves."""
    makefile = (ROOT / "Makefile").read_text()
    options = re.findall(r"notifier queues (--[a-z]+)", makefile)
    assert set(options) >= {"--critical", "--deliver"}
    for option in options:
        assert run("queues", option).returncode == 0, option
    assert "notifier.deliver." not in makefile


def test_send_prints_the_id_and_the_worker_stores_it(worker):
    """`notifier send` publishes one notification and --wait sees it stored."""
    result = run("send", "--recipient", "user-7", "--type", "alert", "--title", "Disk full",
                 "--priority", "critical", "--channel", "email", "--data", '{"disk": "/"}',
                 "--wait", "20")
    assert result.returncode == 0, result.stderr
    note_id, stored = result.stdout.splitlines()
    assert stored == "stored: dispatched"
    with session_scope() as session:
        row = session.execute(text("SELECT * FROM notifications WHERE id = :id"),
                              {"id": note_id}).one()
    assert (row.recipient_id, row.channels, row.data) == ("user-7", ["email"], {"disk": "/"})


def test_send_json_from_stdin(worker):
    """`notifier send --json -` reads the whole notification from standard input."""
    note = {"recipient": {"id": "u9", "email": "u9@example.org"}, "type": "reminder",
            "title": "Hi"}
    result = run("send", "--json", "-", "--wait", "20", stdin=json.dumps(note))
    assert result.returncode == 0, result.stderr


def test_send_explains_every_bad_field():
    """Validation errors name each field and what is wrong, with exit code 2."""
    result = run("send", "--recipient", '{"id": "u1", "email": "nope"}', "--type", "Alert")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: invalid notification:",
        "  recipient.email: not a valid email address ('nope')",
        "  type: must start with a lowercase letter and hold only lowercase letters, digits,"
        " '_', '.' or '-', at most 64 characters (got 'Alert')",
        "  title: is required",
    ]


def test_send_with_bad_json():
    """Malformed --data is reported against the option, not as a traceback."""
    result = run("send", "--recipient", "u", "--type", "a", "--title", "t", "--data", "{x")
    assert result.returncode == 2
    assert "--data: not valid JSON" in result.stderr


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("NOTIFIER_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/x",
     "error: NOTIFIER_DATABASE_URL: cannot connect to postgresql+psycopg://postgres@127.0.0.1:1/x:"
     " Connection refused"),
    ("NOTIFIER_DATABASE_URL", "mysql://root@localhost/x",
     "error: NOTIFIER_DATABASE_URL: expected a postgresql+psycopg:// URL, got scheme 'mysql'"),
    ("NOTIFIER_BROKER_URL", "redis://127.0.0.1:1/0",
     "error: NOTIFIER_BROKER_URL: cannot reach redis://127.0.0.1:1/0:"),
    ("NOTIFIER_VISIBILITY_TIMEOUT", "soon",
     "error: NOTIFIER_VISIBILITY_TIMEOUT: Input should be a valid integer,"
     " unable to parse string as an integer"),
])
def test_bad_configuration_is_one_line(variable, value, expected):
    """A wrong or unreachable URL gives one line naming the variable, and exit code 1."""
    result = run("status", env={variable: value})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr


def test_status_reports_counts_queues_and_age():
    """`notifier status --json` counts rows by status and reads the queue depths."""
    from notifier import client

    client.notify("u", "report", "waiting in the queue")
    with session_scope() as session:
        session.execute(text(
            "INSERT INTO recipients (id) VALUES ('u');"
            "INSERT INTO notifications (id, recipient_id, type, priority, title, created_at)"
            " VALUES (gen_random_uuid(), 'u', 'report', 'normal', 't', now() - interval '90 s')"
        ))
    result = run("status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["notifications"] == {"pending": 1}
    assert report["queues"]["notifier.normal"] == 1
    assert report["oldest_pending_age_seconds"] >= 90
    assert "oldest pending: " in run("status").stdout


def test_dead_letters_list_and_show():
    """Dead letters can be listed with filters and shown with their original message."""
    from notifier.pipeline.ingest import IngestMessage, ingest_batch

    with session_scope() as session:
        ingest_batch(session, [IngestMessage("m1", {"recipient": "u", "type": "x"})])
    listing = run("dead-letters", "list", "--stage", "ingest")
    assert listing.returncode == 0 and "title: is required" in listing.stdout
    assert run("dead-letters", "list", "--stage", "deliver").stdout.strip() == "no dead letters"
    dead_id = json.loads(run("dead-letters", "list", "--json").stdout)[0]["id"]
    shown = json.loads(run("dead-letters", "show", str(dead_id)).stdout)
    assert shown["payload"] == {"recipient": "u", "type": "x"}
    missing = run("dead-letters", "show", "999999")
    assert missing.returncode == 2 and "no dead letter with id 999999" in missing.stderr


def test_db_upgrade_creates_a_missing_database():
    """`notifier db upgrade` creates the database when missing and migrates it to head."""
    url = f"{SERVER_URL}/notifier_cli_{os.getpid()}"
    try:
        result = run("db", "upgrade", env={"NOTIFIER_DATABASE_URL": url})
        assert result.returncode == 0, result.stderr
        assert "created database" in result.stdout
        assert f"database at revision {migrate.head_revision()}" in result.stdout
        again = run("db", "upgrade", env={"NOTIFIER_DATABASE_URL": url})
        assert again.returncode == 0 and "created" not in again.stdout
    finally:
        admin = create_engine(f"{SERVER_URL}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(
                f"DROP DATABASE IF EXISTS notifier_cli_{os.getpid()} WITH (FORCE)"
            )
        admin.dispose()
