"""Real worker processes for the tests, and waiting for what they commit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text

CELERY = str(Path(sys.executable).with_name("celery"))
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(
        cls, *extra_args: str, env: dict[str, str] | None = None, concurrency: int = 2
    ) -> WorkerProcess:
        """Start ``celery -A notifier worker`` and wait until it says it is ready."""
        log_fd, log_name = tempfile.mkstemp(prefix="worker-", suffix=".log")
        command = [
            CELERY, "-A", "notifier", "worker", "-c", str(concurrency), "-l", "info",
            "--without-mingle", "--without-gossip", "-n", f"test{os.getpid()}-{time.time_ns()}@%h",
            *extra_args,
        ]
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=log_fd, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        os.close(log_fd)
        worker = cls(process, Path(log_name))
        worker.wait_for_log("ready.", timeout=30)
        return worker

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited ({self.process.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker never logged {needle!r}:\n{self.log()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once, as an OOM killer would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def count_rows(sql: str = "SELECT count(*) FROM notifications", **params: object) -> int:
    from notifier.storage.db import session_scope

    with session_scope() as session:
        return session.execute(text(sql), params).scalar_one()


def wait_for(condition: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def wait_for_rows(expected: int, timeout: float = 30) -> None:
    try:
        wait_for(lambda: count_rows() >= expected, timeout, f"{expected} notifications")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; {count_rows()} stored") from None


def wait_for_count(sql: str, expected: int, timeout: float = 30, **params: object) -> None:
    """Until the query's count reaches ``expected`` (and say what it was if it never did)."""
    try:
        wait_for(lambda: count_rows(sql, **params) >= expected, timeout, f"{expected} from {sql}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; got {count_rows(sql, **params)}") from None
