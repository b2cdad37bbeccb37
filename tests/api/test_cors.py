"""CORS from ``NOTIFIER_API_CORS_ORIGINS``: a running server answers preflights and
requests from the origins set, with no credentials, and nothing to any other origin."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator

import httpx
import pytest

from notifier.pipeline.recipient_tokens import mint
from notifier.settings import Settings
from tests.api.server import NOTIFIER, ROOT, TOKEN_SECRET, ApiServer

ALLOWED = "https://app.example.com"
INBOX = "/v1/recipients/ann/inbox"


@pytest.fixture(scope="module")
def cors_server(database: str) -> Iterator[ApiServer]:
    server = ApiServer.start(env={
        "NOTIFIER_API_CORS_ORIGINS": f"{ALLOWED.upper()}:443, http://localhost:3000",
        "NOTIFIER_API_TOKEN_SECRET": TOKEN_SECRET,
    })
    yield server
    server.stop()


def preflight(server: ApiServer, origin: str, method: str = "GET",
              headers: str = "authorization") -> httpx.Response:
    return httpx.options(f"{server.url}{INBOX}", headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    })


def cors_headers(answer: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in answer.headers.items()
            if name.startswith("access-control-")}


def test_an_allowed_origin_gets_the_preflight_and_the_answer(cors_server: ApiServer) -> None:
    """The origin as set (upper case, default port) matches what a browser sends."""
    answer = preflight(cors_server, ALLOWED, "POST",
                       "authorization,content-type,idempotency-key,last-event-id")
    assert answer.status_code == 200, answer.text
    allowed = cors_headers(answer)
    assert allowed["access-control-allow-origin"] == ALLOWED
    assert set(allowed["access-control-allow-methods"].split(", ")) == {"GET", "POST", "PUT"}
    assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= {
        h.strip().lower() for h in allowed["access-control-allow-headers"].split(",")}
    assert "access-control-allow-credentials" not in allowed
    token = mint("ann", 60, settings=Settings(api_token_secret=TOKEN_SECRET))
    read = httpx.get(f"{cors_server.url}{INBOX}", headers={
        "Origin": "http://localhost:3000", "Authorization": f"Bearer {token}"})
    assert read.status_code == 200
    assert cors_headers(read) == {"access-control-allow-origin": "http://localhost:3000",
                                  "access-control-expose-headers": "Retry-After"}
    refused = httpx.get(f"{cors_server.url}{INBOX}", headers={"Origin": ALLOWED})
    assert refused.status_code == 401  # errors carry the header too: the page reads them
    assert cors_headers(refused)["access-control-allow-origin"] == ALLOWED


@pytest.mark.parametrize("origin", ["https://evil.example", "http://app.example.com",
                                    "https://app.example.com:8443", "null"])
def test_any_other_origin_gets_no_cors_header(cors_server: ApiServer, origin: str) -> None:
    answer = preflight(cors_server, origin)
    assert answer.status_code == 400
    assert cors_headers(answer) == {}
    assert answer.json()["error"].startswith("cross-origin request refused (origin")
    read = httpx.get(f"{cors_server.url}/v1/health", headers={"Origin": origin})
    assert read.status_code == 200 and cors_headers(read) == {}


def test_a_method_or_header_not_allowed_is_refused(cors_server: ApiServer) -> None:
    for answer in (preflight(cors_server, ALLOWED, "DELETE"),
                   preflight(cors_server, ALLOWED, "GET", "authorization,x-custom")):
        assert answer.status_code == 400 and cors_headers(answer) == {}


def test_unset_no_cors_headers_at_all(
    api_server: ApiServer, make_key: Callable[..., str],
) -> None:
    answer = preflight(api_server, ALLOWED)
    assert answer.status_code == 405 and cors_headers(answer) == {}
    read = httpx.get(f"{api_server.url}{INBOX}", headers={
        "Origin": ALLOWED, "Authorization": f"Bearer {make_key('read')}"})
    assert read.status_code == 200 and cors_headers(read) == {}


@pytest.mark.parametrize(("value", "problem"), [
    ("https://app.example.com/", "not an origin"),
    ("https://app.example.com/inbox", "not an origin"),
    ("app.example.com", "not an origin"),
    ("https://user:pw@app.example.com", "not an origin"),
    ("http://localhost:70000", "not an origin"),
    ("*,https://app.example.com", "give it alone"),
])
def test_a_bad_origin_stops_the_server_with_one_line_naming_the_variable(
    value: str, problem: str,
) -> None:
    ran = subprocess.run([NOTIFIER, "api", "--port", "1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT),
                              "NOTIFIER_API_CORS_ORIGINS": value})
    assert ran.returncode != 0
    lines = [line for line in ran.stderr.splitlines() if "NOTIFIER_API_CORS_ORIGINS" in line]
    assert len(lines) == 1 and problem in lines[0], ran.stderr
    assert "Traceback" not in ran.stderr and "pw" not in lines[0]
