"""Log lines an operator can search: the task and the notifications or deliveries they
concern on every line, JSON if asked (``NOTIFIER_LOG_FORMAT=json``), never a secret.

Workers and beat configure logging here (Celery's ``setup_logging`` signal), so every
line, Celery's own included, goes through the same filter: it adds the running task's
id and name, and hides every secret a message or traceback carries
(``notifier.masking``). No log call ever raises, whatever its arguments, and every line
is cut to ``NOTIFIER_LOG_MAX_LINE_BYTES``. Code that knows which items a line is about
passes them as ``extra`` (``notification_id(s)``, ``delivery_id(s)``, ``channel``; a
batch of ingest messages names their ``task_ids``, as celery-batches runs it outside any
one task).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from notifier.masking import MAX_USERINFO, mask_secrets

#: Fields a log call may pass in ``extra`` that name what the line is about.
ITEM_FIELDS = ("notification_id", "notification_ids", "delivery_id", "delivery_ids",
               "digest_id", "channel", "recipient_id", "task_ids")
#: How many ids of a list a text line shows (JSON lines carry them all, if they fit).
TEXT_IDS_SHOWN = 5
#: Longest line when no setting says otherwise (``NOTIFIER_LOG_MAX_LINE_BYTES``).
DEFAULT_MAX_LINE_BYTES = 8192
#: Text is cut (at a word boundary) to the line's limit plus this margin before it is
#: masked: masking megabytes costs time, and whatever lies past the limit is cut anyway.
#: The margin covers the furthest masking looks ahead (a password's closing ``@``, a
#: quoted value), so what stays on the line is masked exactly as if nothing were cut.
MASK_MARGIN = 2 * MAX_USERINFO


def mask_urls(text: str) -> str:
    """``text`` with every secret hidden (``notifier.masking.mask_secrets``)."""
    return mask_secrets(text)


def masked(text: object, limit: int = DEFAULT_MAX_LINE_BYTES + MASK_MARGIN) -> str:
    """Any value as masked text of at most about ``limit`` characters; never raises."""
    return mask_secrets(_cut_at_word(_safe_str(text), limit))


def cut_line(text: str, max_bytes: int) -> str:
    """``text`` cut to ``max_bytes`` of UTF-8, saying how much was cut; a lone surrogate
    (which no log file can encode) is written as its escape."""
    raw = text.encode("utf-8", "backslashreplace")
    if len(raw) <= max_bytes:
        return raw.decode("utf-8")
    marker = f" [cut: {len(raw):,} bytes]"
    keep = max(0, max_bytes - len(marker))
    return raw[:keep].decode("utf-8", "ignore") + marker


class TaskContext(logging.Filter):
    """Adds the running Celery task to each record and masks secrets in the message.

    Never raises, whatever the record holds (arguments that do not match the format, a
    message whose ``str`` fails, megabytes of text): a log call must never abort the
    work it reports on.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        super().__init__()
        self.max_bytes = max_bytes

    def filter(self, record: logging.LogRecord) -> bool:
        record.task_id = record.task_name = None
        try:
            from celery._state import get_current_task

            task = get_current_task()
            request = getattr(task, "request", None)
            record.task_id = getattr(request, "id", None) if task else None
            record.task_name = getattr(task, "name", None) if task else None
        except Exception:  # the line is worth more than its task id
            pass
        record.msg = masked(_message(record), self.max_bytes + MASK_MARGIN)
        record.args = ()
        return True


