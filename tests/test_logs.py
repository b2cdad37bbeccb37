"""Worker log lines: JSON on request, the task and the items on each line, no secrets."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notifier.client import notify
from notifier.logs import ITEM_FIELDS, JsonFormatter, TaskContext, TextFormatter, mask_urls
from tests.brokers import foreign_producer
from tests.conftest import BROKER_URL
from tests.http_server import HttpServer, http_server_fixture  # noqa: F401
from tests.ops.test_cli import run
from tests.workers import WorkerProcess, count_rows, wait_for, wait_for_count


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


# --- Never raise, never unbounded -----------------------------------------------------


class Hostile:
    """A value whose text cannot be made."""

    def __str__(self) -> str:
        raise RuntimeError("no text for you")

    __repr__ = __str__


VALUES = (st.text() | st.integers() | st.floats() | st.binary() | st.none()
          | st.builds(Hostile) | st.lists(st.text(max_size=5) | st.builds(Hostile), max_size=5)
          | st.sampled_from(["x://[", "http://[::1", "http://h:99999/", "%s %d %(x)s"]))


@settings(max_examples=300, deadline=None)
@given(VALUES, st.lists(VALUES, max_size=3).map(tuple)
       | st.dictionaries(st.text(), VALUES).map(lambda d: (d,)),
       st.dictionaries(st.sampled_from(ITEM_FIELDS), VALUES))
def test_filter_and_formatters_never_raise(msg: object, args: object, extra: dict) -> None:
    """Any message, any arguments (too few, too many, of the wrong kind, a mapping), any
    extras: the filter and both formatters give a line, never an exception."""
    record = logging.LogRecord("notifier.x", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    assert TaskContext().filter(record)
    for formatter in (TextFormatter(1024), JsonFormatter(1024)):
        line = formatter.format(record)
        assert isinstance(line, str) and len(line.encode()) <= 1024
    json.loads(JsonFormatter(1024).format(record))


def test_malformed_urls_in_a_log_call_do_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    """On main, urlsplit raised ValueError inside the filter: a notification of type
    "x://[" made the ingest transaction's log.warning raise, and the batch looped."""
    log = logging.getLogger("notifier.test")
    handler = logging.StreamHandler()
    handler.addFilter(TaskContext())
    handler.setFormatter(TextFormatter())
    log.addHandler(handler)
    try:
        for bad in ("x://[", "http://[::1", "http://example.com:99999/", "a://u:p@[::1"):
            log.warning("rejected %s: type %r", "k", bad)
    finally:
        log.removeHandler(handler)


def test_lines_are_cut_to_the_limit_after_masking() -> None:
    huge = "smtp://u:pa'ss@h " + "word " * 20_000 + "x" * 100_000
    record = _record("value %s", huge, notification_ids=[f"n-{i}" for i in range(5000)])
    text = TextFormatter(2048).format(record)
    assert len(text.encode()) <= 2048 and text.endswith("bytes]") and "word word" in text
    assert "pa'ss" not in text and "smtp://u:***@h" in text
    line = JsonFormatter(2048).format(record)
    assert len(line.encode()) <= 2048
    entry = json.loads(line)
    assert entry["notification_ids_count"] == 5000 and entry["notification_ids"][0] == "n-0"
    assert entry["message"].startswith("value smtp://u:***@h")


def test_a_traceback_is_masked_and_cut() -> None:
    try:
        raise ValueError("cannot reach redis://:hunter2@h:6379/0 " + "y" * 50_000)
    except ValueError:
        import sys

        record = logging.LogRecord("notifier.x", logging.ERROR, __file__, 1, "failed", (),
                                   sys.exc_info())
    TaskContext().filter(record)
    for formatter in (TextFormatter(4096), JsonFormatter(4096)):
        line = formatter.format(record)
        assert "hunter2" not in line and len(line.encode()) <= 4096
        assert "redis://:***@h" in line


# --- A real worker's log, and what the CLI prints --------------------------------------

PASSWORD = "pa'ss@w0rd"
TOKEN = "XoXoTokenInThePath1234"


def test_secrets_never_reach_the_worker_log_nor_the_cli(http_server: HttpServer) -> None:
    """A password holding a quote and a token in a URL path, sent by a hostile producer
    as a notification type and as a recipient's addresses, and a webhook that fails
    with its token in the path: none of them is in the worker's log file or in
    `dead-letters list|show` or `recipients show`; their masked forms are. The type
    "x://[" is dead-lettered once, and the good notification beside it is stored."""
    http_server.respond_always(500)
    hook = http_server.url(f"/services/T000/B000/{TOKEN}")
    worker = WorkerProcess.start(env={"NOTIFIER_RETRY_MAX_ATTEMPTS": "2"}, concurrency=1)
    try:
        recipient = {"id": "leaky", "addresses": {
            "webhook": hook, "apprise": f"mailto://ops:{PASSWORD}@mail.example.com"}}
        foreign_producer("hostile", BROKER_URL).send_task("notifier.ingest", args=[[
            {"recipient": recipient, "type": f"smtp://u:{PASSWORD}@h", "title": "t"},
            {"recipient": "leaky", "type": "x://[", "title": "t"},
            {"recipient": recipient, "type": "alert", "title": "t", "channels": ["webhook"],
             "priority": "critical"},
        ]], queue="notifier.normal")
        wait_for(lambda: count_rows("SELECT count(*) FROM dead_letters") >= 3, timeout=60,
                 what="two rejections and the webhook delivery dead-lettered")
        worker.wait_for_log("is dead", timeout=10)
    finally:
        worker.stop()
    log = worker.log()
    assert PASSWORD not in log and "ss@w0rd" not in log and TOKEN not in log
    assert "smtp://u:***@h" in log and "/services/T000/B000/***" in log
    assert count_rows("SELECT count(*) FROM notifications") == 1
    assert count_rows("SELECT count(*) FROM dead_letters WHERE type = 'x://['") == 1

    listing = run("dead-letters", "list")
    shown = run("dead-letters", "list", "--json")
    rows = json.loads(shown.stdout)
    details = [run("dead-letters", "show", str(row["id"])).stdout for row in rows]
    recipient_shown = run("recipients", "show", "leaky", "--json")
    for output in (listing.stdout, shown.stdout, *details, recipient_shown.stdout):
        assert PASSWORD not in output and "ss@w0rd" not in output and TOKEN not in output
    addresses = json.loads(recipient_shown.stdout)["addresses"]
    assert addresses == {"webhook": http_server.url("/services/T000/B000/***"),
                         "apprise": "mailto://ops:***@mail.example.com"}
    rejected = next(json.loads(d) for d in details if '"apprise"' in d)
    assert rejected["payload"]["recipient"]["addresses"] == addresses  # masked alike
