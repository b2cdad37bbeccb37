"""`notifier recipients set|show`, `notifier cancel` and `notifier rules`, as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from notifier.pipeline.ingest import IngestMessage, ingest_batch
from notifier.storage.db import session_scope
from tests.ops.test_cli import run
from tests.workers import ROOT


def _ingest(**fields: object) -> str:
    note_id = str(uuid.uuid4())
    note = {"id": note_id, "recipient": "cli-user", "type": "reminder", "title": "Hi"} | fields
    with session_scope() as session:
        ingest_batch(session, [IngestMessage(str(uuid.uuid4()), note)])
    return note_id


def _status(note_id: str) -> str:
    with session_scope() as session:
        return session.execute(text("SELECT status FROM notifications WHERE id = :id"),
                               {"id": note_id}).scalar_one()


def test_set_then_show_round_trips_preferences():
    result = run("recipients", "set", "ana", "--email", "ana@example.org",
                 "--timezone", "Europe/Berlin", "--opt-out", "announcement",
                 "--opt-out", "reminder:email", "--min-priority", "normal",
                 "--quiet-hours", "mon-fri 22:00-07:00", "--digest", "daily",
                 "--digest-time", "8:00", "--address", "webhook=https://hooks.example.org/x?token=s3cret")
    assert result.returncode == 0, result.stderr
    shown = run("recipients", "show", "ana", "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["email"] == "ana@example.org"
    assert report["timezone"] == "Europe/Berlin"
    assert report["opt_out"] == {"announcement": ["*"], "reminder": ["email"]}
    assert report["min_priority"] == "normal"
    assert report["digest_mode"] == "daily"
    assert report["digest_time"].startswith("08:00")
    assert "s3cret" not in shown.stdout, "a secret in a webhook address is shown masked"
    assert report["next_digest_at"] is not None
    human = run("recipients", "show", "ana")
    assert "daily at 08:00" in human.stdout
    assert "mon-fri 22:00-07:00" in human.stdout


def test_opt_in_undoes_one_channel_of_an_opt_out():
    run("recipients", "set", "ben", "--opt-out", "alert")
    result = run("recipients", "set", "ben", "--opt-in", "alert:email", "--json")
    assert result.returncode == 0, result.stderr
    channels = json.loads(result.stdout)["opt_out"]["alert"]
    assert "email" not in channels and "inapp" in channels


def test_bad_options_are_named():
    result = run("recipients", "set", "cid", "--timezone", "Mars/Olympus")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --timezone:")
    result = run("recipients", "set", "cid", "--quiet-hours", "someday 25:00-26:00")
    assert result.returncode == 2 and "--quiet-hours" in result.stderr
    result = run("recipients", "set", "cid", "--digest", "sometimes")
    assert result.returncode == 2 and "--digest" in result.stderr
    missing = run("recipients", "show", "nobody-like-this")
    assert missing.returncode == 2 and "notifier recipients set" in missing.stderr


def test_cancel_by_id_and_by_idempotency_key():
    first = _ingest()
    second = _ingest(idempotency_key="weekly-report-42")
    assert _status(first) == _status(second) == "pending"

    by_id = run("cancel", first)
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout.strip() == f"cancelled {first}"
    by_key = run("cancel", "--idempotency-key", "weekly-report-42")
    assert by_key.returncode == 0, by_key.stderr
    assert _status(first) == _status(second) == "cancelled"

    again = run("cancel", first)
    assert again.returncode == 1
    assert "it is cancelled already" in again.stderr


def test_cancel_reports_unknown_and_bad_input():
    assert run("cancel").returncode == 2
    unknown = run("cancel", str(uuid.uuid4()))
    assert unknown.returncode == 1 and "no notification" in unknown.stderr
    not_an_id = run("cancel", "nope")
    assert not_an_id.returncode == 1 and "not a notification id" in not_an_id.stderr
    no_key = run("cancel", "--idempotency-key", "never-used")
    assert no_key.returncode == 1 and "never-used" in no_key.stderr


def test_rules_lists_the_effective_rules_and_checks_a_file(tmp_path):
    builtin = run("rules")
    assert builtin.returncode == 0, builtin.stderr
    assert any(line.split()[:3] == ["alert", "5m", "3"] for line in builtin.stdout.splitlines())
    good = tmp_path / "rules.toml"
    good.write_text('[types.deploy]\nmode = "sliding"\nwindow = "5m"\ndigest_key = "project"\n'
                    '[types.security]\naggregate = false\n')
    listed = run("rules", "--file", str(good)).stdout.splitlines()
    assert ["deploy", "5m", "10", "sliding", "20m", "project"] in [line.split() for line in listed]
    assert any(line.startswith("security") and "not aggregated" in line for line in listed)
    bad = tmp_path / "bad.toml"
    bad.write_text('[types.alert]\nwindow = "10x"\n')
    failed = run("rules", "--file", str(bad))
    assert failed.returncode == 1
    assert f"{bad}: types.alert.window:" in failed.stderr


@pytest.mark.parametrize("command", [["worker", "--pool", "solo"], ["beat"]])
def test_bad_rules_file_stops_worker_and_beat_at_start(tmp_path, command):
    """A mistake in the rules file is one line at start, not an error at the first flush."""
    bad = tmp_path / "rules.toml"
    bad.write_text('[types.alert]\nmode = "rolling"\n')
    celery = str(Path(sys.executable).with_name("celery"))
    if command == ["beat"]:
        command = [*command, "-s", str(tmp_path / "schedule")]
    result = subprocess.run(
        [celery, "-A", "notifier", *command], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env={**os.environ, "NOTIFIER_RULES_FILE": str(bad)},
    )
    assert result.returncode != 0
    assert f"error: NOTIFIER_RULES_FILE: {bad}: types.alert.mode:" in result.stderr
