"""A benchmark run ended by SIGTERM (``kill``, ``timeout``) takes its workers with it.

The workers run in sessions of their own (so that one can be killed with its pool), so
nothing but the run's own ``finally`` blocks stops them: a run killed at Python's
default SIGTERM left a worker ingesting on the machine, skewing whatever ran next.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.config import REPO_ROOT


def processes_with(environment_entry: str) -> list[int]:
    """Pids of the processes whose environment holds ``environment_entry``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if environment_entry.encode() in environ:
            found.append(int(entry.name))
    return found


def test_sigterm_stops_the_runs_worker(database: str, tmp_path: Path) -> None:
    from tests.conftest import BROKER_URL, STATE_REDIS_URL

    # A marker in the environment the run hands its worker: only this run's processes.
    marker = f"NOTIFIER_BENCH_SIGNAL_TEST={tmp_path.name}"
    env = {**os.environ, "NOTIFIER_BENCH_SIGNAL_TEST": tmp_path.name,
           "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.Popen(
        [sys.executable, "-m", "bench", "--no-plots", "--no-profile", "--count", "200000",
         "--criticals", "1000", "--database-url", database, "--broker-url", BROKER_URL,
         "--redis-url", STATE_REDIS_URL, "--only", "critical_under_backlog"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not [pid for pid in processes_with(marker) if pid != run.pid]:
            assert run.poll() is None, "the benchmark ended before its worker started"
            assert time.monotonic() < deadline, "no worker started within 60 s"
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while processes_with(marker):
            assert time.monotonic() < deadline, (
                f"still running 30 s after the run ended: {processes_with(marker)}")
            time.sleep(0.2)
    finally:
        if run.poll() is None:
            run.kill()
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)
