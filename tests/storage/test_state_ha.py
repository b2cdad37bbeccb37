"""The state Redis in high availability: a Sentinel failover keeps the circuits and rate
windows, the broker and the state Redis are reached through Sentinel by a real worker,
producer and ``notifier health``, and workers whose clocks disagree share one window.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from notifier.pipeline.breaker import CircuitBreaker
from notifier.pipeline.ratelimit import RateLimiter, RateRequest
from notifier.settings import get_settings
from notifier.storage.state import connect, describe
from tests.conftest import BROKER_URL
from tests.ops.test_cli import run
from tests.redis_servers import MASTER_NAME, sentinel_topology
from tests.workers import ROOT, WorkerProcess, wait_for_count


@pytest.fixture
def sentinel() -> Iterator[Any]:
    with sentinel_topology() as topology:
        yield topology


def test_circuits_and_rate_windows_survive_a_sentinel_failover(sentinel):
    """State written before ``SENTINEL FAILOVER`` (and acknowledged by the replica) is on
    the promoted master, and the same client follows the Sentinel there: it reads the
    open circuit and the full window, and its next writes land on the new master."""
    settings = get_settings().model_copy(update={
        "redis_url": sentinel.url, "redis_sentinel_master": MASTER_NAME,
        "rate_limit_per_minute": 0, "rate_limit_per_hour": 0, "rate_limit_per_day": 2,
    })
    client = connect(settings)
    assert describe(client) == f"master {MASTER_NAME} at 127.0.0.1:{sentinel.master}"
    email = CircuitBreaker(client, "email", threshold=1, window=60, open_seconds=600)
    assert email.record(failures=1, successes=0, probing=False) == "open"
    opened = email.acquire()
    limiter = RateLimiter(client, settings)
    assert limiter.take([RateRequest("r-1"), RateRequest("r-1")]) == [0.0, 0.0]
    assert client.wait(1, 10_000) == 1  # the replica has acknowledged all of it

    promoted = sentinel.failover()

    assert promoted == sentinel.replica
    assert email.acquire() == opened
    [held] = limiter.take([RateRequest("r-1")])
    assert held > 0 and held % 86400 == 0  # held to the day's end
    webhook = CircuitBreaker(client, "webhook", threshold=1, window=60, open_seconds=600)
    assert webhook.record(failures=1, successes=0, probing=False) == "open"
    assert limiter.take([RateRequest("r-2")]) == [0.0]
    new_master = sentinel.servers.client(promoted)
    assert new_master.hget(email.key, "state") == b"open"
    assert new_master.hget(webhook.key, "state") == b"open"
    assert int(new_master.get("notifier.rate.{r-1}.day") or 0) == 2
    assert int(new_master.get("notifier.rate.{r-2}.day") or 0) == 1
    assert describe(client) == f"master {MASTER_NAME} at 127.0.0.1:{promoted}"
    client.close()


def test_a_worker_producer_and_health_reach_broker_and_state_through_sentinel(sentinel):
    """``sentinel://`` as the broker URL: a producer publishes, a worker ingests and
    delivers, the circuits and windows land on the master the Sentinel names (the state
    Redis defaults to the broker's), and ``notifier health`` checks both through it."""
    env = {"NOTIFIER_BROKER_URL": sentinel.url, "NOTIFIER_BROKER_SENTINEL_MASTER": MASTER_NAME}
    worker = WorkerProcess.start(env=env)
    try:
        subprocess.run(
            [sys.executable, "-c", "from notifier.client import notify; notify("
             "'ha-user', 'alert', 'through sentinel', channels=['inapp'], priority='critical')"],
            cwd=ROOT, env={**os.environ, **env}, check=True, timeout=60,
        )
        wait_for_count("SELECT count(*) FROM deliveries WHERE status = 'sent'", 1, timeout=60)
        result = run("health", "--json", "--check", "broker", "--check", "state",
                     "--check", "workers", env=env)
    finally:
        worker.stop()
    master = sentinel.servers.client(sentinel.master_port())
    assert int(master.get("notifier.rate.{ha-user}.day") or 0) == 1
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    checks = {check["name"]: check for check in report["checks"]}
    assert checks["state"]["details"]["server"] == (
        f"master {MASTER_NAME} at 127.0.0.1:{sentinel.master}")
    assert checks["state"]["summary"].startswith(f"{sentinel.url}: master {MASTER_NAME} at ")


def test_health_fails_in_one_line_when_no_sentinel_answers():
    code = run("health", "--check", "state", "--timeout", "1", env={
        "NOTIFIER_REDIS_URL": "sentinel://:secret@127.0.0.1:1/0;sentinel://127.0.0.1:2/0",
        "NOTIFIER_REDIS_SENTINEL_MASTER": MASTER_NAME,
    })
    assert code.returncode == 1
    assert code.stdout.startswith(
        "FAIL state  cannot reach sentinel://:***@127.0.0.1:1/0;sentinel://127.0.0.1:2/0: ")
    assert "secret" not in code.stdout and len(code.stdout.splitlines()) == 1


_TAKER = """
import json, sys, time
from notifier.pipeline.breaker import CircuitBreaker
from notifier.pipeline.ratelimit import RateLimiter, RateRequest
from notifier.settings import get_settings
from notifier.storage.state import state_redis

settings = get_settings().model_copy(update={
    "rate_limit_per_minute": 0, "rate_limit_per_hour": 0, "rate_limit_per_day": 5,
})
waits = RateLimiter(state_redis(), settings).take([RateRequest("skewed")] * int(sys.argv[1]))
breaker = CircuitBreaker(state_redis(), "skewed", threshold=2, window=3600, open_seconds=600)
state = breaker.record(failures=1, successes=0, probing=False)
print(json.dumps({"clock": time.time(), "waits": waits, "state": state,
                  "retry_at": breaker.acquire().retry_at}))
"""


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime (apt-get)")
def test_workers_whose_clocks_disagree_share_one_rate_window_and_one_circuit():
    """Two processes, their clocks 3 h behind and 2 h ahead (libfaketime): the daily
    window counts both (5 in all, then held to the day's end by the server's clock), and
    the circuit both count towards opens once, half-opening at one time for both."""

    def taker(offset: str, count: int) -> dict[str, Any]:
        result = subprocess.run(
            ["faketime", "-f", offset, sys.executable, "-c", _TAKER, str(count)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={**os.environ, "NOTIFIER_BROKER_URL": BROKER_URL},
        )
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    behind = taker("-3h", 3)
    ahead = taker("+2h", 3)
    assert ahead["clock"] - behind["clock"] > 4.9 * 3600  # the clocks really disagree
    assert behind["waits"] == [0.0, 0.0, 0.0]
    assert ahead["waits"][:2] == [0.0, 0.0] and ahead["waits"][2] > 0
    server_seconds, _ = connect(get_settings()).time()
    assert ahead["waits"][2] == (server_seconds // 86400 + 1) * 86400
    assert (behind["state"], ahead["state"]) == ("closed", "open")
    assert abs(ahead["retry_at"] - (server_seconds + 600)) < 30
