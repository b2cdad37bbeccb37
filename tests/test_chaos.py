"""A small, fast part of the chaos suite (``make chaos`` runs all of it, bigger).

The same code as ``python -m chaos`` (``chaos.scenarios.run_scenario``), on the test
run's own database and Redis db, at a small scale: the fuzz scenario with a few hundred
payloads and one kill scenario (the delivery worker's: a SIGKILLed ingest worker on
Redis may lose the message in its socket, kombu's known limit, which ``make chaos``
measures in ``kill_ingest``). Restarting Redis and Postgres is left to ``make chaos``:
they are the machine's shared servers, and a test run must not pull them from under
other runs.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from chaos.config import ChaosConfig
from chaos.scenarios import Result, run_scenario
from notifier.pipeline.ingest import IngestMessage
from tests.conftest import BROKER, BROKER_URL, DATABASE_URL
from tests.workers import count_rows

pytestmark = pytest.mark.slow
#: The chaos suite's scenarios read kombu's Redis structures (the queues, ``unacked``)
#: and restart Redis; the two that need no scenario run on both brokers.
redis_scenario = pytest.mark.skipif(
    BROKER != "redis", reason="the chaos suite's scenarios run on a Redis broker (chaos/)")


def small(tmp_path: Path, **sizes: object) -> ChaosConfig:
    """The test run's servers and recovery timings (conftest's), small sizes."""
    options: dict[str, object] = {
        "database_url": DATABASE_URL, "broker_url": BROKER_URL, "recovery": None,
        "results_dir": tmp_path, "drain_timeout": 45.0, "restart_services": False,
        "scale": 200, "fuzz_count": 250, "kills": 1, "rate": 100.0,
    }
    options.update(sizes)
    return ChaosConfig(**options)  # type: ignore[arg-type]


def assert_nothing_lost_or_doubled(result: Result) -> None:
    assert result.error is None, result.error
    assert result.accepted > 0
    assert result.lost == 0, result.notes
    assert result.recorded_twice == 0, result.notes
    assert result.worker_crashes == 0, result.details.get("crashes")


@redis_scenario
def test_fuzzed_input_is_dead_lettered_with_its_field_and_stops_nothing(tmp_path):
    result = run_scenario(small(tmp_path), "fuzz")
    assert_nothing_lost_or_doubled(result)
    figures = result.details["fuzz"]
    assert figures["bad"] > 100 and figures["good"] > 20
    assert figures["good_stored"] == figures["good"]
    assert figures["bad_accepted"] == {}
    assert figures["bad_dead_lettered"] == figures["bad"]
    assert figures["reason_misses_field"] == {}, figures["reason_examples"]


@redis_scenario
def test_a_delivery_worker_killed_mid_send_loses_and_doubles_nothing(tmp_path):
    result = run_scenario(small(tmp_path), "kill_delivery")
    assert_nothing_lost_or_doubled(result)
    assert result.kills == 1
    assert result.delivered + result.suppressed + result.dead_lettered == result.accepted
    assert result.details["ledger"]["unexpected"] == {}
    assert result.details["ledger"]["sent_not_received"] == 0


BASE = {"recipient": "user-1", "type": "alert", "title": "t"}


def _nested(levels: int) -> dict[str, object]:
    top: dict[str, object] = {}
    inner = top
    for _ in range(levels):
        inner["k"] = inner = {}
    return top


@pytest.mark.parametrize("payload", [
    {**BASE, "title": "a\x00b"},
    {**BASE, "body": "a\ud800b"},
    {**BASE, "data": {"k": float("nan")}},
    {**BASE, "recipient": {"id": "user-2", "name": "a\x00b"}},
    {**BASE, "type": "a\udfffb"},
    {**BASE, "data": _nested(950)},
], ids=["NUL in title", "lone surrogate in body", "NaN in data", "NUL in recipient name",
        "lone surrogate in type", "data 950 levels deep"])
def test_a_payload_jsonb_cannot_hold_is_dead_lettered(payload):
    from notifier.worker.tasks import store_messages

    result = store_messages([IngestMessage("chaos-poison", payload),
                             IngestMessage("chaos-good", {**BASE, "title": "fine"})])
    assert result.rejected == 1
    assert count_rows("SELECT count(*) FROM dead_letters WHERE stage = 'ingest'") == 1
    assert count_rows() == 1


@pytest.mark.parametrize("meanwhile", ["sending", "sent"])
def test_the_sweeper_leaves_a_delivery_claimed_meanwhile_alone(meanwhile):
    """A worker claims a delivery the broker was slow to hand over while the sweeper is
    taking it back as lost: the sweeper must not undo the claim."""
    import uuid

    from notifier.pipeline.outbox import sweep_due_deliveries
    from notifier.settings import get_settings

    url = DATABASE_URL.replace("postgresql+psycopg://", "postgresql://")
    delivery_id = uuid.uuid4()
    with psycopg.connect(url, autocommit=True) as setup:
        setup.execute("INSERT INTO recipients (id) VALUES ('user-1')")
        note = setup.execute(
            "INSERT INTO notifications (id, recipient_id, type, priority, title, status)"
            " VALUES (gen_random_uuid(), 'user-1', 'alert', 'normal', 't', 'dispatched')"
            " RETURNING id").fetchone()
        setup.execute(
            "INSERT INTO deliveries (id, notification_id, recipient_id, channel, priority,"
            " status, next_attempt_at, queued_at) VALUES (%s, %s, 'user-1', 'console',"
            " 'normal', 'queued', now() - interval '1 hour', now() - interval '1 hour')",
            (delivery_id, note[0]))
    with psycopg.connect(url) as worker, psycopg.connect(url) as sweeper:
        worker.execute("UPDATE deliveries SET status = %s, updated_at = now() WHERE id = %s",
                       (meanwhile, delivery_id))  # the claim, not yet committed
        # (Found by the chaos suite: the sweeper used to wait for the row, then set it back
        # to queued and publish it again, a second send with no fault at all.)
        tasks = sweep_due_deliveries(sweeper.cursor(), get_settings())  # skips the row
        sweeper.commit()
        worker.commit()
    assert tasks == []
    assert count_rows("SELECT count(*) FROM deliveries WHERE status = :s", s=meanwhile) == 1
