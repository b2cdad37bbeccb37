"""The API tests' fixtures: a running server (one per module), keys, an HTTP client."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.api.server import TOKEN_SECRET, ApiServer


@pytest.fixture(scope="module")
def api_server(database: str) -> Iterator[ApiServer]:
    server = ApiServer.start(env={"NOTIFIER_API_TOKEN_SECRET": TOKEN_SECRET})
    yield server
    server.stop()


@pytest.fixture
def make_key() -> Callable[..., str]:
    """``make_key("send", "read")``: a new key with these scopes (stored as the CLI does)."""
    from notifier.storage.api_keys import Scope, create_key
    from notifier.storage.db import session_scope

    def make(*scopes: str, name: str = "test", rate_limit: int | None = None) -> str:
        with session_scope() as session:
            _, key = create_key(session, name, [Scope(s) for s in scopes or ("admin",)],
                                rate_limit)
        return key

    return make


@pytest.fixture
def api(api_server: ApiServer, make_key: Callable[..., str]) -> Iterator[httpx.Client]:
    """An HTTP client of the server with an admin key (keep-alive, as integrations use)."""
    with httpx.Client(base_url=api_server.url, timeout=30,
                      headers={"Authorization": f"Bearer {make_key('admin')}"}) as client:
        yield client
