"""`notifier health`: real broker, database, worker and beat processes, and the verdicts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from notifier.ops import health
from notifier.ops.health import StuckWork
from notifier.storage.db import session_scope
from notifier.storage.migrate import head_revision
from notifier.worker import heartbeat as heartbeats
from notifier.worker.heartbeat import Heartbeat
from tests.conftest import SERVER_URL, STATE_REDIS_URL
from tests.ops.test_cli import run
from tests.workers import CELERY, ROOT, wait_for

#: Beat on a test's time scale: a heartbeat every half second, stale after 3 s.
BEAT_ENV = {"NOTIFIER_HEARTBEAT_INTERVAL": "0.5", "NOTIFIER_HEALTH_BEAT_MAX_AGE": "3"}


@contextmanager
def beat_process(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``celery -A notifier beat``, stopped (SIGTERM) at the end of the block."""
    log = tmp_path / "beat.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [CELERY, "-A", "notifier", "beat", "-l", "info",
             "-s", str(tmp_path / "beat-schedule")],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **BEAT_ENV},
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop_beat(process)


def stop_beat(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def heartbeat_now() -> Heartbeat:
    from notifier.storage.state import state_redis

    return heartbeats.read_heartbeat(state_redis())


def health_lines(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    """Exit code and each check's line (``{"beat": "FAIL beat ..."}``)."""
    result = run("health", *args, env=env)
    assert result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    return result.returncode, {line.split()[1]: line for line in lines}


# --- Against real processes -------------------------------------------------------------


def test_all_checks_pass_with_a_worker_and_beat(worker, tmp_path):
    """With a worker and beat running, every check passes and health exits 0; the
    heartbeat carries the time beat sent it, and the worker that ran it is named."""
    with beat_process(tmp_path):
        wait_for(lambda: heartbeat_now().ran_at is not None, 30, "a heartbeat run")
        code, lines = health_lines("--beat-max-age", "3")
    assert code == 0, lines
    assert list(lines) == ["broker", "database", "state", "workers", "beat", "queues",
                          "pending"]
    assert all(line.startswith("ok   ") for line in lines.values()), lines
    assert lines["database"].startswith(f"ok   database  head {head_revision()}, ")
    assert lines["state"].startswith(f"ok   state     {STATE_REDIS_URL}, ")
    assert lines["workers"].startswith("ok   workers   1 answering within 1.0 s: test")
    assert "(limit 3.0 s)" in lines["beat"] and " after sending by test" in lines["beat"]
    beat = heartbeat_now()
    assert beat.published_at and beat.sent_at and beat.ran_at
    assert beat.sent_at <= beat.ran_at and beat.worker.startswith("test")


def test_no_worker_fails_with_the_workers_line(tmp_path):
    """No worker running: the workers check fails with its one line and health exits 1;
    beat is ticking, and the beat check says that nobody runs its heartbeat."""
    with beat_process(tmp_path):
        wait_for(lambda: heartbeat_now().published_at is not None, 30, "a beat tick")
        code, lines = health_lines("--ping-timeout", "0.5", "--beat-max-age", "3")
    assert code == 1
    assert lines["workers"] == "FAIL workers   0 answering within 0.5 s (min 1)"
    assert lines["beat"].startswith("FAIL beat      ticking (last tick ")
    assert lines["beat"].endswith(
        "but no worker ever ran its heartbeat (limit 3.0 s):"
        " is a worker consuming notifier.deliver.critical?"
    )
    assert lines["broker"].startswith("ok   ") and lines["database"].startswith("ok   ")


def test_beat_stopped_is_told_from_beat_not_consumed(worker, tmp_path):
    """Beat ticking and consumed: ok. Beat stopped: the last tick ages past the limit."""
    with beat_process(tmp_path) as beat:
        wait_for(lambda: heartbeat_now().ran_at is not None, 30, "a heartbeat run")
        code, lines = health_lines("--check", "beat", "--beat-max-age", "2")
        assert code == 0 and lines["beat"].startswith("ok   beat  last tick "), lines
        stop_beat(beat)
    stopped = time.time()
    wait_for(lambda: time.time() - stopped > 2.5, 5)
    code, lines = health_lines("--check", "beat", "--beat-max-age", "2")
    assert code == 1
    assert lines["beat"].startswith("FAIL beat  last tick ")
    assert lines["beat"].endswith(" s ago (limit 2.0 s)")
    age = float(lines["beat"].split("last tick ")[1].split(" s ago")[0])
    assert 2.5 <= age < 15


def test_no_beat_ever(worker):
    code, lines = health_lines("--check", "beat", "--check", "workers")
    assert code == 1
    assert lines["beat"] == ("FAIL beat     no tick recorded:"
                             " is `celery -A notifier beat` running?")
    assert lines["workers"].startswith("ok   workers  1 answering")


def test_heartbeat_task_records_the_sending_time_from_its_message(worker):
    """Sent by any producer (not only beat), the heartbeat is stamped and recorded."""
    from notifier.worker.tasks import heartbeat

    before = time.time()
    heartbeat.apply_async(queue="notifier.deliver.critical")
    wait_for(lambda: heartbeat_now().ran_at is not None, 20, "the heartbeat to run")
    beat = heartbeat_now()
    assert before <= beat.published_at == beat.sent_at <= beat.ran_at <= time.time()


# --- Broker, database, queues, pending ----------------------------------------------


def test_unreachable_broker_and_database_fail_fast():
    """Everything down: one FAIL line per check naming what to fix, within seconds."""
    started = time.monotonic()
    code, lines = health_lines(env={
        "NOTIFIER_BROKER_URL": "redis://:secret@127.0.0.1:1/0",
        "NOTIFIER_REDIS_URL": "redis://:secret@127.0.0.1:1/0",  # set in RabbitMQ runs
        "NOTIFIER_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/x",
    })
    assert time.monotonic() - started < 15
    assert code == 1
    assert lines["broker"].startswith(
        "FAIL broker    cannot reach redis://:***@127.0.0.1:1/0: ")
    assert lines["workers"].startswith("FAIL workers   cannot ping: cannot reach redis://:***@")
    assert lines["queues"].startswith("FAIL queues    cannot reach ")
    assert lines["beat"].startswith("FAIL beat      cannot read the heartbeat from redis://:***@")
    assert lines["state"].startswith("FAIL state     cannot reach redis://:***@127.0.0.1:1/0: ")
    assert lines["database"] == ("FAIL database  cannot connect to"
                                 " postgresql+psycopg://postgres@127.0.0.1:1/x: Connection refused")
    assert lines["pending"].startswith("FAIL pending   cannot connect to ")
    assert all("secret" not in line for line in lines.values())


def test_database_behind_the_migrations():
    url = f"{SERVER_URL}/notifier_health_{os.getpid()}"
    try:
        assert run("db", "upgrade", "--revision", "0002",
                   env={"NOTIFIER_DATABASE_URL": url}).returncode == 0
        code, lines = health_lines("--check", "database", "--check", "pending",
                                   env={"NOTIFIER_DATABASE_URL": url})
        assert code == 1
        assert lines["database"] == (
            f"FAIL database  at 0002, head is {head_revision()}: run `notifier db upgrade`")
        assert lines["pending"] == (
            'FAIL pending   query failed: relation "aggregation_windows" does not exist')
    finally:
        admin = create_engine(f"{SERVER_URL}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(
                f"DROP DATABASE IF EXISTS notifier_health_{os.getpid()} WITH (FORCE)")
        admin.dispose()


def test_queue_over_the_limit():
    from notifier import client

    for n in range(3):
        client.notify("u", "report", f"waiting {n}")
    code, lines = health_lines("--check", "queues", "--max-queue-depth", "3")
    assert code == 0
    assert lines["queues"] == ("ok   queues  deepest notifier.normal 3, 3 in all"
                               " (limit 3 per queue)")
    code, lines = health_lines("--check", "queues", "--max-queue-depth", "2")
    assert code == 1
    assert lines["queues"] == "FAIL queues  notifier.normal 3 (limit 2 per queue)"


def _insert(sql: str) -> None:
    with session_scope() as session:
        session.execute(text(sql))


RECIPIENT = "INSERT INTO recipients (id) VALUES ('u');"
NOTE = ("INSERT INTO notifications (id, recipient_id, type, priority, title, status,"
        " window_id, created_at) VALUES ")


def test_pending_ignores_what_waits_in_windows_but_not_what_is_stuck():
    """Notifications waiting in an open window are not overdue however old; a delivery due
    200 s ago and not moving is."""
    _insert(
        RECIPIENT
        + "INSERT INTO aggregation_windows (id, recipient_id, type, mode, opened_at, due_at,"
          " latest_due_at, item_count, max_count) VALUES ('00000000-0000-7000-8000-000000000001',"
          " 'u', 'report', 'fixed', now() - interval '1 day', now() + interval '1 h',"
          " now() + interval '1 h', 2, 10);"
        + NOTE + "(gen_random_uuid(), 'u', 'report', 'normal', 't', 'pending',"
          " '00000000-0000-7000-8000-000000000001', now() - interval '1 day'),"
          " (gen_random_uuid(), 'u', 'report', 'normal', 't', 'pending',"
          " '00000000-0000-7000-8000-000000000001', now() - interval '2 h')"
    )
    code, lines = health_lines("--check", "pending")
    assert code == 0
    assert lines["pending"] == ("ok   pending  nothing overdue (limit 120 s);"
                                " 2 waiting in 1 windows")

    _insert(
        NOTE + "('00000000-0000-7000-8000-000000000002', 'u', 'report', 'normal', 't',"
        " 'dispatched', NULL, now() - interval '1 h');"
        "INSERT INTO deliveries (id, notification_id, recipient_id, channel, priority, status,"
        " next_attempt_at) VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000002',"
        " 'u', 'email', 'normal', 'queued', now() - interval '200 s'),"
        " (gen_random_uuid(), '00000000-0000-7000-8000-000000000002', 'u', 'inapp',"
        " 'normal', 'scheduled', now() + interval '1 day')"
    )
    result = run("health", "--check", "pending", "--json")
    assert result.returncode == 1
    check = json.loads(result.stdout)["checks"][0]
    assert check["name"] == "pending" and not check["ok"]
    assert check["summary"].startswith("a delivery (email, queued) due 2")
    assert check["summary"].endswith(" s ago (limit 120 s)")
    assert check["details"]["deliveries_over_limit"] == 1
    assert check["details"]["waiting_in_windows"] == 2
    assert run("health", "--check", "pending", "--max-pending-age", "300").returncode == 0


def test_stuck_work_by_kind():
    """The query behind the pending check: each kind of stuck work, its age."""
    _insert(
        RECIPIENT
        + "INSERT INTO aggregation_windows (id, recipient_id, type, mode, opened_at, due_at,"
          " latest_due_at, item_count, max_count) VALUES"
          " (gen_random_uuid(), 'u', 'a', 'fixed', now() - interval '1 h',"
          "  now() - interval '50 s', now(), 1, 10),"
          " (gen_random_uuid(), 'u', 'b', 'fixed', now() - interval '1 h',"
          "  now() - interval '10 s', now(), 1, 10);"
        + NOTE + "(gen_random_uuid(), 'u', 'legacy', 'low', 't', 'pending', NULL,"
          " now() - interval '30 s')"
    )
    with session_scope() as session:
        stuck = health.stuck_work(session, 20)
    assert stuck.delivery_overdue is None and stuck.deliveries_over_limit == 0
    assert 50 <= stuck.window_overdue < 60 and stuck.windows_over_limit == 1
    assert 30 <= stuck.unrouted_age < 40
    assert (stuck.windows, stuck.waiting_in_windows) == (2, 2)
    assert stuck.oldest[0] == "window"
    verdict = health.judge_stuck_work(stuck, 20)
    assert not verdict.ok
    assert verdict.summary.startswith("an aggregation window due 5")
    assert verdict.summary.endswith(" s ago, not flushed (limit 20 s)")


# --- Verdicts (no services) -------------------------------------------------------------


@pytest.mark.parametrize(("heartbeat", "ok", "summary"), [
    (Heartbeat(None, None, None, None), False,
     "no tick recorded: is `celery -A notifier beat` running?"),
    (Heartbeat(906.0, 906.0, 906.2, "w@h"), False, "last tick 94 s ago (limit 30 s)"),
    (Heartbeat(995.0, 980.0, 980.5, "w@h"), True,
     "last tick 5.0 s ago, run 500 ms after sending by w@h (limit 30 s)"),
    (Heartbeat(995.0, 900.0, 901.0, "w@h"), False,
     "ticking (last tick 5.0 s ago) but no worker ran its heartbeat for 99 s (limit 30 s):"
     " is a worker consuming notifier.deliver.critical?"),
    (Heartbeat(None, 990.0, 991.0, "w@h"), True,
     "last tick 10 s ago, run 1000 ms after sending by w@h (limit 30 s)"),
])
def test_judge_heartbeat(heartbeat, ok, summary):
    verdict = health.judge_heartbeat(heartbeat, 30, now=1000.0)
    assert (verdict.ok, verdict.summary) == (ok, summary)


def test_judge_queue_depths():
    assert health.judge_queue_depths({"a": 0, "b": None}, 5).summary == \
        "empty (limit 5 per queue)"
    verdict = health.judge_queue_depths({"a": 6, "b": 9, "c": 5, "d": None}, 5)
    assert (verdict.ok, verdict.summary) == (False, "b 9, a 6 (limit 5 per queue)")
    assert verdict.details["total"] == 20


def test_judge_stuck_work_counts_only_overdue_work():
    quiet = StuckWork(None, None, None, 0, None, 0, None, 500, 40)
    assert health.judge_stuck_work(quiet, 120).summary == \
        "nothing overdue (limit 120 s); 500 waiting in 40 windows"
    late = StuckWork(130.4, "webhook", "retrying", 3, 2.0, 0, None, 0, 0)
    verdict = health.judge_stuck_work(late, 120)
    assert (verdict.ok, verdict.summary) == (
        False, "a delivery (webhook, retrying) due 130 s ago, 3 due for over 120 s"
               " (limit 120 s)")
    fine = StuckWork(0.4, "inapp", "queued", 0, None, 0, None, 0, 0)
    assert health.judge_stuck_work(fine, 120).summary == \
        "oldest overdue: a delivery (inapp, queued) due 0.4 s ago (limit 120 s)"


def test_thresholds_from_settings_and_options():
    from notifier.settings import get_settings

    thresholds = health.Thresholds.from_settings(get_settings(), min_workers=3,
                                                 max_pending_age=None)
    assert thresholds.min_workers == 3
    assert thresholds.max_pending_age == get_settings().health_max_pending_age == 120


def test_cli_choices_match_the_checks():
    from notifier.ops.cli.health import health as command

    option = next(p for p in command.params if p.name == "checks")
    assert tuple(option.type.choices) == health.CHECK_NAMES


def test_beat_max_age_must_exceed_the_heartbeat_interval():
    result = run("health", env={"NOTIFIER_HEARTBEAT_INTERVAL": "10",
                                "NOTIFIER_HEALTH_BEAT_MAX_AGE": "5"})
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: NOTIFIER_HEALTH_BEAT_MAX_AGE: must be above NOTIFIER_HEARTBEAT_INTERVAL (10),"
        " got 5")


def test_heartbeat_records_round_trip():
    from notifier.storage.state import state_redis

    client = state_redis()
    headers: dict[str, object] = {}
    heartbeats.stamp_heartbeat(headers)
    heartbeats.record_heartbeat_published(client, headers)
    heartbeats.record_heartbeat_run(client, headers[heartbeats.SENT_AT_HEADER], "w@h", now=2e9)
    beat = heartbeats.read_heartbeat(client)
    assert beat.published_at == beat.sent_at == headers[heartbeats.SENT_AT_HEADER]
    assert (beat.ran_at, beat.worker) == (2e9, "w@h")
    assert abs(beat.last_tick - time.time()) < 5
