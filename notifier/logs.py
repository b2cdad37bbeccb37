"""Log lines an operator can search: the task and the notifications or deliveries they
concern on every line, JSON if asked (``NOTIFIER_LOG_FORMAT=json``), never a secret.

Workers and beat configure logging here (Celery's ``setup_logging`` signal), so every
line, Celery's own included, goes through the same filter: it adds the running task's
id and name, and masks passwords and secret options in any URL a message or traceback
carries. Code that knows which items a line is about passes them as ``extra``
(``notification_id(s)``, ``delivery_id(s)``, ``channel``; a batch of ingest messages
names their ``task_ids``, as celery-batches runs it outside any one task).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from notifier.settings import mask_url

#: Fields a log call may pass in ``extra`` that name what the line is about.
ITEM_FIELDS = ("notification_id", "notification_ids", "delivery_id", "delivery_ids",
               "digest_id", "channel", "recipient_id", "task_ids")
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
#: How many ids of a list a text line shows (JSON lines carry them all).
TEXT_IDS_SHOWN = 5


def mask_urls(text: str) -> str:
    """Every URL in ``text`` with its password and secret options hidden."""
    return _URL.sub(lambda match: mask_url(match.group(0)), text)


class TaskContext(logging.Filter):
    """Adds the running Celery task to each record and masks URLs in the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        from celery._state import get_current_task

        task = get_current_task()
        request = getattr(task, "request", None)
        record.task_id = getattr(request, "id", None) if task else None
        record.task_name = getattr(task, "name", None) if task else None
        record.msg = mask_urls(record.getMessage())
        record.args = ()
        return True


class TextFormatter(logging.Formatter):
    """``[time: LEVEL/process] task[id]: message key=value …``."""

    def __init__(self) -> None:
        super().__init__("[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        head, _, rest = line.partition("] ")
        task = getattr(record, "task_name", None)
        if task and getattr(record, "task_id", None) and record.task_id not in rest:
            rest = f"{task}[{record.task_id}]: {rest}"
        items = " ".join(
            f"{key}={_short(getattr(record, key))}" for key in ITEM_FIELDS if hasattr(record, key)
        )
        return mask_urls(f"{head}] {rest}" + (f" ({items})" if items else ""))


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        if getattr(record, "task_id", None):
            entry["task_id"] = record.task_id
            entry["task"] = record.task_name
        for key in ITEM_FIELDS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = mask_urls(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def _short(value: Any) -> str:
    if isinstance(value, list | tuple | set):
        items = [str(v) for v in value]
        more = f",+{len(items) - TEXT_IDS_SHOWN}" if len(items) > TEXT_IDS_SHOWN else ""
        return ",".join(items[:TEXT_IDS_SHOWN]) + more
    return str(value)


def configure(level: str | int, logfile: str | None = None, json_lines: bool = False) -> None:
    """Route every logger through one handler with our filter and formatter."""
    handler: logging.Handler = (
        logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    )
    handler.addFilter(TaskContext())
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("celery", "celery.task", "celery.redirected", "kombu", "amqp"):
        logging.getLogger(name).handlers.clear()  # everything through the root handler
        logging.getLogger(name).propagate = True
