"""``Idempotency-Key`` on POST /v1/notifications, against a real server of two processes
(they share nothing but the state Redis), a real broker and, where rows are counted, a
real worker: a retry gets the first ids, another body is 422, one in flight is 409, a
failure keeps nothing, API keys never meet; the ``idempotency_key`` field keeps ingest's
dropping."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.api.server import ApiServer, free_port
from tests.brokers import TestBroker, our_queues
from tests.conftest import STATE_REDIS_URL
from tests.workers import WorkerProcess, count_rows, wait_for_count, wait_for_rows

pytestmark = pytest.mark.broker
SEND = "/v1/notifications"


@pytest.fixture(scope="module")
def api_server(database: str) -> Iterator[ApiServer]:
    """Two API processes: a retry may reach either."""
    server = ApiServer.start(workers=2)
    yield server
    server.stop()


def note(recipient: str = "u1", **fields: Any) -> dict[str, Any]:
    return {"recipient": recipient, "type": "welcome", "title": "Hello", **fields}


def keyed(header: str) -> dict[str, str]:
    return {"Idempotency-Key": header}


def published(broker: TestBroker) -> int:
    return sum(broker.waiting(queue) for queue in our_queues())


def replayed(answer: httpx.Response) -> bool:
    return answer.headers.get("Idempotent-Replayed") == "true"


def duplicates_dropped() -> int:
    return count_rows("SELECT coalesce(sum(duplicates), 0) FROM idempotency_keys")


def key_id(key: str) -> int:
    from notifier.storage.api_keys import authenticate
    from notifier.storage.db import session_scope

    with session_scope() as session:
        info = authenticate(session, key)
    assert info is not None
    return info.id


def test_a_retry_gets_the_same_ids_and_one_notification_is_stored(
    api: httpx.Client, worker: WorkerProcess,
) -> None:
    first = api.post(SEND, json=note(body="one"), headers=keyed("order-7"))
    assert first.status_code == 202 and not replayed(first), first.text
    # The same JSON, spaced and ordered otherwise: the same body.
    same = json.dumps({"body": "one", "title": "Hello", "type": "welcome", "recipient": "u1"},
                      indent=2)
    retry = api.post(SEND, content=same, headers=keyed("order-7"))
    assert retry.status_code == 202 and replayed(retry), retry.text
    assert retry.json() == first.json()
    listed = api.post(SEND, json=[note("u2"), note("u3")], headers=keyed("batch-1"))
    listed_again = api.post(SEND, json=[note("u2"), note("u3")], headers=keyed("batch-1"))
    assert listed.status_code == listed_again.status_code == 202
    assert listed_again.json() == listed.json() and replayed(listed_again)
    assert len(set(listed.json()["ids"])) == 2
    # A marker sent after the retries is stored once they would have been.
    marker = api.post(SEND, json=note("marker")).json()["ids"][0]
    wait_for_count("SELECT count(*) FROM notifications WHERE id = :id", 1, id=marker)
    wait_for_rows(4)
    assert count_rows() == 4 and duplicates_dropped() == 0  # nothing published twice
    [stored] = first.json()["ids"]
    shown = api.get(f"{SEND}/{stored}")
    assert shown.status_code == 200 and shown.json()["recipient_id"] == "u1"
    assert shown.json()["idempotency_key"].endswith(":order-7")


def test_another_body_under_the_same_key_is_422_and_the_first_answer_stays(
    api: httpx.Client, broker: TestBroker,
) -> None:
    first = api.post(SEND, json=note(), headers=keyed("order-8"))
    assert first.status_code == 202
    other = api.post(SEND, json=note(title="Goodbye"), headers=keyed("order-8"))
    assert other.status_code == 422
    assert other.json()["error"] == "Idempotency-Key reused with a different body"
    assert other.json()["detail"][0]["field"] == "Idempotency-Key"
    retry = api.post(SEND, json=note(), headers=keyed("order-8"))
    assert replayed(retry) and retry.json() == first.json()
    assert published(broker) == 1


def test_concurrent_identical_requests_publish_once(
    api_server: ApiServer, make_key: Callable[..., str], broker: TestBroker,
) -> None:
    """Eight clients on their own connections (so both processes answer) at once."""
    auth = {"Authorization": f"Bearer {make_key('send')}", **keyed("burst-1")}
    start = threading.Barrier(8)
    answers: list[httpx.Response] = []

    def send() -> None:
        with httpx.Client(base_url=api_server.url, timeout=30, headers=auth) as client:
            start.wait()
            answers.append(client.post(SEND, json=[note(), note("u2")]))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fresh = [a for a in answers if a.status_code == 202 and not replayed(a)]
    assert len(fresh) == 1, [(a.status_code, a.text) for a in answers]
    for answer in answers:
        if answer.status_code == 409:
            assert answer.headers["Retry-After"] == "1"
            assert answer.json()["detail"][0]["field"] == "Idempotency-Key"
        else:
            assert answer.status_code == 202 and answer.json() == fresh[0].json()
    assert published(broker) == 1  # one message holds the list


def test_a_request_in_flight_is_409_until_it_lets_go(
    api: httpx.Client, broker: TestBroker,
) -> None:
    """The first request's hold, as it is while it publishes (another process's, say)."""
    from notifier.api.idempotency import redis_key

    state = redis.Redis.from_url(STATE_REDIS_URL)
    key = api.headers["Authorization"].removeprefix("Bearer ")
    name = redis_key(key_id(key), "order-9")
    state.set(name, f"P{uuid.uuid4().hex}", ex=60)  # a held key's value: P, a token
    busy = api.post(SEND, json=note(), headers=keyed("order-9"))
    assert busy.status_code == 409 and busy.headers["Retry-After"] == "1"
    assert "in flight" in busy.json()["error"] and published(broker) == 0
    state.delete(name)
    state.close()
    done = api.post(SEND, json=note(), headers=keyed("order-9"))
    assert done.status_code == 202 and not replayed(done) and published(broker) == 1


def test_a_refused_request_keeps_nothing_and_its_retry_is_processed_afresh(
    api: httpx.Client, broker: TestBroker,
) -> None:
    invalid = api.post(SEND, json=note(title=""), headers=keyed("order-10"))
    assert invalid.status_code == 422
    too_many = api.post(SEND, json=[note()] * 1001, headers=keyed("order-10"))
    assert too_many.status_code == 413
    state = redis.Redis.from_url(STATE_REDIS_URL)
    assert list(state.scan_iter("notifier.api.idempotency.*")) == []
    state.close()
    fixed = api.post(SEND, json=note(), headers=keyed("order-10"))
    assert fixed.status_code == 202 and not replayed(fixed) and published(broker) == 1


def test_a_request_the_broker_refused_keeps_nothing(
    api: httpx.Client, make_key: Callable[..., str], broker: TestBroker,
) -> None:
    """A process whose broker is gone (503) lets go; the retry elsewhere is fresh."""
    key = make_key("send")
    down = ApiServer.start(env={"NOTIFIER_BROKER_URL": "redis://127.0.0.1:1/0",
                                "NOTIFIER_REDIS_URL": STATE_REDIS_URL,
                                "NOTIFIER_BROKER_CONFIRM_TIMEOUT": "1"})
    try:
        refused = httpx.post(f"{down.url}{SEND}", json=note(), timeout=60,
                             headers={"Authorization": f"Bearer {key}", **keyed("order-11")})
    finally:
        down.stop()
    assert refused.status_code == 503, refused.text
    retry = api.post(SEND, json=note(), headers={"Authorization": f"Bearer {key}",
                                                  **keyed("order-11")})
    assert retry.status_code == 202 and not replayed(retry) and published(broker) == 1


def test_a_state_redis_that_does_not_answer_is_503(make_key: Callable[..., str]) -> None:
    key = make_key("send")
    server = ApiServer.start(env={"NOTIFIER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
                                  "NOTIFIER_API_RATE_LIMIT_PER_MINUTE": "0"})
    try:
        answer = httpx.post(f"{server.url}{SEND}", json=note(), timeout=60,
                            headers={"Authorization": f"Bearer {key}", **keyed("order-12")})
    finally:
        server.stop()
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"] == "the state Redis does not answer; try again"


def test_two_api_keys_with_the_same_header_never_meet(
    api_server: ApiServer, make_key: Callable[..., str], worker: WorkerProcess,
) -> None:
    answers = []
    for title in ("For A", "For B"):
        with httpx.Client(base_url=api_server.url, timeout=30, headers={
            "Authorization": f"Bearer {make_key('send')}", **keyed("shared"),
        }) as client:
            answers.append(client.post(SEND, json=note(title=title)))
    assert [a.status_code for a in answers] == [202, 202]
    assert not any(replayed(a) for a in answers)
    assert answers[0].json() != answers[1].json()
    wait_for_rows(2)  # ingest kept both: their item keys are in each API key's namespace
    assert count_rows() == 2 and duplicates_dropped() == 0


@pytest.mark.parametrize("header", ["k" * 201, "a\tb", b"a\x85b"])
def test_a_header_too_long_or_not_printable_is_422_naming_it(
    api: httpx.Client, broker: TestBroker, header: str | bytes,
) -> None:
    answer = api.post(SEND, json=note(), headers={"Idempotency-Key": header})
    assert answer.status_code == 422
    assert "Idempotency-Key" in answer.json()["detail"][0]["field"]
    assert published(broker) == 0


def test_the_field_without_the_header_is_dropped_at_ingest_not_replayed(
    api: httpx.Client, worker: WorkerProcess,
) -> None:
    """The body's own idempotency_key is the producer's, as over the broker: a repeat
    gets a new id, which ingest drops."""
    first = api.post(SEND, json=note(idempotency_key="invoice-9"))
    again = api.post(SEND, json=note(idempotency_key="invoice-9"))
    assert first.status_code == again.status_code == 202
    assert not replayed(again) and first.json() != again.json()
    wait_for_count("SELECT count(*) FROM idempotency_keys WHERE duplicates = 1", 1)
    assert count_rows() == 1
    assert api.get(f"{SEND}/{again.json()['ids'][0]}").status_code == 404
    reserved = api.post(SEND, json=note(idempotency_key="api:1:order-7"))
    assert reserved.status_code == 422
    assert reserved.json()["detail"][0]["field"] == "idempotency_key"
