"""One clock for windows and due times, Postgres's, whatever a worker host's clock says.

A real worker runs under libfaketime (Debian's ``faketime``), its clock 90 s fast or
slow; its flush loop process inherits the skew. The test process and Postgres share
this machine's true clock. The worker's loop must flush a window when Postgres's clock
says it is due (never early, never 90 s late), and a delivery it fails must be put back
until a time on Postgres's clock (its wait from the moment it was written, not 90 s
more or less).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from notifier.client import notify
from tests.pipeline.helpers import digests, ids, ingest, note, query, windows
from tests.smtp_server import SmtpServer
from tests.worker.test_flush_loop import ALERT_WINDOW, arm_for_a_minute, wait_for_loop
from tests.workers import ROOT, WorkerProcess, wait_for, wait_for_count

#: Debian's libfaketime (``apt-get install faketime``), for any architecture.
FAKETIME = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))),
                Path("/nonexistent/libfaketime.so.1"))
SKEW = 90.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FAKETIME.exists(),
                       reason="needs libfaketime (apt-get install faketime)"),
]


def skewed(offset: str) -> dict[str, str]:
    """The environment of a process whose clock is ``offset`` off (``+90s``, ``-90s``)."""
    return {"LD_PRELOAD": str(FAKETIME), "FAKETIME": offset}


def clock_of(env: dict[str, str]) -> float:
    """``time.time()`` in a process of that environment, less the true one."""
    probe = "import json, time; print(json.dumps(time.time()))"
    before = float(query("SELECT extract(epoch FROM clock_timestamp())")[0][0])
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, timeout=30, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return float(json.loads(result.stdout)) - before


@pytest.mark.parametrize("offset", ["+90s", "-90s"])
def test_a_worker_whose_clock_is_90_s_off_flushes_and_retries_on_postgres_clock(
    offset: str, smtp_server: SmtpServer,
):
    env = skewed(offset)
    skew = clock_of(env)
    assert abs(abs(skew) - SKEW) < 5 and (skew > 0) == offset.startswith("+")  # it is off
    smtp_server.fail_always(code=451, text="try again later")
    # A first wait longer than retry_countdown_max (30 s): kept in Postgres, no countdown.
    email = smtp_server.url(retry_base="60", retry_max_attempts="3")
    worker = WorkerProcess.start(env={**env, "NOTIFIER_CHANNELS__EMAIL": email})
    try:
        wait_for_loop(worker)
        arm_for_a_minute()
        # A window due 3 s from now by Postgres's clock, opened on that clock.
        [[pg_now]] = query("SELECT statement_timestamp()")
        group = [note("alert", f"skew-{offset}") for _ in range(2)]
        ingest(group, now=pg_now - ALERT_WINDOW + timedelta(seconds=3))
        [window] = windows()
        notify(recipient={"id": "skew-mail", "email": "skew@example.com"}, type="alert",
               priority="critical", title="skewed", channels=["email"])

        wait_for(lambda: not windows(), 60, "the skewed worker's loop to flush the window")
        wait_for_count("SELECT count(*) FROM deliveries WHERE channel = 'email'"
                       " AND status = 'retrying' AND attempts = 1", 1, timeout=60)
    finally:
        worker.stop()

    [digest] = digests()
    assert digest.notification_ids == ids(group)
    late = (digest.created_at - window.due_at).total_seconds()
    assert 0 <= late < SKEW / 3, late  # not early (+90 s), not 90 s late (-90 s)
    [(wait,)] = query("SELECT extract(epoch FROM next_attempt_at - updated_at)::float8"
                      " FROM deliveries WHERE channel = 'email'")
    assert 60 / 2 - 2 <= wait <= 60, wait  # its backoff (half to all of 60 s), not ±90 s


_BEAT_AND_WORKER = """
from notifier.storage.state import state_redis
from notifier.worker import heartbeat
from notifier.worker.tasks import _stamp_heartbeat
headers = {}
_stamp_heartbeat(headers)  # what beat does before it publishes a heartbeat
heartbeat.record_heartbeat_published(state_redis(), headers)  # ... and once it is sent
heartbeat.record_heartbeat_run(state_redis(), headers[heartbeat.SENT_AT_HEADER], "skewed@host")
"""


@pytest.mark.parametrize("offset", ["+90s", "-90s"])
def test_beat_and_a_worker_whose_clocks_are_90_s_off_keep_the_health_check_green(offset):
    """Beat's heartbeat is stamped, recorded and judged on the state Redis's clock: a
    beat host 90 s slow does not look 90 s dead to a probe on another host (the limit
    is NOTIFIER_HEALTH_BEAT_MAX_AGE, 30 s by default), nor a fast one 90 s fresher."""
    from notifier.ops.health import Thresholds, check_beat
    from notifier.settings import get_settings

    env = skewed(offset)
    result = subprocess.run([sys.executable, "-c", _BEAT_AND_WORKER], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    settings = get_settings()
    verdict = check_beat(settings, Thresholds.from_settings(settings))
    assert verdict.ok, verdict.summary
    assert "by skewed@host" in verdict.summary
    assert 0 <= verdict.details["tick_age"] < 15, verdict.details  # not 90 s older or newer
    assert 0 <= verdict.details["lag"] < 5, verdict.details
