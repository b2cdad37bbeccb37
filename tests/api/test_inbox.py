"""``/v1/recipients/{id}/inbox``: paging, counts, marking, and who may do it, over HTTP to
a running server, with messages written by the real in-app channel into real Postgres."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from notifier.channels.base import OutgoingMessage
from notifier.channels.inapp import InAppChannel
from notifier.pipeline.inbox import MAX_IDS, MAX_PAGE_SIZE
from notifier.pipeline.recipient_tokens import mint
from notifier.settings import Settings
from tests.api.server import TOKEN_SECRET, ApiServer

TOKENS = Settings(api_token_secret=TOKEN_SECRET)


def deliver(recipient: str, count: int) -> list[str]:
    """``count`` messages written by the in-app channel in one batch; their ids."""
    messages = [OutgoingMessage(uuid.uuid4(), recipient, None, "alert", "high", f"Title {i}",
                                "body", {"n": i}) for i in range(count)]
    assert all(result.sent for result in InAppChannel("inapp://").send_batch(messages))
    return [str(message.delivery_id) for message in messages]


def client(server: ApiServer, credential: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


@pytest.fixture
def reader(api_server: ApiServer, make_key: Callable[..., str]) -> httpx.Client:
    """A backend's client: a key with the read scope only."""
    return client(api_server, make_key("read"))


def ids_of(answer: httpx.Response) -> list[str]:
    assert answer.status_code == 200, answer.text
    return [item["id"] for item in answer.json()["items"]]


def test_paging_while_messages_arrive_has_no_duplicates_or_gaps(reader: httpx.Client) -> None:
    """Three pages of ten, with new messages delivered between the requests: the pages
    hold exactly the 25 messages there when paging began, each once (a batch's rows
    share a time and go by id among themselves)."""
    first = deliver("ann", 25)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 10} | ({"cursor": cursor} if cursor else {})
        answer = reader.get("/v1/recipients/ann/inbox", params=params)
        seen += ids_of(answer)
        pages += 1
        cursor = answer.json()["next_cursor"]
        if cursor is None:
            break
        deliver("ann", 5)  # newer than the cursor: never on a later page
    assert pages == 3
    assert len(seen) == len(set(seen)) == 25 and set(seen) == set(first)
    newest = reader.get("/v1/recipients/ann/inbox", params={"limit": MAX_PAGE_SIZE})
    assert len(ids_of(newest)) == 35 and newest.json()["next_cursor"] is None
    created = [item["created_at"] for item in newest.json()["items"]]
    assert created == sorted(created, reverse=True)  # newest first
    assert set(ids_of(newest)[-25:]) == set(first)  # the first 25 are the oldest
    assert newest.json()["counts"] == {"unread": 35, "seen": 0, "read": 0, "archived": 0}
    item = newest.json()["items"][-1]
    assert item["title"] == f"Title {item['data']['n']}" and item["body"] == "body"
    assert item["state"] == "unread" and len(item["cursor"]) == 34


