"""The pipeline under test: real worker processes, real beat, a real SMTP server.

* an **ingest worker** (``celery -A notifier worker -Q notifier.critical,…,notifier.low``),
* a **delivery worker** on every ``notifier.deliver.*`` queue (it also runs beat's flush
  and sweep tasks, which are routed to ``notifier.deliver.critical``),
* **beat** (``celery -A notifier beat``),
* an **aiosmtpd server** on 127.0.0.1 as the e-mail channel's target (the tests' own,
  ``tests/smtp_server.py``); the in-app channel writes to Postgres.

A supervisor thread restarts whatever exits, as systemd or Kubernetes would, and counts
every exit it did not cause as a crash; the logs are read at the end for pool processes
that died under a running worker.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from notifier.worker.queues import DELIVERY_QUEUES as DELIVER_QUEUES
from notifier.worker.queues import INGEST_QUEUES
from tests.smtp_server import SmtpServer
from tests.workers import CELERY, ROOT, WorkerProcess

ROLES = ("ingest", "deliver", "beat")

#: A pool process that died under its worker (Celery's own words); SIGTERM is ours, at
#: the end (the whole process group is told to stop).
_POOL_DEATH = re.compile(r"Process '[^']+' pid:\d+ exited with '(?!signal 15 )([^']+)'")
_LOG_COUNTERS = {
    "pool_process_deaths": _POOL_DEATH,
    "worker_lost_errors": re.compile(r"WorkerLostError"),
    "unrecoverable_errors": re.compile(r"Unrecoverable error"),
    "ingest_batches_requeued": re.compile(r"returning \d+ messages to the queue"),
    "task_errors": re.compile(r"Task notifier\.\w+\[[^\]]+\] raised unexpected"),
    "broker_connection_lost": re.compile(r"Connection to broker lost"),
    "ingest_commit_retries": re.compile(r"ingest commit failed"),
}


@dataclass
class BeatProcess(WorkerProcess):
    """``celery -A notifier beat`` in its own process group, started, watched and
    stopped as the tests' workers are (``tests/workers.py``)."""

    schedule: str = ""

    @classmethod
    def start(cls, env: dict[str, str]) -> BeatProcess:  # type: ignore[override]
        log_fd, log_name = tempfile.mkstemp(prefix="beat-", suffix=".log")
        schedule = tempfile.mktemp(prefix="chaos-beat-schedule-")
        process = subprocess.Popen(
            [CELERY, "-A", "notifier", "beat", "-l", "info", "--schedule", schedule],
            cwd=ROOT, stdout=log_fd, stderr=subprocess.STDOUT,
            env={**os.environ, **env}, start_new_session=True,
        )
        os.close(log_fd)
        beat = cls(process, Path(log_name), schedule)
        beat.wait_for_log("beat: Starting", timeout=30)
        return beat

    def stop(self) -> None:
        super().stop()
        for suffix in ("", ".db", ".dat", ".dir", ".bak"):
            Path(self.schedule + suffix).unlink(missing_ok=True)


Process = WorkerProcess | BeatProcess


@dataclass
class Crash:
    role: str
    pid: int
    returncode: int | None
    at: float


@dataclass
class Pipeline:
    """Start with :meth:`start`, stop with :meth:`stop` (or use it as a context)."""

    env: dict[str, str]
    smtp: SmtpServer
    ingest_concurrency: int = 2
    deliver_concurrency: int = 4
    processes: dict[str, Process] = field(default_factory=dict)
    #: Every process that ran, in order, for the logs.
    history: list[tuple[str, Process]] = field(default_factory=list)
    crashes: list[Crash] = field(default_factory=list)
    kills: list[dict[str, object]] = field(default_factory=list)
    failed_starts: int = 0
    #: What runs (``chaos.hosts`` runs each on several hosts).
    roles: tuple[str, ...] = ROLES

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._expected_down: set[str] = set()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    # --- life cycle -------------------------------------------------------------------

    def _launch(self, role: str) -> Process:
        if role == "ingest":
            return WorkerProcess.start(
                "-Q", ",".join(INGEST_QUEUES), env=self.env,
                concurrency=self.ingest_concurrency,
            )
        if role == "deliver":
            return WorkerProcess.start(
                "-Q", ",".join(DELIVER_QUEUES), "--prefetch-multiplier", "1", env=self.env,
                concurrency=self.deliver_concurrency,
            )
        return BeatProcess.start(self.env)

    def _start_role(self, role: str) -> Process:
        """Start ``role``, trying again while it cannot start (Postgres still down)."""
        while True:
            try:
                process = self._launch(role)
            except (RuntimeError, TimeoutError):
                self.failed_starts += 1
                if self._stopping.is_set():
                    raise
                time.sleep(1.0)
                continue
            with self._lock:
                self.processes[role] = process
                self.history.append((role, process))
            return process

    def start(self) -> Pipeline:
        """Start every process at once and the supervisor; returns when all are ready."""
        errors: list[BaseException] = []

        def start(role: str) -> None:
            try:
                self._start_role(role)
            except BaseException as exc:  # reported below, in this thread
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(role,)) for role in self.roles]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            self.stop()
            raise errors[0]
        self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                            name="chaos-supervisor")
        self._supervisor.start()
        return self

    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            for role in self.roles:
                with self._lock:
                    process = self.processes.get(role)
                    if process is None or role in self._expected_down:
                        continue
                    returncode = process.process.poll()
                    if returncode is None:
                        continue
                    self.crashes.append(Crash(role, process.process.pid, returncode, time.time()))
                    self._expected_down.add(role)
                try:
                    self._start_role(role)
                finally:
                    with self._lock:
                        self._expected_down.discard(role)

    def kill(self, role: str) -> dict[str, object]:
        """SIGKILL ``role`` with its pool processes at once, then start it again."""
        with self._lock:
            self._expected_down.add(role)
            process = self.processes[role]
        try:
            killed_at, started = time.monotonic(), time.time()
            process.kill()
            self._start_role(role)
            record = {"role": role, "pid": process.process.pid, "started": started,
                      "back_after_s": round(time.monotonic() - killed_at, 2)}
            self.kills.append(record)
            return record
        finally:
            with self._lock:
                self._expected_down.discard(role)

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=60)
        with self._lock:
            processes = list(self.processes.values())
        for process in processes:
            process.stop()

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- what happened ----------------------------------------------------------------

    def log_counts(self) -> dict[str, int]:
        """Counts of notable lines in every log of the run (pool deaths, requeues, …)."""
        counts = dict.fromkeys(_LOG_COUNTERS, 0)
        for _, process in self.history:
            text = process.log()
            for name, pattern in _LOG_COUNTERS.items():
                counts[name] += len(pattern.findall(text))
        return counts

    def figures(self, db: Any) -> dict[str, Any]:
        """Figures of this way of running the pipeline, for the result's details (and
        ``notes``); read before the logs are moved away."""
        return {}

    def worker_crashes(self) -> int:
        """Processes that exited without being killed by us, plus pool processes that
        died under a running worker."""
        return len(self.crashes) + self.log_counts()["pool_process_deaths"]

    def keep_logs(self, directory: Path, prefix: str) -> list[str]:
        """Copy every process's log into ``directory``; returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        kept = []
        generation: dict[str, int] = {}
        for role, process in self.history:
            generation[role] = generation.get(role, 0) + 1
            target = directory / f"{prefix}-{role}-{generation[role]}.log"
            shutil.copyfile(process.log_path, target)
            process.log_path.unlink(missing_ok=True)
            kept.append(str(target))
        return kept
