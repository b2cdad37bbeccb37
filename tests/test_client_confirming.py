"""The confirming producer: what the broker lost is sent again and stored once."""

from __future__ import annotations

from notifier.client import ConfirmingProducer
from tests.workers import WorkerProcess, count_rows


def test_notifications_lost_with_the_broker_are_sent_again(broker):
    """Sent while no worker runs, then the broker's contents vanish (a Redis restart,
    which keeps nothing): the producer sends them again and each is stored once."""
    producer = ConfirmingProducer(resend_after=0.5)
    ids = [producer.notify(f"c-{i}", "reminder", f"Reminder {i}") for i in range(40)]
    assert producer.confirm() == 40  # nothing stored yet, nothing overdue
    broker.lose_everything()
    worker = WorkerProcess.start()
    try:
        assert producer.wait(timeout=60, interval=0.5)
    finally:
        worker.stop()
    assert producer.resent >= 40 and producer.given_up == []
    assert count_rows("SELECT count(*) FROM notifications WHERE id = ANY(CAST(:ids AS uuid[]))",
                      ids=ids) == 40
    assert count_rows() == 40


def test_a_notification_never_stored_is_given_up_after_max_sends(broker):
    producer = ConfirmingProducer(resend_after=0, max_sends=2)
    note_id = producer.notify("c-1", "reminder", "Never arrives")
    broker.lose_everything()
    assert producer.confirm() == 1  # second send
    broker.lose_everything()
    assert producer.confirm() == 0  # two sends were the most: given up
    assert producer.given_up == [note_id]
