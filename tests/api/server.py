"""A real API server for the tests: ``notifier api`` in its own process on a free port,
with the run's database, Redis db and broker (``tests/conftest.py`` set the environment)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

NOTIFIER = str(Path(sys.executable).with_name("notifier"))
#: The key the servers of the tests sign recipient tokens with (tests mint with it too).
TOKEN_SECRET = "tests-recipient-token-secret-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ApiServer:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @classmethod
    def start(cls, env: dict[str, str] | None = None, workers: int = 1) -> ApiServer:
        """Start ``notifier api`` and wait until ``/v1/health`` answers."""
        port = free_port()
        log_fd, log_name = tempfile.mkstemp(prefix="api-", suffix=".log")
        process = subprocess.Popen(
            [NOTIFIER, "api", "--port", str(port), "--workers", str(workers)], cwd=ROOT,
            stdout=log_fd, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        os.close(log_fd)
        server = cls(process, f"http://127.0.0.1:{port}", Path(log_name))
        deadline = time.monotonic() + 90  # a loaded machine imports slowly
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"notifier api exited ({process.returncode}):\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/v1/health", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise TimeoutError(f"notifier api never answered:\n{server.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
