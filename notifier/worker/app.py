"""The Celery application: ``celery -A notifier worker|beat`` finds it as ``notifier.app``."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
from types import ModuleType
from typing import Any

from celery import Celery, signals

from notifier.settings import ConfigError
from notifier.worker import shutdown
from notifier.worker.lane import CriticalLane


def _load_celeryconfig() -> ModuleType:
    from notifier.worker import celeryconfig

    return celeryconfig


def _running_celery_command() -> bool:
    return os.path.basename(sys.argv[0]) in {"celery", "__main__.py"}


# Messages nesting a few hundred levels deep (bad input) must reach validation, which
# refuses them with a reason: Python's default limit of 1000 frames stops kombu's JSON
# decoding or the pickling for the pool before that, losing the message or the batch.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 4000))

try:
    _config = _load_celeryconfig()
except ConfigError as exc:
    if _running_celery_command():  # one line for the operator, not a traceback
        sys.exit(f"error: {exc}")
    raise

app = Celery("notifier", include=["notifier.worker.tasks", "notifier.worker.flush_loop"])
app.config_from_object(_config)
# Each worker consuming beat's queue runs a flush loop beside its pool (by name: the
# module imports this one).
app.steps["worker"].add("notifier.worker.flush_loop:FlushLoopStep")
# Pool processes beyond -c, kept for critical ingest batches (notifier/worker/lane.py).
app.steps["worker"].add(CriticalLane)


@signals.setup_logging.connect
def configure_logging(
    loglevel: str | int | None = None, logfile: str | None = None, **_: Any
) -> None:
    """Our log lines for workers and beat (task ids, item ids, masked URLs, JSON if
    asked); connecting this signal keeps Celery from setting up its own."""
    from notifier.logs import configure
    from notifier.settings import get_settings

    settings = get_settings()
    configure(loglevel or settings.log_level, logfile, settings.log_format == "json",
              settings.log_max_line_bytes)


@signals.worker_init.connect
def check_services_before_work(**_: Any) -> None:
    """Refuse to start a worker that cannot reach Postgres or has a bad rules file, with
    one line saying why."""
    from notifier.pipeline.rules import get_rules
    from notifier.storage.db import check_database

    try:
        get_rules()
        check_database()
    except ConfigError as exc:
        sys.exit(f"error: {exc}")


@signals.beat_init.connect
def check_rules_before_beat(**_: Any) -> None:
    """Beat schedules the flush: a bad rules file stops it at start, not at the first tick."""
    from notifier.pipeline.rules import get_rules

    try:
        get_rules()
    except ConfigError as exc:
        sys.exit(f"error: {exc}")


@signals.worker_init.connect
@signals.beat_init.connect
def check_channel_urls_at_start(**_: Any) -> None:
    """A bad channel URL stops the worker or beat with one line naming the variable,
    instead of a worker that starts happily and holds every delivery of the channel."""
    from notifier.channels import check_channel_urls
    from notifier.settings import get_settings

    try:
        check_channel_urls(get_settings())
    except ConfigError as exc:
        sys.exit(f"error: {exc}")


@signals.worker_init.connect
def start_metrics_endpoint(**_: Any) -> None:
    """Tidy the metrics directory of dead processes' files and, if asked, serve /metrics
    from the worker's main process (the pool's children write to the same directory)."""
    from notifier.settings import get_settings
    from notifier.worker import metrics

    metrics.remove_files_of_dead_processes()
    settings = get_settings()
    if settings.metrics_port:
        metrics.serve(settings.metrics_address, settings.metrics_port, settings)


@signals.task_prerun.connect
def mark_busy(**_: Any) -> None:
    shutdown.task_started()


@signals.task_postrun.connect
def mark_idle(**_: Any) -> None:
    shutdown.task_finished()


@signals.worker_process_init.connect
def freeze_startup_objects(**_: Any) -> None:
    """Move what the pool process inherited (modules, settings, the app) out of the
    collector's reach: ingest allocates fast, and every full collection walked all of it
    again (a fifth of ingest's Python time, measured in-process). Also keeps the pages
    shared with the parent after the fork."""
    gc.freeze()


@signals.worker_process_init.connect
def open_connections_early(**_: Any) -> None:
    """Open the pool process's Postgres connection and its broker connection now, beside
    its start, instead of inside its first job. With the critical lanes, a process may
    wait minutes for its first job, and that job is then a critical batch: measured
    under load, a fresh process took 50-60 ms to store one critical notification and
    another 20-25 ms to publish its delivery task, against 5-8 ms and 2 ms once warm.

    In a thread: a connect to an unreachable host may take longer than the few seconds
    the pool waits for a process to start. Failing here costs nothing: the first job
    connects as it always did."""
    threading.Thread(target=_open_connections, name="notifier-warm-up", daemon=True).start()


def _open_connections() -> None:
    from notifier.storage.db import get_engine

    with contextlib.suppress(Exception), get_engine().connect():
        pass  # the pool keeps it, checked (pre-ping) at its next checkout
    with contextlib.suppress(Exception), app.producer_or_acquire() as producer:
        # kombu opens a producer's channel (on Redis: its connection and a PING) when
        # first asked for it; the producer pool keeps both.
        _ = producer.channel


@signals.worker_shutting_down.connect
def tell_batches_to_return(**_: Any) -> None:
    """Warm shutdown: delivery batches in progress hand back what they have not sent."""
    shutdown.begin()


@signals.worker_process_shutdown.connect
def close_channel_connections(**_: Any) -> None:
    """Say goodbye to SMTP servers and HTTP pools instead of dropping the sockets, and
    drop the process's live gauges."""
    from notifier.channels import close_channels
    from notifier.worker import metrics

    close_channels()
    metrics.process_exited(os.getpid())