class TextFormatter(logging.Formatter):
    """``[time: LEVEL/process] task[id]: message key=value …``, at most ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        super().__init__("[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")
        self.max_bytes = max_bytes

    def format(self, record: logging.LogRecord) -> str:
        try:
            line = super().format(record)
            head, _, rest = line.partition("] ")
            task = getattr(record, "task_name", None)
            task_id = getattr(record, "task_id", None)
            if task and task_id and str(task_id) not in rest:
                rest = f"{task}[{task_id}]: {rest}"
            items = " ".join(f"{key}={_short(getattr(record, key))}"
                             for key in ITEM_FIELDS if hasattr(record, key))
            line = masked(f"{head}] {rest}" + (f" ({items})" if items else ""),
                          self.max_bytes + MASK_MARGIN)
        except Exception as exc:
            line = _unformattable(record, exc)
        return cut_line(line, self.max_bytes)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, at most ``max_bytes``: long strings and lists are cut
    (a list keeps its first items and ``<field>_count`` says how many there were)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        super().__init__()
        self.max_bytes = max_bytes

    def format(self, record: logging.LogRecord) -> str:
        try:
            entry = self._entry(record)
        except Exception as exc:
            entry = {"level": "ERROR", "message": _unformattable(record, exc)}
        return _bounded_json(entry, self.max_bytes)

    def _entry(self, record: logging.LogRecord) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": masked(_message(record), self.max_bytes + MASK_MARGIN),
        }
        task_id = getattr(record, "task_id", None)
        if task_id:
            entry["task_id"] = masked(task_id)
            entry["task"] = masked(getattr(record, "task_name", None))
        for key in ITEM_FIELDS:
            if hasattr(record, key):
                entry[key] = _json_value(getattr(record, key))
        if record.exc_info:
            entry["exception"] = masked(self.formatException(record.exc_info),
                                        self.max_bytes + MASK_MARGIN)
        return entry


def _message(record: logging.LogRecord) -> str:
    """The record's message, or, if it cannot be formatted, its parts as they are."""
    try:
        return record.getMessage()
    except Exception as exc:
        return (f"{_safe_str(record.msg)} [log arguments did not format:"
                f" {type(exc).__name__}: {_safe_str(record.args)}]")


def _unformattable(record: logging.LogRecord, exc: Exception) -> str:
    level = getattr(record, "levelname", "?")
    return masked(f"[{level}] could not format a log line ({type(exc).__name__}):"
                  f" {_safe_str(getattr(record, 'msg', ''))}", 4096)


def _json_value(value: Any) -> Any:
    if isinstance(value, list | tuple | set | frozenset):
        return [masked(item, 1024) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return masked(value, 4096)


def _bounded_json(entry: dict[str, Any], max_bytes: int) -> str:
    """The entry as one JSON line of at most ``max_bytes``: long strings, then long
    lists, are cut until it fits (JSON escapes make a string's size hard to foresee)."""
    try:
        line = json.dumps(entry, default=_safe_str)
        share = max_bytes // 2
        while len(line) > max_bytes and share >= 16:
            entry = _shrunk(entry, share)
            line = json.dumps(entry, default=_safe_str)
            share //= 2
    except Exception:
        line = ""
    if not line or len(line) > max_bytes:
        line = json.dumps({"level": entry.get("level"), "message": "[log line too long]"})
    return line


def _shrunk(entry: dict[str, Any], share: int) -> dict[str, Any]:
    shrunk: dict[str, Any] = {}
    for key, value in entry.items():
        if isinstance(value, str) and len(value) > share:
            value = cut_line(value, share)
        elif isinstance(value, list) and len(json.dumps(value, default=_safe_str)) > share:
            shrunk[f"{key}_count"] = entry.get(f"{key}_count", len(value))
            value = value[: max(1, len(value) // 4)]
        shrunk.setdefault(key, value)
    return shrunk


def _short(value: Any) -> str:
    if isinstance(value, list | tuple | set):
        items = [_safe_str(v) for v in value]
        more = f",+{len(items) - TEXT_IDS_SHOWN}" if len(items) > TEXT_IDS_SHOWN else ""
        return ",".join(items[:TEXT_IDS_SHOWN]) + more
    return _safe_str(value)


def _cut_at_word(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    head = head[: space + 1] if space >= 0 else ""
    return f"{head}[cut: {len(text) - len(head):,} more characters]"


def _safe_str(value: object) -> str:
    try:
        return value if isinstance(value, str) else str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def configure(
    level: str | int, logfile: str | None = None, json_lines: bool = False,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> None:
    """Route every logger through one handler with our filter and formatter."""
    handler: logging.Handler = (
        logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    )
    handler.addFilter(TaskContext(max_line_bytes))
    handler.setFormatter(
        JsonFormatter(max_line_bytes) if json_lines else TextFormatter(max_line_bytes)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("celery", "celery.task", "celery.redirected", "kombu", "amqp"):
        logging.getLogger(name).handlers.clear()  # everything through the root handler
        logging.getLogger(name).propagate = True
