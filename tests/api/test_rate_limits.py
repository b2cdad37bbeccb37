"""Rate limits over HTTP: a key's limit across two API processes, exact or within the
bound of their reads of Redis (``notifier.api.key_windows``), the script counting them,
and the recipient tokens' limit."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest

from notifier.pipeline.recipient_tokens import mint
from notifier.settings import Settings
from tests.api.server import TOKEN_SECRET, ApiServer

pytestmark = pytest.mark.broker  # the sends are published

#: Requests per minute of the limited server's tokens (NOTIFIER_API_RATE_LIMIT_PER_MINUTE).
TOKEN_LIMIT = 3


def within_one_window() -> None:
    """Wait out the end of a minute: the windows are fixed minutes of the Redis clock,
    and a window that resets midway would grant more than the limit."""
    left = 60 - time.time() % 60
    if left < 8:
        time.sleep(left + 0.5)


#: Every request waits for a read of Redis begun after it arrived.
EXACT = {"NOTIFIER_API_KEY_SYNC_INTERVAL": "0"}
NOTE = {"recipient": "u1", "type": "welcome", "title": "Hello"}


@pytest.fixture(scope="module")
def limited_server(database: str) -> Iterator[ApiServer]:
    """Exact key windows; recipient tokens limited to TOKEN_LIMIT a minute."""
    server = ApiServer.start(env={"NOTIFIER_API_TOKEN_SECRET": TOKEN_SECRET, **EXACT,
                                  "NOTIFIER_API_RATE_LIMIT_PER_MINUTE": str(TOKEN_LIMIT)})
    yield server
    server.stop()


def test_an_exact_limit_holds_across_two_processes_under_concurrent_sends(
    limited_server: ApiServer, make_key: Callable[..., str],
) -> None:
    """NOTIFIER_API_KEY_SYNC_INTERVAL=0: 40 concurrent sends to each of two API processes
    with a key of 25 a minute; each process takes the checks waiting at once in one
    script call, and between them exactly 25 are accepted, the others 429."""
    api_server = limited_server
    other = ApiServer.start(env=EXACT)
    try:
        key = make_key("send", rate_limit=25)

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=40)
            async with httpx.AsyncClient(timeout=60, limits=limits,
                                         headers={"Authorization": f"Bearer {key}"}) as http:
                return await asyncio.gather(*(
                    http.post(f"{server.url}/v1/notifications", json=NOTE)
                    for _ in range(40) for server in (api_server, other)))

        within_one_window()
        answers = asyncio.run(burst())
    finally:
        other.stop()
    assert Counter(answer.status_code for answer in answers) == {202: 25, 429: 55}
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["detail"] == [{"limit": 25, "retry_after":
                                         int(refused.headers["retry-after"])}]


def test_between_reads_each_process_keeps_the_limit_and_the_next_read_ends_it(
    api_server: ApiServer, make_key: Callable[..., str],
) -> None:
    """The default interval: a process answers from its last read and counts what it
    lets through (those its call in flight is counting too), so on its own it never
    passes the limit, even under 20 concurrent sends; two may pass it by what one let
    through before its counts reached Redis; once the interval is over, both read the
    whole count and refuse."""
    from notifier.settings import get_settings

    other = ApiServer.start()
    try:
        key = make_key("send", rate_limit=5)
        headers = {"Authorization": f"Bearer {key}"}

        async def burst(server: ApiServer, count: int) -> list[int]:
            async with httpx.AsyncClient(timeout=60, headers=headers) as http:
                answers = await asyncio.gather(*(
                    http.post(f"{server.url}/v1/notifications", json=NOTE)
                    for _ in range(count)))
            return [answer.status_code for answer in answers]

        within_one_window()
        with httpx.Client(timeout=30, headers=headers) as http:
            def sends(server: ApiServer, count: int) -> list[int]:
                return [http.post(f"{server.url}/v1/notifications", json=NOTE).status_code
                        for _ in range(count)]

            first = asyncio.run(burst(api_server, 20))
            second = sends(other, 7)
            assert Counter(first) == {202: 5, 429: 15}
            assert second.count(202) <= 5 and 429 in second
            time.sleep(get_settings().api_key_sync_interval + 0.2)
            assert sends(api_server, 3) + sends(other, 3) == [429] * 6
    finally:
        other.stop()


def test_the_script_grants_a_batch_as_calls_one_by_one_would() -> None:
    """Three requests asking of a key with 4 left, then two more, a key without a limit,
    and a second key; then counts a process let through: granted in order up to the
    limit, nothing counted past it, admitted ones counted whatever the limit."""
    from notifier.pipeline.ratelimit import take_key_windows_async
    from notifier.settings import get_settings
    from notifier.storage.api_keys import GENERATION_KEY, rate_window_key
    from notifier.storage.state_async import connect_async

    limited, unlimited, second = (rate_window_key(n) for n in (1, 2, 3))

    async def take() -> list[tuple[str, list[tuple[int, float]]]]:
        client = connect_async(get_settings())
        try:
            return [await take_key_windows_async(client, GENERATION_KEY, windows, 60)
                    for windows in ([(limited, 4, 0, 3), (unlimited, 0, 0, 5)],
                                    [(limited, 4, 0, 2), (second, 1, 0, 3)],
                                    [(limited, 4, 2, 1)])]
        finally:
            await client.aclose()

    within_one_window()
    first, then, last = asyncio.run(take())
    assert first[0] == then[0] == last[0]  # the generation, made once
    assert [(w.granted, w.used) for w in first[1]] == [(3, 3), (5, 0)]
    assert [(w.granted, w.used) for w in then[1]] == [(1, 4), (1, 1)]
    assert [(w.granted, w.used) for w in last[1]] == [(0, 6)]
    reset = last[1][0].reset
    assert reset % 60 == 0 and 0 < reset - time.time() <= 60

    from notifier.storage.state import state_redis

    counted = state_redis().mget([limited, unlimited, second])
    assert counted == [b"6", None, b"1"]


def test_a_recipients_tokens_past_the_limit_are_429_with_retry_after(
    limited_server: ApiServer,
) -> None:
    """The tokens of one recipient share its window (the API's per-key limit); another
    recipient's tokens have their own."""
    settings = Settings(api_token_secret=TOKEN_SECRET)
    token, again = (mint("ann", 600, settings=settings) for _ in range(2))
    within_one_window()
    with httpx.Client(base_url=limited_server.url, timeout=30) as http:
        answers = [http.get("/v1/recipients/ann/inbox", params={"token": t})
                   for t in (token, again, token, again, token)]
        other = http.get("/v1/recipients/bo/inbox",
                         headers={"Authorization": f"Bearer {mint('bo', 600, settings=settings)}"})
    assert [a.status_code for a in answers] == [200] * TOKEN_LIMIT + [429, 429], answers[-1].text
    refused = answers[-1]
    assert refused.json()["error"] == (f"rate limit of {TOKEN_LIMIT} requests per minute"
                                       " reached for this recipient's tokens")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["detail"] == [{"limit": TOKEN_LIMIT, "retry_after":
                                         int(refused.headers["retry-after"])}]
    assert other.status_code == 200
