"""The Apprise channel, end to end: Apprise's ``json://`` plugin posting to a real local
HTTP server."""

from __future__ import annotations

import uuid
from typing import Any

from notifier.channels.apprise import AppriseChannel
from notifier.channels.base import (
    AddressError,
    OutgoingMessage,
    PermanentError,
    RetryableError,
)
from tests.http_server import HttpServer, http_server_fixture  # noqa: F401


def message(address: str | None, **overrides: Any) -> OutgoingMessage:
    fields: dict[str, Any] = {
        "delivery_id": uuid.uuid4(),
        "recipient_id": "user-1",
        "address": address,
        "type": "backup.failed",
        "priority": "high",
        "title": "Backup failed",
        "body": "Disk full on db-1.",
    }
    return OutgoingMessage(**{**fields, **overrides})


def channel(options: str = "allow_private=yes") -> AppriseChannel:
    return AppriseChannel(f"apprise://?{options}")


def json_url(server: HttpServer, path: str = "/notify") -> str:
    return f"json://127.0.0.1:{server.port}{path}"


def test_json_plugin_posts_to_the_server(http_server: HttpServer) -> None:
    [result] = channel().send_batch([message(json_url(http_server))])

    assert result.sent
    [request] = http_server.wait_for(1)
    assert (request.method, request.path) == ("POST", "/notify")
    assert request.json["title"] == "Backup failed"
    assert request.json["message"] == "Disk full on db-1."


def test_one_apprise_object_per_address(http_server: HttpServer) -> None:
    first, second = json_url(http_server, "/a"), json_url(http_server, "/b")

    results = list(channel().send_batch([message(first), message(second), message(first)]))

    assert all(r.sent for r in results)
    assert [r.path for r in http_server.wait_for(3)] == ["/a", "/b", "/a"]


def test_unknown_url_is_the_recipients_problem(http_server: HttpServer) -> None:
    results = list(channel().send_batch([
        message("bogus://whatever/secret-token"), message("not even a url"), message(None),
    ]))

    assert all(isinstance(r.error, AddressError) for r in results)
    assert not any(r.error.provider_failure for r in results)
    assert "bogus:// address of recipient user-1 is not one URL Apprise knows" in str(
        results[0].error
    )
    assert "secret-token" not in str(results[0].error)
    assert http_server.requests == []


def test_server_error_is_retryable(http_server: HttpServer) -> None:
    http_server.respond_always(500, "boom")

    [result] = channel().send_batch([message(json_url(http_server, "/x/y/zz-path-secret"))])

    assert isinstance(result.error, RetryableError)
    assert not result.error.provider_failure
    assert "zz-path-secret" not in str(result.error)
    assert len(http_server.wait_for(1)) == 1


def test_password_not_shown(http_server: HttpServer) -> None:
    http_server.respond_always(500)
    address = f"json://user:hunter2pw@127.0.0.1:{http_server.port}/n"

    [result] = channel().send_batch([message(address)])

    assert isinstance(result.error, RetryableError)
    assert "hunter2pw" not in str(result.error)


def test_private_host_refused_for_generic_http_schemes(http_server: HttpServer) -> None:
    [result] = channel("allow_private=no").send_batch([message(json_url(http_server))])

    assert isinstance(result.error, PermanentError)
    assert str(result.error).startswith("apprise target 127.0.0.1 is a loopback address")
    assert http_server.connections == 0


def test_apprise_is_the_library() -> None:
    import apprise

    import notifier.channels.apprise as module

    assert module.apprise is apprise
    assert hasattr(apprise, "Apprise")
