"""POST /v1/notifications through a real server, broker and worker into Postgres; reading
one back with its deliveries; cancelling one."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.brokers import TestBroker, our_queues
from tests.workers import WorkerProcess, count_rows, wait_for, wait_for_count, wait_for_rows

pytestmark = pytest.mark.broker


def note(recipient: str = "u1", **fields: Any) -> dict[str, Any]:
    return {"recipient": recipient, "type": "welcome", "title": "Hello", **fields}


def nothing_waiting(broker: TestBroker) -> bool:
    return all(broker.waiting(queue) == 0 for queue in our_queues())


def test_sent_notifications_reach_postgres_through_a_worker_with_their_ids_in_order(
    api: httpx.Client, worker: WorkerProcess,
) -> None:
    one = api.post("/v1/notifications", json=note(body="one"))
    assert one.status_code == 202, one.text
    [single] = one.json()["ids"]
    many = api.post("/v1/notifications", json=[
        note(f"u{i}", priority=("low", "critical", "normal")[i % 3]) for i in range(30)
    ])
    assert many.status_code == 202, many.text
    ids = many.json()["ids"]
    assert len(ids) == 30 and len(set(ids)) == 30
    wait_for_rows(31)
    for index in (0, 1, 29):  # ids in the order given, whatever the priority
        assert count_rows("SELECT count(*) FROM notifications WHERE id = :id AND"
                          " recipient_id = :r", id=ids[index], r=f"u{index}") == 1
    assert count_rows("SELECT count(*) FROM notifications WHERE id = :id AND body = 'one'",
                      id=single) == 1

    wait_for_count("SELECT count(*) FROM deliveries WHERE notification_id = :id"
                   " AND status = 'sent'", 1, id=ids[1])  # critical: delivered at once
    shown = api.get(f"/v1/notifications/{ids[1]}")
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert body["id"] == ids[1] and body["recipient_id"] == "u1"
    assert body["priority"] == "critical" and body["status"] in ("dispatched", "delivered")
    [delivery] = body["deliveries"]
    assert delivery["channel"] == "inapp" and delivery["status"] == "sent"
    assert delivery["attempts"] >= 1 and delivery["provider"] == "0:inapp"


def test_a_bad_item_is_422_with_its_index_field_and_the_dead_letter_words(
    api: httpx.Client, broker: TestBroker, worker: WorkerProcess,
) -> None:
    bad = note(type="Not A Slug", priority="urgent")
    del bad["title"]
    answer = api.post("/v1/notifications", json=[note(), note(), bad, note()])
    assert answer.status_code == 422
    body = answer.json()
    assert body["error"] == "1 of 4 notifications are invalid; none was sent"
    assert {(p["index"], p["field"]) for p in body["detail"]} == {
        (2, "type"), (2, "priority"), (2, "title"),
    }
    # The words a dead letter has for the same item, when a producer sends it anyway.
    from notifier.client import app

    app.send_task("notifier.ingest", args=[[bad]], queue="notifier.normal")
    wait_for_count("SELECT count(*) FROM dead_letters", 1)
    reason = count_reason()
    assert reason == "; ".join(f"{p['field']}: {p['problem']}" for p in body["detail"])
    # Nothing of the refused request was published (or stored).
    wait_for(lambda: nothing_waiting(broker), what="empty queues")
    assert count_rows() == 0


def count_reason() -> str:
    from sqlalchemy import text

    from notifier.storage.db import session_scope

    with session_scope() as session:
        return str(session.execute(text("SELECT reason FROM dead_letters")).scalar_one())


def test_a_refused_request_publishes_nothing(api: httpx.Client, broker: TestBroker) -> None:
    """No worker here: whatever was published would still wait in its queue."""
    answer = api.post("/v1/notifications", json=[note(priority="critical"),
                                                  note(title="")])
    assert answer.status_code == 422
    assert answer.json()["detail"][0] == {
        "index": 1, "field": "title", "problem": "String should have at least 1 character",
        "message": "[1] title: String should have at least 1 character",
    }
    assert nothing_waiting(broker)
    assert api.post("/v1/notifications", json=note(priority="critical")).status_code == 202
    assert broker.waiting("notifier.critical") == 1


@pytest.mark.parametrize(("body", "problem"), [
    ([], "body: must hold at least one notification"),
    ("text", "notification: expected a JSON object, got str"),
    ([1], "notification: expected a JSON object, got int"),
    ({"recipient": "u", "type": "t", "title": "x", "colour": "red"},
     "colour: is not a known field"),
])
def test_bodies_that_are_no_notification_are_422(
    api: httpx.Client, broker: TestBroker, body: Any, problem: str,
) -> None:
    answer = api.post("/v1/notifications", json=body)
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["message"].removeprefix("[0] ") == problem
    assert nothing_waiting(broker)


@pytest.mark.parametrize("body", [b"{", b"", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000])
def test_a_body_that_is_not_json_is_400(api: httpx.Client, body: bytes) -> None:
    answer = api.post("/v1/notifications", content=body)
    assert answer.status_code == 400
    assert set(answer.json()) == {"error", "detail"}


def test_the_idempotency_key_header_is_the_field_in_the_keys_namespace(
    api: httpx.Client, worker: WorkerProcess,
) -> None:
    """Replays are tests/api/test_idempotency.py's; here: what ingest gets."""
    single = api.post("/v1/notifications", json=note(), headers={"Idempotency-Key": "order-7"})
    listed = api.post("/v1/notifications", json=[note(), note(idempotency_key="batch-1:1")],
                      headers={"Idempotency-Key": "batch-1"})
    assert {single.status_code, listed.status_code} == {202}
    wait_for_rows(3)
    keys = count_rows("SELECT count(*) FROM notifications WHERE idempotency_key"
                      " ~ '^api:[0-9]+:(order-7|batch-1:0|batch-1:1)$'")
    assert keys == 3 and count_rows() == 3
    both = api.post("/v1/notifications", json=note(idempotency_key="other"),
                    headers={"Idempotency-Key": "order-8"})
    assert both.status_code == 422
    assert both.json()["detail"][0]["field"] == "idempotency_key"


