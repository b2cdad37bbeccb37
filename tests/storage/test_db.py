"""The process's database engine and the connections it hands out."""

from __future__ import annotations

import threading
import time

import pytest

from notifier.storage import db
from tests.conftest import DATABASE_URL


def test_threads_asking_for_the_engine_at_once_share_one(monkeypatch: pytest.MonkeyPatch):
    """A pool process's first job and its warm-up thread (or the API's threads) ask at
    the same moment: one engine, so one pool and its bound on connections. Making an
    engine is slowed here (the real one, after a pause) so that every thread is inside
    it at once, as a busy machine does by chance."""
    real = db.create_engine

    def slow_create_engine(*args: object, **kwargs: object) -> object:
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(db, "create_engine", slow_create_engine)
    url = f"{DATABASE_URL}?application_name=engine-race"  # an engine no test made yet
    barrier = threading.Barrier(8)
    engines: list[object] = []

    def ask() -> None:
        barrier.wait()
        engines.append(db.get_engine(url))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(engines) == 8
        assert len({id(engine) for engine in engines}) == 1
    finally:
        db.get_engine(url).dispose()
