"""The size caps: the client's message bounds, checked while the body is read."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.api.server import ApiServer
from tests.brokers import TestBroker, our_queues

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def small_server(database: str) -> Iterator[ApiServer]:
    server = ApiServer.start(env={"NOTIFIER_MAX_MESSAGE_BYTES": "4096",
                                  "NOTIFIER_MAX_MESSAGE_NOTIFICATIONS": "5"})
    yield server
    server.stop()


@pytest.fixture
def client(small_server: ApiServer, make_key: Callable[..., str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=small_server.url, timeout=30,
                      headers={"Authorization": f"Bearer {make_key('send')}"}) as http:
        yield http


def note(body: str = "") -> dict[str, str]:
    return {"recipient": "u1", "type": "welcome", "title": "Hello", "body": body}


def test_a_body_over_the_byte_cap_is_413(client: httpx.Client, broker: TestBroker) -> None:
    answer = client.post("/v1/notifications", json=note("x" * 5000))
    assert answer.status_code == 413
    assert answer.json()["detail"] == [{"bytes": answer.json()["detail"][0]["bytes"],
                                        "limit": 4096}]
    assert "NOTIFIER_MAX_MESSAGE_BYTES" in answer.json()["error"]
    assert all(broker.waiting(queue) == 0 for queue in our_queues())


def test_a_chunked_body_is_refused_once_past_the_cap_not_read_to_its_end(
    small_server: ApiServer, make_key: Callable[..., str],
) -> None:
    """No Content-Length: counted as it arrives. 5 KiB of a body that never ends are
    sent, and the 413 comes then: the server did not wait for (or buffer) the rest."""
    answer = raw_request(small_server, make_key("send"), b"Transfer-Encoding: chunked\r\n",
                         [b"400\r\n" + b"x" * 1024 + b"\r\n"] * 5)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"NOTIFIER_MAX_MESSAGE_BYTES" in answer


def test_more_items_than_a_message_may_hold_is_413(client: httpx.Client) -> None:
    assert client.post("/v1/notifications", json=[note()] * 5).status_code == 202
    answer = client.post("/v1/notifications", json=[note()] * 6)
    assert answer.status_code == 413
    assert answer.json()["detail"] == [{"items": 6, "limit": 5}]


def test_a_content_length_over_the_cap_is_refused_before_the_body(
    small_server: ApiServer, make_key: Callable[..., str],
) -> None:
    """The headers alone announce 100 MB: 413 at once, not a byte of the body read."""
    answer = raw_request(small_server, make_key("send"), b"Content-Length: 100000000\r\n", [])
    assert answer.startswith(b"HTTP/1.1 413 ") and b"100000000 bytes" in answer


def raw_request(server: ApiServer, key: str, headers: bytes, chunks: list[bytes]) -> bytes:
    """Send a POST's headers and these pieces of its body, never its end; the answer."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"POST /v1/notifications HTTP/1.1\r\nHost: test\r\n"
                     b"Authorization: Bearer " + key.encode() + b"\r\n"
                     b"Content-Type: application/json\r\n" + headers + b"\r\n")
        for chunk in chunks:
            conn.sendall(chunk)
        answer = b""
        while b"]}" not in answer:  # the end of the JSON error
            answer += conn.recv(65536) or b"]}"
    return answer