def test_states_filters_and_counts(reader: httpx.Client) -> None:
    a, b, c, d = deliver("bo", 4)
    url = "/v1/recipients/bo/inbox"

    def marked(path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = reader.post(f"{url}/{path}", json=body)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    assert marked("seen", {"ids": [a, b, c]})["changed"] == 3
    assert marked("seen", {"ids": [a]})["changed"] == 0  # already seen
    assert marked("read", {"ids": [b, c]})["changed"] == 2
    done = marked("archive", {"ids": [c]})
    assert done == {"changed": 1, "counts": {"unread": 1, "seen": 1, "read": 1, "archived": 1}}
    assert marked("seen", {"ids": [b, c]})["changed"] == 0  # never back
    assert set(ids_of(reader.get(url, params={"filter": "unread"}))) == {a, d}
    assert set(ids_of(reader.get(url))) == {a, b, d}  # unarchived by default
    everything = reader.get(url, params={"filter": "all"}).json()["items"]
    assert {item["id"]: item["state"] for item in everything} == {
        a: "seen", b: "read", c: "archived", d: "unread"}
    assert reader.get(f"{url}/counts").json() == {"unread": 1, "seen": 1, "read": 1,
                                                  "archived": 1}


def test_all_marks_every_message_or_those_up_to_a_cursor(reader: httpx.Client) -> None:
    url = "/v1/recipients/cy/inbox"
    deliver("cy", 3)
    shown = reader.get(url).json()["items"]
    deliver("cy", 2)  # arrives after the page was shown
    until = reader.post(f"{url}/read", json={"all": True, "until": shown[0]["cursor"]})
    assert until.json() == {"changed": 3, "counts": {"unread": 2, "seen": 0, "read": 3,
                                                     "archived": 0}}
    everything = reader.post(f"{url}/archive", json={"all": True})
    assert everything.json() == {"changed": 5, "counts": {"unread": 0, "seen": 0, "read": 0,
                                                          "archived": 5}}
    assert reader.post(f"{url}/archive", json={"all": True}).json()["changed"] == 0
    assert ids_of(reader.get(url)) == []


def test_another_recipients_messages_never_move(
    reader: httpx.Client, api_server: ApiServer,
) -> None:
    """Ids of bob's messages sent on ann's routes (by a key or ann's token) move nothing;
    ann's "all" leaves bob's inbox as it was."""
    deliver("ann", 2)
    bobs = deliver("bob", 2)
    ann_token = client(api_server, mint("ann", 60, settings=TOKENS))
    for who in (reader, ann_token):
        for path in ("seen", "read", "archive"):
            answer = who.post(f"/v1/recipients/ann/inbox/{path}", json={"ids": bobs})
            assert answer.json()["changed"] == 0, answer.text
    assert ann_token.post("/v1/recipients/ann/inbox/archive", json={"all": True}).json() == {
        "changed": 2, "counts": {"unread": 0, "seen": 0, "read": 0, "archived": 2}}
    assert reader.get("/v1/recipients/bob/inbox/counts").json() == {
        "unread": 2, "seen": 0, "read": 0, "archived": 0}


def test_who_may_read_an_inbox(api_server: ApiServer, make_key: Callable[..., str]) -> None:
    """A read (or admin) key reads any inbox; a token reads its recipient's alone, from
    the header or the query string, until it expires; a send-only key is 403."""
    deliver("ann", 1)
    url = "/v1/recipients/ann/inbox"
    token = mint("ann", 60, settings=TOKENS)
    for credential in (make_key("read"), make_key("admin"), token):
        assert client(api_server, credential).get(url).status_code == 200
    assert client(api_server, make_key("read")).get("/v1/recipients/zed/inbox").status_code \
        == 200
    anonymous = client(api_server)
    assert len(ids_of(anonymous.get(url, params={"token": token}))) == 1
    assert anonymous.post(f"{url}/seen", params={"token": token},
                          json={"all": True}).json()["changed"] == 1

    def refused(answer: httpx.Response, status: int, reason: str) -> None:
        assert answer.status_code == status, answer.text
        assert reason in answer.json()["error"]

    refused(client(api_server, token).get("/v1/recipients/bob/inbox"), 401, "other recipient")
    refused(anonymous.get("/v1/recipients/bob/inbox/counts", params={"token": token}), 401,
            "other recipient")
    expired = mint("ann", 60, settings=TOKENS, now=time.time() - 120)
    refused(client(api_server, expired).get(url), 401, "expired")
    refused(anonymous.get(url, params={"token": expired}), 401, "expired")
    refused(client(api_server, make_key("send")).get(url), 403, "read scope")
    refused(anonymous.get(url), 401, "required")
    # A key never travels in the query string (it would end up in proxies' logs).
    refused(anonymous.get(url, params={"token": make_key("read")}), 401, "malformed")
    altered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    refused(client(api_server, altered).get(url), 401, "bad signature")


@pytest.mark.parametrize(("body", "field"), [
    ({}, "body"),
    ({"all": False}, "body"),
    ({"ids": [], "all": True}, "ids"),
    ({"ids": ["not-a-uuid"]}, "ids.0"),
    ({"ids": "0b4f5ab6-2bd1-4bd8-9c6e-6b1c3c5b7a10"}, "ids"),
    ({"ids": [str(uuid.uuid4()) for _ in range(MAX_IDS + 1)]}, "ids"),
    ({"all": "yes"}, "all"),
    ({"all": True, "until": "short"}, "until"),
    ({"all": True, "until": "A" * 34}, "until"),
    ({"ids": [str(uuid.uuid4())], "until": "A" * 34}, "until"),
    ({"all": True, "colour": "red"}, "colour"),
    ([1], "body"),
])
def test_bad_mark_bodies_are_422_naming_the_field(
    reader: httpx.Client, body: Any, field: str,
) -> None:
    answer = reader.post("/v1/recipients/ann/inbox/read", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["field"] == field


def test_bad_requests_are_refused_with_a_json_error(reader: httpx.Client) -> None:
    url = "/v1/recipients/ann/inbox"
    empty = reader.post(f"{url}/read", content=b"")
    assert empty.status_code == 400 and '{"all": true}' in empty.json()["error"]
    assert reader.post(f"{url}/read", content=b"{").status_code == 400
    huge = reader.post(f"{url}/read", content=b" " * (64 * 1024 + 1))
    assert huge.status_code == 413
    for params, field in (({"cursor": "A" * 34}, "cursor"), ({"cursor": "x"}, "query.cursor"),
                          ({"limit": MAX_PAGE_SIZE + 1}, "query.limit"),
                          ({"filter": "read"}, "query.filter")):
        answer = reader.get(url, params=params)
        assert answer.status_code == 422 and answer.json()["detail"][0]["field"] == field
    blank = reader.get("/v1/recipients/%20/inbox")
    assert blank.status_code == 422 and blank.json()["detail"][0]["field"] == "recipient_id"
    assert reader.post(f"{url}/unarchive", json={"all": True}).status_code == 404
