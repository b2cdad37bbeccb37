"""The publisher of single sends (``notifier.api.publisher``) on the run's real broker:
concurrent sends coalesced with their ids in order, a failed publish failing only the
requests it carried, critical sends not waiting behind the others."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest

from notifier import client
from notifier.api import publisher
from notifier.schemas import NotificationIn, to_message
from notifier.settings import queue_name
from tests.api.server import ApiServer
from tests.brokers import Envelope, TestBroker

pytestmark = pytest.mark.broker


def made(count: int, priority: str = "normal", tag: str = "n") -> list[NotificationIn]:
    return [client.build(f"u{i}", "welcome", f"{tag}{i}", priority=priority)
            for i in range(count)]


def carried(envelopes: list[Envelope]) -> list[dict[str, Any]]:
    """The notifications of these messages, in order (a message holds one or a list)."""
    items: list[dict[str, Any]] = []
    for envelope in envelopes:
        args = envelope.args()[0]
        items.extend(args if isinstance(args, list) else [args])
    return items


async def publish_all(notifications: list[NotificationIn]) -> list[Any]:
    return await asyncio.gather(*(publisher.publish(n) for n in notifications),
                                return_exceptions=True)


def test_concurrent_sends_share_messages_and_keep_their_ids_in_order(
    broker: TestBroker,
) -> None:
    """200 sends at once: every one published once, in the order handed, in fewer messages."""
    notifications = made(200)
    assert asyncio.run(publish_all(notifications)) == [None] * 200
    messages = broker.peek(queue_name("normal"))
    items = carried(messages)
    assert [item["id"] for item in items] == [str(n.id) for n in notifications]
    assert [item["title"] for item in items] == [f"n{i}" for i in range(200)]
    assert len(messages) < 200


def test_a_failed_publish_fails_only_the_requests_it_carried(broker: TestBroker) -> None:
    """One batch, two priorities: the publish that cannot be encoded fails its own
    requests; the other priority's requests are published and answered."""
    good, bad = made(3), made(2, "low", "bad")

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        pending = [publisher._Pending([to_message(n)], "normal", loop.create_future())
                   for n in good]
        pending[1:1] = [publisher._Pending([{**to_message(n), "data": {"x": object()}}],
                                           "low", loop.create_future()) for n in bad]
        await asyncio.to_thread(publisher.publish_batch, pending)
        return await asyncio.gather(*(p.answer for p in pending), return_exceptions=True)

    answers = asyncio.run(scenario())
    assert answers[0] is None and answers[3:] == [None, None]
    assert all(isinstance(answer, Exception) for answer in answers[1:3])
    assert [item["id"] for item in carried(broker.peek(queue_name("normal")))] == [
        str(n.id) for n in good]
    assert broker.peek(queue_name("low")) == []


class GatedTitle(str):
    """A title that holds the lane sizing it (``isascii``, asked before a publish) until
    the test opens the gate: a publish of others that is in flight for as long as the
    test wants, with nothing of the publisher or the broker replaced."""

    gate = threading.Event()
    #: Set once a lane is held at the gate.
    reached = threading.Event()

    def isascii(self) -> bool:
        self.reached.set()
        self.gate.wait(60)
        return super().isascii()


def test_a_critical_send_does_not_wait_behind_a_publish_of_others(broker: TestBroker) -> None:
    """While the others' lane is held in a publish, a critical send is published and
    answered; the held one completes once let go."""
    [other], [critical] = made(1, tag="held"), made(1, "critical", "c")

    GatedTitle.gate.clear()

    async def scenario() -> None:
        held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        message = {**to_message(other), "title": GatedTitle("held")}
        publisher.others.hand(publisher._Pending([message], "normal", held))
        try:
            await asyncio.wait_for(publisher.publish(critical), 30)
            assert not held.done()  # the others' publish is still in flight
        finally:
            GatedTitle.gate.set()
        await asyncio.wait_for(held, 30)

    asyncio.run(scenario())
    assert [item["id"] for item in carried(broker.peek(queue_name("critical")))] == [
        str(critical.id)]
    assert [item["id"] for item in carried(broker.peek(queue_name("normal")))] == [
        str(other.id)]


