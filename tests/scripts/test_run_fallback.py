"""``make run`` on a machine where neither Postgres nor Redis answers, end to end.

The configured URLs point at ports where nothing listens, so ``scripts/run.py`` starts
the embedded servers (in a temp dir, never the repository's ``.notifier-data/``), a
worker, beat and Flower, sends the demo, and must show carol's digest in her inbox.
Then ``notifier status`` and ``notifier health`` run against the embedded servers as a
person would after ``. .notifier-data/env``, and everything is stopped.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "scripts" / "run.py"
NOTIFIER = Path(sys.executable).parent / "notifier"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_environment(tmp_path: Path) -> dict[str, str]:
    """This machine's environment without the test run's NOTIFIER_* settings, pointed at
    closed ports: what a newcomer without Postgres and Redis has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")}
    env.update({
        "NOTIFIER_DATABASE_URL":
            f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/notifier_run_fallback",
        "NOTIFIER_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        "NOTIFIER_FLOWER_PORT": str(free_port()),
        "NOTIFIER_API_PORT": str(free_port()),
        "NOTIFIER_METRICS_DIR": str(tmp_path / "metrics"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    })
    return env


def sourced(env: dict[str, str], env_file: Path) -> dict[str, str]:
    """``env`` after ``. env_file`` (the export lines local_services.py writes)."""
    exports = {}
    for line in env_file.read_text().splitlines():
        keyword, assignment = shlex.split(line)
        assert keyword == "export"
        name, _, value = assignment.partition("=")
        exports[name] = value
    return {**env, **exports}


@pytest.fixture
def places(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path, Path]]:
    """(environment, run dir, data dir); whatever ran is stopped afterwards."""
    env = clean_environment(tmp_path)
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    yield env, run_dir, data_dir
    subprocess.run([sys.executable, str(RUN), "stop", "--run-dir", str(run_dir),
                    "--data-dir", str(data_dir)], env=env, cwd=ROOT, capture_output=True,
                   timeout=120)


def notifier(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(NOTIFIER), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.slow
def test_make_run_delivers_the_demo_on_embedded_servers(places) -> None:
    env, run_dir, data_dir = places
    dirs = ["--run-dir", str(run_dir), "--data-dir", str(data_dir)]
    result = subprocess.run([sys.executable, str(RUN), *dirs], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in run_dir.glob("*.log"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert "No Postgres answers at" in result.stderr
    assert "No broker answers at" in result.stderr
    assert "carol's three alerts arrived as one digest in her inbox" in result.stdout, (
        result.stdout + logs)
    # The API runs with the demo page on; its address comes first under "Look further".
    demo = next(line.strip() for line in result.stdout.splitlines() if "/inbox/demo?" in line)
    assert demo == f"http://127.0.0.1:{env['NOTIFIER_API_PORT']}/inbox/demo?recipient=carol"
    assert httpx.get(demo, timeout=30).status_code == 200
    worker_log = (run_dir / "worker.log").read_text()
    assert "Redis URL must specify" not in worker_log
    assert "Traceback" not in worker_log

    embedded = sourced(env, data_dir / "env")
    assert embedded["NOTIFIER_BROKER_URL"].startswith("redis+socket://")
    status = notifier(embedded, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "Traceback" not in status.stderr
    assert "circuit" in status.stdout.lower() or "breaker" in status.stdout.lower(), status.stdout

    # Beat's first heartbeat may still be on its way: health settles within seconds.
    deadline = time.monotonic() + 60
    while True:
        health = notifier(embedded, "health")
        if health.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert health.returncode == 0, health.stdout + health.stderr
    assert all(line.startswith("ok ") for line in health.stdout.splitlines()), health.stdout

    stop = subprocess.run([sys.executable, str(RUN), "stop", *dirs], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    for name in ("api", "beat", "worker", "flower", "Redis", "Postgres"):
        assert f"Stopped {name}" in stop.stdout or f"Stopped the embedded {name}" in stop.stdout, (
            stop.stdout)
    assert not list(run_dir.glob("*.pid"))
    assert not (data_dir / "postgres.pid").exists() and not (data_dir / "redis.pid").exists()
