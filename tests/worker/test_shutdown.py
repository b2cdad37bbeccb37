"""SIGTERM to a worker: its in-flight batch finishes or comes back, nothing lost or
sent twice, and the worker stops without waiting for a slow provider."""

from __future__ import annotations

import os
import signal
import time

from notifier.client import notify_many
from tests.pipeline.test_delivery_recovery import SENT, assert_each_sent_once
from tests.workers import WorkerProcess, count_rows, wait_for_count


def _send_one_batch(count: int) -> None:
    """Critical e-mails in one message: one ingest batch, one delivery task."""
    notify_many([
        {"recipient": {"id": f"s-{i}", "email": f"s-{i}@example.com"}, "type": "alert",
         "priority": "critical", "title": f"Alert {i}", "channels": ["email"]}
        for i in range(count)
    ])


def _stop_and_time(worker: WorkerProcess, whole_group: bool) -> float:
    started = time.monotonic()
    if whole_group:  # systemd's KillMode=control-group, an init that signals everyone
        os.killpg(worker.process.pid, signal.SIGTERM)
    else:  # docker stop / kubectl delete: SIGTERM to the worker's main process
        worker.process.send_signal(signal.SIGTERM)
    worker.process.wait(timeout=60)
    return time.monotonic() - started


def _sigterm_mid_delivery(smtp_server, whole_group: bool) -> None:
    smtp_server.delay = 0.5  # the whole batch would take 20 s
    env = {"NOTIFIER_CHANNELS__EMAIL": smtp_server.url()}
    worker = WorkerProcess.start(env=env, concurrency=1)
    _send_one_batch(40)
    smtp_server.wait_for(3, timeout=30)
    took = _stop_and_time(worker, whole_group)
    assert took < 10, f"the worker waited {took:.1f}s for its batch"
    assert worker.process.returncode == 0, worker.log()
    sent_before = count_rows(SENT)
    assert 3 <= sent_before < 40, worker.log()[-4000:]
    assert "WorkerLostError" not in worker.log()

    smtp_server.delay = 0.0
    successor = WorkerProcess.start(env=env)
    try:
        wait_for_count(SENT, 40, timeout=60)
    except TimeoutError:
        statuses = count_rows("SELECT string_agg(status || ':' || coalesce(last_error, ''), ', ')"
                              " FROM deliveries WHERE status <> 'sent'")
        logs = f"{worker.log()[-3000:]}\n{successor.log()[-3000:]}"
        raise AssertionError(f"{statuses}\n{logs}") from None
    finally:
        successor.stop()
    assert_each_sent_once(smtp_server, 40)
    assert count_rows("SELECT count(*) FROM deliveries WHERE attempts > 1") == 0


def test_sigterm_to_the_main_process_returns_the_rest_of_a_delivery_batch(smtp_server):
    _sigterm_mid_delivery(smtp_server, whole_group=False)


def test_sigterm_to_the_whole_process_group_returns_the_rest_too(smtp_server):
    _sigterm_mid_delivery(smtp_server, whole_group=True)


def test_sigterm_mid_ingest_loses_nothing():
    """Stopped while a backlog is being written: every notification lands once, by the
    stopped worker or by the next one."""
    worker = WorkerProcess.start(concurrency=2)
    for start in range(0, 20_000, 500):
        notify_many([{"recipient": f"r-{i % 50}", "type": "reminder", "title": f"n{i}"}
                     for i in range(start, start + 500)])
    wait_for_count("SELECT least(count(*), 1) FROM notifications", 1, timeout=30)
    _stop_and_time(worker, whole_group=True)
    assert worker.process.returncode == 0, worker.log()
    stored_before = count_rows()
    successor = WorkerProcess.start()
    try:
        wait_for_count("SELECT count(*) FROM notifications", 20_000, timeout=120)
    finally:
        successor.stop()
    assert stored_before <= 20_000
    assert count_rows("SELECT count(DISTINCT title) FROM notifications") == 20_000