def test_sends_over_http_at_once_each_get_their_own_id(
    api_server: ApiServer, make_key: Any, broker: TestBroker,
) -> None:
    """8 connections sending at once through the server: each answer's id is the
    notification that request sent (its title), each published once."""
    headers = {"Authorization": f"Bearer {make_key('send')}"}
    answered: dict[str, str] = {}

    def send(connection: int) -> None:
        with httpx.Client(base_url=api_server.url, headers=headers, timeout=30) as http:
            for i in range(10):
                title = f"c{connection}-{i}"
                answer = http.post("/v1/notifications",
                                   json={"recipient": "u", "type": "t", "title": title})
                assert answer.status_code == 202, answer.text
                [answered[title]] = answer.json()["ids"]

    threads = [threading.Thread(target=send, args=(c,)) for c in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    published = {item["id"]: item["title"] for item in carried(broker.peek(queue_name("normal")))}
    assert len(answered) == 80 and published == {id_: t for t, id_ in answered.items()}


def listed(count: int, tag: str, priority: str = "normal") -> list[dict[str, Any]]:
    """A list request's messages, checked and with their ids, as the send route has them."""
    messages = client.validated_messages(
        [{"recipient": f"u{i}", "type": "welcome", "title": f"{tag}-{i}", "priority": priority}
         for i in range(count)])
    assert messages is not None
    return messages


async def _behind_a_held_publish(lists: list[list[dict[str, Any]]]) -> list[Any]:
    """Send ``lists`` while the others' lane is held in a publish (``GatedTitle``), so
    all of them wait for the same next publish; the answers, in order."""
    GatedTitle.gate.clear()
    GatedTitle.reached.clear()
    [other] = made(1, tag="held")
    held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    publisher.others.hand(publisher._Pending(
        [{**to_message(other), "title": GatedTitle("held")}], "normal", held))
    assert await asyncio.to_thread(GatedTitle.reached.wait, 30)
    sends = [asyncio.ensure_future(publisher.publish_messages(messages)) for messages in lists]
    await asyncio.sleep(0.2)  # every list handed to the lane, behind the held publish
    GatedTitle.gate.set()
    await asyncio.wait_for(held, 30)
    return await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 30)


def test_waiting_lists_are_merged_into_messages_of_up_to_a_chunk_without_splitting_one(
    broker: TestBroker,
) -> None:
    """Six lists of 100 waiting at once: one message of five of them (500, the chunk
    size), one of the sixth; every item once, in the order handed."""
    lists = [listed(100, f"l{n}") for n in range(6)]
    assert asyncio.run(_behind_a_held_publish(lists)) == [None] * 6
    messages = broker.peek(queue_name("normal"))
    assert [len(carried([envelope])) for envelope in messages] == [1, 500, 100]
    assert [item["id"] for item in carried(messages)[1:]] == [
        message["id"] for messages in lists for message in messages]


def test_a_failed_merged_publish_fails_each_request_it_carried_and_publishes_none_of_them(
    broker: TestBroker,
) -> None:
    """Three lists merged in one message, one of them unencodable: the publish fails,
    each of the three requests gets the error and nothing of them is on the broker; a
    list of another priority, published apart, is answered and published."""
    lists = [listed(50, "a"), listed(50, "b"), listed(50, "c"), listed(20, "low", "low")]
    lists[1][7] = {**lists[1][7], "data": {"x": object()}}
    answers = asyncio.run(_behind_a_held_publish(lists))
    assert all(isinstance(answer, Exception) for answer in answers[:3])
    assert answers[3] is None
    assert [item["title"] for item in carried(broker.peek(queue_name("normal")))] == ["held"]
    assert [item["id"] for item in carried(broker.peek(queue_name("low")))] == [
        message["id"] for message in lists[3]]


def test_a_list_of_several_priorities_is_answered_once_each_is_published(
    broker: TestBroker,
) -> None:
    """A list's critical items go in the critical lane, the rest in the others'; the
    request is answered once both are on the broker."""
    messages = [*listed(3, "n"), *listed(2, "c", "critical"), *listed(1, "l", "low")]
    asyncio.run(publisher.publish_messages(messages))
    for priority, tag in (("normal", "n"), ("critical", "c"), ("low", "l")):
        assert [item["title"] for item in carried(broker.peek(queue_name(priority)))] == [
            m["title"] for m in messages if m["title"].startswith(tag + "-")]


def test_concurrent_list_requests_over_http_each_get_their_own_ids_stored_once(
    api_server: ApiServer, make_key: Any, worker: Any,
) -> None:
    """8 connections sending lists at once through the server and a worker: each answer's
    ids are that request's notifications in order, and every one is stored exactly once."""
    from sqlalchemy import text

    from notifier.storage.db import session_scope
    from tests.workers import wait_for_rows

    headers = {"Authorization": f"Bearer {make_key('send')}"}
    answered: dict[str, str] = {}

    def send(connection: int) -> None:
        with httpx.Client(base_url=api_server.url, headers=headers, timeout=30) as http:
            for request in range(5):
                titles = [f"c{connection}-{request}-{i}" for i in range(40)]
                answer = http.post("/v1/notifications", json=[
                    {"recipient": f"u{i}", "type": "t", "title": title}
                    for i, title in enumerate(titles)])
                assert answer.status_code == 202, answer.text
                ids = answer.json()["ids"]
                assert len(ids) == 40
                answered.update(zip(ids, titles, strict=True))

    threads = [threading.Thread(target=send, args=(c,)) for c in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answered) == 8 * 5 * 40
    wait_for_rows(len(answered))
    with session_scope() as session:
        stored = session.execute(text("SELECT id::text, title FROM notifications")).all()
    assert len(stored) == len(answered) and dict(stored) == answered
