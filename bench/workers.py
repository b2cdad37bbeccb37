"""Real worker subprocesses: started per scenario, stopped whatever happens.

Each scenario gets a fresh worker on a freshly flushed Redis db, so no message, binding
or prefetched batch of one scenario leaks into the next. (The db is flushed *before*
the worker starts: flushing under a running worker would delete kombu's queue bindings
and make later publishes fail.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from celery import Celery

from bench.config import CONCURRENCY, REPO_ROOT, RESULTS_DIR, BenchConfig

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class WorkerSpec:
    """Which Celery app a worker runs and which queues it consumes."""

    name: str
    app: str
    queues: tuple[str, ...] = ()

    def command(self) -> list[str]:
        command = [
            sys.executable, "-m", "celery", "-A", self.app, "worker",
            "-c", str(CONCURRENCY), "--without-mingle", "--without-gossip",
            "-l", "warning", "-n", f"{self.name}@%h",
        ]
        if self.queues:
            command += ["-Q", ",".join(self.queues)]
        return command

    @property
    def nodename(self) -> str:
        return f"{self.name}@{socket.gethostname()}"


OURS = WorkerSpec("bench-notifier", "notifier")
NAIVE = WorkerSpec("bench-naive", "bench.naive", ("bench.naive",))


class Worker:
    """A running worker subprocess, its own process group, its log file."""

    def __init__(self, spec: WorkerSpec, config: BenchConfig):
        self.spec = spec
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path: Path = RESULTS_DIR / f"{spec.name}.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                spec.command(), cwd=REPO_ROOT, env=config.worker_environment(),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, broker_url: str) -> None:
        """Block until the worker answers a control ping (its consumer is running)."""
        control = Celery("bench-control", broker=broker_url)
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"worker {self.spec.name} exited; see {self.log_path}")
                if control.control.ping(destination=[self.spec.nodename], timeout=0.5):
                    return
            raise RuntimeError(f"worker {self.spec.name} not ready; see {self.log_path}")
        finally:
            control.close()

    def stop(self) -> None:
        """Warm shutdown (SIGTERM); kill the whole process group if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_TIMEOUT)
        # Pool children left behind, or a worker that ignored SIGTERM.
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def flush_broker(broker_url: str) -> None:
    """Empty the benchmark's broker: no queue, unacked message or binding survives (on
    RabbitMQ: no message in our queues or the baseline's)."""
    from bench import naive
    from bench.broker import empty
    from notifier.broker_topology import DEAD_LETTER_QUEUE
    from notifier.worker.queues import ALL_QUEUES

    empty(broker_url, [*ALL_QUEUES, DEAD_LETTER_QUEUE, naive.QUEUE])


@contextmanager
def running_worker(spec: WorkerSpec, config: BenchConfig) -> Iterator[Worker]:
    """A fresh worker on a flushed broker db for the length of the block."""
    flush_broker(config.broker_url)
    worker = Worker(spec, config)
    try:
        worker.wait_ready(config.broker_url)
        yield worker
    finally:
        worker.stop()