def test_cancel_a_held_notification_then_too_late_and_unknown(
    api: httpx.Client, worker: WorkerProcess,
) -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    [held] = api.post("/v1/notifications", json=note(send_at=later, priority="critical")
                      ).json()["ids"]
    wait_for_count("SELECT count(*) FROM deliveries WHERE notification_id = :id"
                   " AND status = 'scheduled'", 1, id=held)
    answer = api.post(f"/v1/notifications/{held}/cancel")
    assert answer.status_code == 200 and answer.json() == {"id": held, "status": "cancelled"}
    shown = api.get(f"/v1/notifications/{held}").json()
    assert shown["status"] == "cancelled" and shown["reason"] == "cancelled on request"
    assert [d["status"] for d in shown["deliveries"]] == ["cancelled"]
    again = api.post(f"/v1/notifications/{held}/cancel")
    assert again.status_code == 409 and "cancelled already" in again.json()["error"]
    unknown = api.post(f"/v1/notifications/{uuid.uuid4()}/cancel")
    assert unknown.status_code == 404


def test_a_bad_callback_url_is_422_naming_the_field_and_a_keys_default_does_not_hide_it(
    api_server: Any, broker: TestBroker,
) -> None:
    """Checked as the client checks it; the key's default is given only to items that
    name none, so an item's own bad URL is still refused (and nothing is published)."""
    from notifier.storage.api_keys import Scope, create_key
    from notifier.storage.db import session_scope

    with session_scope() as session:
        _, key = create_key(session, "with default", [Scope.SEND], None,
                            "https://hooks.example.com/status")
    answer = httpx.post(f"{api_server.url}/v1/notifications", timeout=30,
                        headers={"Authorization": f"Bearer {key}"},
                        json=[note(), note(callback_url="https://u:p@hooks.example.com/")])
    assert answer.status_code == 422, answer.text
    [problem] = answer.json()["detail"]
    assert (problem["index"], problem["field"]) == (1, "callback_url")
    assert "user name or password" in problem["problem"]
    assert nothing_waiting(broker)
