"""Worker log lines: JSON on request, the task and the items on each line, no secrets."""

from __future__ import annotations

import json
import logging

from notifier.client import notify
from notifier.logs import JsonFormatter, TaskContext, TextFormatter, mask_urls
from tests.workers import WorkerProcess, wait_for_count


def test_urls_are_masked_wherever_they_appear():
    text = ("cannot reach smtp://mailer:hunter2@mail.example.com:587?from=a%40b.c and "
            "https://hooks.example.com/x?token=s3cr3t&x=1")
    masked = mask_urls(text)
    assert "hunter2" not in masked and "s3cr3t" not in masked
    assert "smtp://mailer:***@mail.example.com:587" in masked
    assert "x=1" in masked


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("notifier.delivery", logging.WARNING, __file__, 1, message,
                               args, None)
    record.__dict__.update(extra)
    TaskContext().filter(record)
    return record


def test_text_lines_name_the_items():
    record = _record("delivery %s is dead: %s", "d-1", "550 via smtp://u:pw@h:25",
                     delivery_id="d-1", channel="email")
    line = TextFormatter().format(record)
    assert line.endswith("is dead: 550 via smtp://u:***@h:25 (delivery_id=d-1 channel=email)")


def test_json_lines_carry_every_id():
    ids = [f"n-{i}" for i in range(8)]
    entry = json.loads(JsonFormatter().format(_record("batch refused", notification_ids=ids)))
    assert entry["notification_ids"] == ids
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "WARNING", "notifier.delivery", "batch refused")


def test_worker_writes_json_lines_with_task_and_delivery_ids():
    """A worker whose SMTP server (with a password in its URL) refuses connections logs
    the retries as JSON lines naming the task and the delivery, and never the password."""
    env = {"NOTIFIER_LOG_FORMAT": "json",
           "NOTIFIER_CHANNELS__EMAIL": "smtp://mailer:hunter2@127.0.0.1:9?timeout=1&from=alerts%40example.com"}
    worker = WorkerProcess.start(env=env, concurrency=1)
    try:
        notify(recipient={"id": "log-1", "email": "log-1@example.com"}, type="alert",
               title="Disk full", priority="critical", channels=["email"])
        wait_for_count("SELECT count(*) FROM deliveries WHERE attempts >= 1", 1, timeout=30)
        worker.wait_for_log("retrying in", timeout=10)
    finally:
        worker.stop()
    log = worker.log()
    assert "hunter2" not in log
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    retry = next(e for e in entries if "retrying in" in e["message"])
    assert retry["task"] == "notifier.deliver" and retry["task_id"]
    assert retry["delivery_id"] and retry["channel"] == "email"
    assert any(e["message"].startswith("Task notifier.deliver") for e in entries)
    stored = next(e for e in entries if e["message"].startswith("stored 1 notifications"))
    assert stored["notification_ids"] == [retry["notification_id"]]
    assert len(stored["task_ids"]) == 1  # the ingest message's task id
