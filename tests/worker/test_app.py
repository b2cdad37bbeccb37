"""The worker's start: what each pool process has open before its first job."""

from __future__ import annotations

from urllib.parse import urlsplit

import psutil
import pytest

from notifier.settings import get_settings
from tests.conftest import BROKER_URL, DATABASE_URL
from tests.workers import WorkerProcess, wait_for


def _ports_of(process: psutil.Process) -> set[int]:
    return {c.raddr.port for c in process.net_connections("tcp") if c.raddr}


@pytest.mark.slow
def test_each_pool_process_opens_its_database_and_broker_connections_at_start():
    """A lane process may wait long for its first job, and that job is a critical
    batch: the connections it needs are opened as the process starts, not inside it.
    ``-c 1`` with the default lanes: three pool processes, none given a job."""
    database = urlsplit(DATABASE_URL.replace("+psycopg", "")).port or 5432
    broker = urlsplit(BROKER_URL).port
    worker = WorkerProcess.start(concurrency=1)
    try:
        main = psutil.Process(worker.process.pid)
        pool = [child for child in main.children()
                if "notifier.worker.flush_loop" not in " ".join(child.cmdline())]
        assert len(pool) == 1 + get_settings().critical_lanes
        wait_for(lambda: all({database, broker} <= _ports_of(p) for p in pool), timeout=10,
                 what="a database and a broker connection in every pool process")
    finally:
        worker.stop()
