"""Keys: made by the CLI (shown once), stored hashed, scoped, rate limited, revoked at once."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import httpx
import pytest
from sqlalchemy import text

from tests.api.server import NOTIFIER, ROOT, ApiServer


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NOTIFIER, *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def rows(sql: str, **params: object) -> list[dict[str, object]]:
    from notifier.storage.db import session_scope

    with session_scope() as session:
        return [dict(row) for row in session.execute(text(sql), params).mappings()]


def test_the_cli_makes_a_key_prints_it_once_and_stores_only_its_hash(
    api_server: ApiServer,
) -> None:
    made = cli("api-keys", "create", "billing", "--scope", "read", "--scope", "send")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("nk_") and len(key) == 46
    [row] = rows("SELECT * FROM api_keys")
    assert row["name"] == "billing" and row["scopes"] == ["send", "read"]
    assert key not in str(row) and row["prefix"] == key[:11]
    listed = cli("api-keys", "list")
    assert listed.returncode == 0 and key[:11] in listed.stdout and key not in listed.stdout
    assert "never used" in listed.stdout

    answer = httpx.get(f"{api_server.url}/v1/notifications/{'0' * 32}",
                       headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 404  # authenticated, and nothing of that id
    [row] = rows("SELECT last_used_at FROM api_keys")
    assert row["last_used_at"] is not None


def test_a_revoked_key_fails_on_its_next_request(api_server: ApiServer) -> None:
    key = cli("api-keys", "create", "old", "--scope", "read").stdout.strip().splitlines()[-1]
    with httpx.Client(base_url=api_server.url,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        assert client.get("/v1/recipients/nobody/preferences").status_code == 404
        revoked = cli("api-keys", "revoke", key[:11])
        assert revoked.returncode == 0 and f"revoked {key[:11]}" in revoked.stdout
        answer = client.get("/v1/recipients/nobody/preferences")  # the same connection
    assert answer.status_code == 401
    assert answer.json() == {"error": "unknown or revoked API key", "detail": []}
    assert "REVOKED" in cli("api-keys", "list", "--all").stdout
    assert cli("api-keys", "revoke", key[:11]).returncode == 1  # nothing live of that name


@pytest.mark.parametrize("header", [
    None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer nk_" + "x" * 43,
    "Bearer not-a-key", "Token nk_" + "x" * 43, b"Bearer nk_" + b"\xe9" * 43,
])
def test_anything_but_a_live_key_is_401_with_a_json_error(
    api_server: ApiServer, header: str | bytes | None
) -> None:
    headers = {} if header is None else {"Authorization": header}
    answer = httpx.post(f"{api_server.url}/v1/notifications", headers=headers,
                        content=b'{"recipient": "u1", "type": "t", "title": "x"}')
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert set(answer.json()) == {"error", "detail"}


@pytest.mark.parametrize(("scopes", "method", "path", "allowed"), [
    (("read",), "POST", "/v1/notifications", False),
    (("send",), "GET", "/v1/notifications/" + "0" * 32, False),
    (("send",), "GET", "/v1/dead-letters", False),
    (("read",), "GET", "/v1/dead-letters", False),
    (("read",), "GET", "/v1/notifications/" + "0" * 32, True),
    (("admin",), "GET", "/v1/dead-letters", True),
    (("admin",), "GET", "/v1/notifications/" + "0" * 32, True),
])
def test_scopes(
    api_server: ApiServer, make_key: Callable[..., str], scopes: tuple[str, ...], method: str,
    path: str, allowed: bool,
) -> None:
    answer = httpx.request(method, api_server.url + path, content=b"[]",
                           headers={"Authorization": f"Bearer {make_key(*scopes)}"})
    if allowed:
        assert answer.status_code in (200, 404)
    else:
        assert answer.status_code == 403
        assert "scope" in answer.json()["error"]


def test_a_key_past_its_rate_limit_is_told_when_to_come_back(
    api_server: ApiServer, make_key: Callable[..., str],
) -> None:
    key = make_key("read", rate_limit=3)
    other = make_key("read")
    with httpx.Client(base_url=api_server.url) as client:
        answers = [client.get("/v1/recipients/r/preferences",
                              headers={"Authorization": f"Bearer {key}"}) for _ in range(5)]
        assert [a.status_code for a in answers] == [404, 404, 404, 429, 429]
        assert 1 <= int(answers[-1].headers["retry-after"]) <= 60
        assert answers[-1].json()["detail"][0]["limit"] == 3
        # Each key has its own window.
        assert client.get("/v1/recipients/r/preferences",
                          headers={"Authorization": f"Bearer {other}"}).status_code == 404


def test_several_processes_share_the_port_and_a_revocation(
    database: str, make_key: Callable[..., str],
) -> None:
    """NOTIFIER_API_WORKERS=2: both processes answer, and once a key is revoked every
    request fails, whichever process takes it (new connections spread over both)."""
    server = ApiServer.start(env={"NOTIFIER_API_WORKERS": "2"}, workers=2)
    try:
        key = make_key("read")
        url = f"{server.url}/v1/recipients/nobody/preferences"
        headers = {"Authorization": f"Bearer {key}"}
        assert {httpx.get(url, headers=headers).status_code for _ in range(10)} == {404}
        cli("api-keys", "revoke", key[:11])
        assert {httpx.get(url, headers=headers).status_code for _ in range(10)} == {401}
        assert server.log().count("Started server process") == 2
    finally:
        server.stop()


def test_a_revocation_reaches_the_caches_of_two_api_processes(
    api_server: ApiServer, make_key: Callable[..., str],
) -> None:
    """Two separate API processes that both cached a key (one without a rate limit, so
    with no counting to do) refuse it on their next request after the revoke; the keys
    they forgot with it are looked up again and still work."""
    other = ApiServer.start()
    try:
        unlimited, kept = make_key("read", rate_limit=0), make_key("read", name="kept")
        path = "/v1/recipients/nobody/preferences"
        clients = [httpx.Client(base_url=server.url, timeout=30) for server in (api_server, other)]

        def status(http: httpx.Client, key: str) -> int:
            return http.get(path, headers={"Authorization": f"Bearer {key}"}).status_code

        for http in clients:
            for key in (unlimited, kept, unlimited, kept):  # the second of each: from the cache
                assert status(http, key) == 404
        assert cli("api-keys", "revoke", unlimited[:11]).returncode == 0
        for http in clients:
            assert status(http, unlimited) == 401
            assert status(http, kept) == 404
            http.close()
    finally:
        other.stop()


def test_a_revoke_that_cannot_reach_redis_says_so_and_still_revokes(
    make_key: Callable[..., str],
) -> None:
    """The key is revoked in Postgres; one line says the caches may keep it a minute."""
    key = make_key("read")
    revoked = subprocess.run(
        [NOTIFIER, "api-keys", "revoke", key[:11]], capture_output=True, text=True,
        timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "NOTIFIER_REDIS_URL": "redis://127.0.0.1:1/0"},
    )
    assert revoked.returncode == 0 and f"revoked {key[:11]}" in revoked.stdout
    [warning] = revoked.stderr.strip().splitlines()
    assert "revoked in Postgres" in warning and "60 s" in warning
    assert rows("SELECT revoked_at FROM api_keys")[0]["revoked_at"] is not None


def test_a_cached_key_revoked_before_redis_lost_its_data_is_still_refused(
    api_server: ApiServer, make_key: Callable[..., str],
) -> None:
    """The generation lost after a revoke (a state Redis restarted empty) comes back as a
    value never seen before, so the key the process cached is looked up again."""
    from notifier.storage.api_keys import GENERATION_KEY
    from notifier.storage.state import state_redis

    key = make_key("read")
    with httpx.Client(base_url=api_server.url,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(2):  # looked up, then cached
            assert client.get("/v1/recipients/nobody/preferences").status_code == 404
        assert cli("api-keys", "revoke", key[:11]).returncode == 0
        state_redis().delete(GENERATION_KEY)
        assert client.get("/v1/recipients/nobody/preferences").status_code == 401
