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
        pending = [publisher._Pending(to_message(n), "normal", loop.create_future())
                   for n in good]
        pending[1:1] = [publisher._Pending({**to_message(n), "data": {"x": object()}},
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

    def isascii(self) -> bool:
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
        publisher.others.hand(publisher._Pending(message, "normal", held))
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
