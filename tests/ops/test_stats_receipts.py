"""`notifier stats` after receipts: a delivery the provider confirmed, bounced or
complained about was still sent by us and counts as sent; a suppressed one was not."""

from __future__ import annotations

from tests.ops.test_stats import at, delivery, execute, stats_of


def test_a_delivery_past_sent_still_counts_as_sent_and_a_suppressed_one_does_not():
    for _ in range(5):
        delivery("email", "sent", updated_at=at(100), latency=1)
    execute("""
        UPDATE deliveries d SET status = s.status FROM (
            SELECT id, (ARRAY['sent', 'delivered', 'bounced', 'complained', 'undeliverable'])
                       [row_number() OVER (ORDER BY id)] AS status
            FROM deliveries) s
        WHERE d.id = s.id""")
    delivery("email", "suppressed", updated_at=at(50))
    stats = stats_of()
    assert stats.deliveries.sent == 5 and stats.by_channel["email"].sent == 5
    assert stats.deliveries.latency.count == 5
