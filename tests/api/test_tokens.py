"""``POST /v1/recipients/{id}/tokens``: a read key mints a browser's token for one
recipient, against a running server; the token then reads that inbox and no other."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest

from notifier.pipeline.recipient_tokens import mint, verify
from notifier.settings import Settings
from tests.api.server import TOKEN_SECRET, ApiServer

TOKENS = Settings(api_token_secret=TOKEN_SECRET)
#: The default NOTIFIER_API_TOKEN_TTL and NOTIFIER_API_TOKEN_MAX_TTL.
TTL, MAX_TTL = 3600, 86400


def post(server: ApiServer, credential: str | None, recipient: str = "ann",
         **body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    return httpx.post(f"{server.url}/v1/recipients/{recipient}/tokens", headers=headers,
                      json=body or None, timeout=30)


def expires_in(answer: httpx.Response) -> float:
    return datetime.fromisoformat(answer.json()["expires_at"]).timestamp() - time.time()


def test_a_read_key_mints_a_token_that_reads_that_inbox_alone(
    api_server: ApiServer, make_key: Callable[..., str],
) -> None:
    answer = post(api_server, make_key("read"), ttl=120)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    minted = answer.json()
    assert set(minted) == {"token", "recipient_id", "expires_at"}
    assert minted["recipient_id"] == "ann" and 115 < expires_in(answer) <= 120
    assert verify(minted["token"], recipient_id="ann", settings=TOKENS) == "ann"
    bearer = {"Authorization": f"Bearer {minted['token']}"}
    inbox = f"{api_server.url}/v1/recipients/%s/inbox"
    assert httpx.get(inbox % "ann", headers=bearer).status_code == 200
    assert httpx.get(inbox % "bob", headers=bearer).status_code == 401
    default = post(api_server, make_key("admin"), "bob")
    assert default.status_code == 200 and TTL - 5 < expires_in(default) <= TTL
    assert post(api_server, make_key("read"), "ann", ttl=MAX_TTL).status_code == 200


def test_who_may_mint(api_server: ApiServer, make_key: Callable[..., str]) -> None:
    """Only an API key with the read scope: a token, even for this recipient, cannot
    mint another (its lifetime would never end); a send-only key is 403."""
    token = mint("ann", 60, settings=TOKENS)
    by_token = post(api_server, token)
    assert by_token.status_code == 401 and "cannot mint" in by_token.json()["error"]
    assert by_token.headers["www-authenticate"] == "Bearer"
    by_query = httpx.post(f"{api_server.url}/v1/recipients/ann/tokens",
                          params={"token": token})
    assert by_query.status_code == 401
    assert post(api_server, make_key("send")).status_code == 403
    assert post(api_server, None).status_code == 401
    assert post(api_server, "nk_not-a-key").status_code == 401


@pytest.mark.parametrize(("body", "field"), [
    ({"ttl": 0}, "ttl"), ({"ttl": -5}, "ttl"), ({"ttl": MAX_TTL + 1}, "ttl"),
    ({"ttl": "60"}, "ttl"), ({"ttl": True}, "ttl"), ({"ttl": 10**400}, "ttl"),
    ({"ttl": 60, "recipient": "bob"}, "recipient"), ([60], "body"),
])
def test_bad_bodies_are_422_naming_the_field(
    api_server: ApiServer, make_key: Callable[..., str], body: Any, field: str,
) -> None:
    answer = httpx.post(f"{api_server.url}/v1/recipients/ann/tokens", json=body,
                        headers={"Authorization": f"Bearer {make_key('read')}"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["field"] == field


def test_a_blank_recipient_or_an_oversized_body_is_refused(
    api_server: ApiServer, make_key: Callable[..., str],
) -> None:
    key = make_key("read")
    blank = post(api_server, key, "%20")
    assert blank.status_code == 422 and blank.json()["detail"][0]["field"] == "recipient_id"
    huge = httpx.post(f"{api_server.url}/v1/recipients/ann/tokens", content=b" " * 2000,
                      headers={"Authorization": f"Bearer {key}"})
    assert huge.status_code == 413


def test_without_a_secret_minting_is_503_naming_the_variable(
    database: str, make_key: Callable[..., str],
) -> None:
    server = ApiServer.start()  # the run's environment sets no token secret
    try:
        answer = post(server, make_key("read"))
    finally:
        server.stop()
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"].startswith("NOTIFIER_API_TOKEN_SECRET: not set")
