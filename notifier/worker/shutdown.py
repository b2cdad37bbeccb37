"""Stopping a worker without losing or doubling what its batches hold.

A warm shutdown (SIGTERM to the worker) waits for the tasks in progress, but Celery
gives a task no way to know one has begun, and a long delivery batch would hold the
shutdown up until an orchestrator's grace period ends in SIGKILL mid-batch. So:

* the main process raises a flag in memory shared with the pool's processes (made
  before they are forked); a delivery batch that sees it returns its unsent deliveries
  to the queue after the message in hand, and the task ends normally;
* a pool process that gets SIGTERM itself (``docker stop`` through an init that signals
  the whole group, systemd's default ``KillMode``) while running a task does the same
  instead of dying mid-send; an idle one exits as before.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeAlias

#: What ``signal.signal`` returns: a function, ``SIG_DFL``/``SIG_IGN``, or None when the
#: handler was not installed from Python.
_Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

_stopping = multiprocessing.Value("b", 0, lock=False)
_signalled = False  # this pool process got SIGTERM while running a task
_busy = False
_previous_handler: _Handler = None


def begin() -> None:
    """In the worker's main process, when its shutdown starts."""
    _stopping.value = 1


def requested() -> bool:
    return bool(_stopping.value) or _signalled


def task_started() -> None:
    """In a pool process, as a task begins. The handler goes in here, not at process
    start: billiard resets the signal handlers after Celery's process initializer."""
    global _busy, _previous_handler
    if _previous_handler is None:
        _previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    _busy = True


def task_finished() -> None:
    global _busy, _signalled
    _busy = _signalled = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _signalled
    if _busy:
        _signalled = True
        return
    if callable(_previous_handler):  # billiard's: exits through ``finally`` blocks
        _previous_handler(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
