"""scripts/local_services.py: embedded Postgres and Redis when the configured ones are away.

These run the script as ``make run`` does, in a process of its own, against a temporary
data dir (never the repository's ``.notifier-data/``).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis
from kombu import Connection
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "local_services.py"
REAL_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/notifier_run_probe"
REAL_BROKER_URL = "redis://127.0.0.1:6379/11"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("local_services", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


local_services = _load_script()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_script(*args: str, database_url: str, broker_url: str,
               state_url: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "NOTIFIER_DATABASE_URL": database_url,
           "NOTIFIER_BROKER_URL": broker_url}
    env.pop("NOTIFIER_REDIS_URL", None)
    if state_url is not None:
        env["NOTIFIER_REDIS_URL"] = state_url
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def parse_exports(stdout: str) -> dict[str, str]:
    exports = {}
    for line in stdout.splitlines():
        keyword, assignment = shlex.split(line)
        assert keyword == "export"
        name, _, value = assignment.partition("=")
        exports[name] = value
    return exports


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data dir whose embedded servers are stopped whatever the test did."""
    path = tmp_path / "data"
    yield path
    subprocess.run([sys.executable, str(SCRIPT), "stop", "--data-dir", str(path)],
                   capture_output=True, timeout=60)


@pytest.mark.slow
def test_embedded_servers_start_answer_and_stop(data_dir: Path) -> None:
    """With nothing listening, both embedded servers start, their URLs answer, stop ends them."""
    unreachable = {
        "database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/notifier_run_t",
        "broker_url": f"redis://127.0.0.1:{free_port()}/11",
    }
    started = time.monotonic()
    result = run_script("--data-dir", str(data_dir), **unreachable)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 15, f"embedded start took {elapsed:.1f}s"

    messages = result.stderr.splitlines()
    assert len(messages) == 2, result.stderr
    assert messages[0].startswith(f"No Postgres answers at {unreachable['database_url']};")
    assert messages[1].startswith(f"No broker answers at {unreachable['broker_url']};")
    exports = parse_exports(result.stdout)
    assert set(exports) == {"NOTIFIER_DATABASE_URL", "NOTIFIER_BROKER_URL"}
    assert (data_dir / "env").read_text() == result.stdout

    database_url, broker_url = exports["NOTIFIER_DATABASE_URL"], exports["NOTIFIER_BROKER_URL"]
    assert make_url(database_url).database == "notifier_run_t"
    engine = create_engine(make_url(database_url).set(database="postgres"))
    with engine.connect() as connection:
        assert connection.execute(text("SELECT 1")).scalar() == 1
    engine.dispose()

    assert broker_url.startswith("redis+socket:///")
    client = redis.Redis(unix_socket_path=broker_url.removeprefix("redis+socket://"))
    assert client.ping()
    client.close()
    with Connection(broker_url) as connection:  # the form Celery is given
        connection.ensure_connection(max_retries=1)

    pids = {name: local_services.read_pid(data_dir / f"{name}.pid")
            for name in ("postgres", "redis")}
    again = run_script("--data-dir", str(data_dir), **unreachable)
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout
    assert pids == {name: local_services.read_pid(data_dir / f"{name}.pid") for name in pids}

    stop = run_script("stop", "--data-dir", str(data_dir), **unreachable)
    assert stop.returncode == 0, stop.stderr
    assert not local_services.process_alive(pids["redis"])
    assert not local_services.process_alive(pids["postgres"])
    assert not (data_dir / "env").exists()


@pytest.mark.slow
def test_a_state_redis_that_does_not_answer_gets_the_embedded_one(data_dir: Path) -> None:
    """NOTIFIER_REDIS_URL set to a Redis that is not there: the embedded Redis serves it
    (db 1), said in one line naming the variable's URL; the others are left alone."""
    if not (local_services.postgres_answers(REAL_DATABASE_URL)
            and local_services.broker_answers(REAL_BROKER_URL)):
        pytest.skip("no Postgres at 127.0.0.1:5432 or no Redis at 127.0.0.1:6379")
    state_url = f"redis://127.0.0.1:{free_port()}/2"
    result = run_script("--data-dir", str(data_dir), database_url=REAL_DATABASE_URL,
                        broker_url=REAL_BROKER_URL, state_url=state_url)
    assert result.returncode == 0, result.stderr
    said = result.stderr.splitlines()
    assert len(said) == 1 and said[0].startswith(f"No state Redis answers at {state_url};")
    exports = parse_exports(result.stdout)
    assert set(exports) == {"NOTIFIER_REDIS_URL"}
    assert exports["NOTIFIER_REDIS_URL"].startswith("unix:///")
    assert exports["NOTIFIER_REDIS_URL"].endswith("?db=1")
    client = redis.Redis.from_url(exports["NOTIFIER_REDIS_URL"])
    assert client.ping()
    client.close()


def test_nothing_is_said_when_both_services_answer(tmp_path: Path) -> None:
    """With the machine's Postgres and Redis answering, the script exports nothing."""
    if not (local_services.postgres_answers(REAL_DATABASE_URL)
            and local_services.broker_answers(REAL_BROKER_URL)):
        pytest.skip("no Postgres at 127.0.0.1:5432 or no Redis at 127.0.0.1:6379")
    data_dir = tmp_path / "data"
    result = run_script("--data-dir", str(data_dir),
                        database_url=REAL_DATABASE_URL, broker_url=REAL_BROKER_URL)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    assert (data_dir / "env").read_text() == ""
    assert not (data_dir / "postgres").exists()
