"""The SMS channel against a local fake of Twilio's Messages API (the one provider that
cannot be reached for real here): a real HTTP server answering in Twilio's shape."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest

from notifier.channels.base import (
    ConfigurationError,
    OutgoingMessage,
    PermanentError,
    RetryableError,
)
from notifier.channels.sms import MAX_BODY, SmsChannel, e164
from tests.http_server import HttpServer, http_server_fixture  # noqa: F401

SID = "AC0123456789abcdef"
TOKEN = "tw1l10-auth-token"


def message(phone: str | None, **overrides: Any) -> OutgoingMessage:
    fields: dict[str, Any] = {
        "delivery_id": uuid.uuid4(),
        "recipient_id": "user-1",
        "address": phone,
        "type": "login.code",
        "priority": "critical",
        "title": "Login code",
        "body": "Your code is 123456.",
    }
    return OutgoingMessage(**{**fields, **overrides})


def sms(server: HttpServer, extra: str = "") -> SmsChannel:
    return SmsChannel(
        f"twilio://{SID}:{TOKEN}@127.0.0.1:{server.port}"
        f"?from=%2B15550001111&https=no&allow_private=yes{extra}"
    )


def twilio_error(server: HttpServer, status: int, code: int, text: str) -> None:
    server.respond_json(status, {"code": code, "message": text, "status": status,
                                 "more_info": f"https://www.twilio.com/docs/errors/{code}"})


def test_posts_the_twilio_form_with_basic_auth(http_server: HttpServer) -> None:
    http_server.respond_json(201, {"sid": "SM123", "status": "queued"})

    [result] = sms(http_server).send_batch([message("+1 (555) 123-4567")])

    assert result.sent
    [request] = http_server.wait_for(1)
    assert request.method == "POST"
    assert request.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.form == {
        "To": "+15551234567",
        "From": "+15550001111",
        "Body": "Login code\nYour code is 123456.",
    }
    scheme, _, credentials = request.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(credentials).decode() == f"{SID}:{TOKEN}"


def test_long_text_is_cut_to_1600(http_server: HttpServer) -> None:
    [result] = sms(http_server).send_batch([message("+15551234567", body="x" * 5000)])

    assert result.sent
    body = http_server.wait_for(1)[0].form["Body"]
    assert len(body) == MAX_BODY
    assert body.endswith("…")


@pytest.mark.parametrize(
    "phone",
    [None, "", "5551234567", "+1555", "+1234567890123456", "+0551234567", "+1555abc4567"],
)
def test_phone_must_be_e164(http_server: HttpServer, phone: str | None) -> None:
    [result] = sms(http_server).send_batch([message(phone)])

    assert isinstance(result.error, PermanentError)
    assert "E.164" in str(result.error)
    assert http_server.requests == []


def test_e164() -> None:
    assert e164("+49 30 1234-5678") == "+493012345678"
    assert e164("+12345678") == "+12345678"


@pytest.mark.parametrize("code", [21211, 21614])
def test_invalid_number_is_permanent(http_server: HttpServer, code: int) -> None:
    twilio_error(http_server, 400, code, "The 'To' number +15551234567 is not valid.")

    [result] = sms(http_server).send_batch([message("+15551234567")])

    assert isinstance(result.error, PermanentError)
    assert str(result.error) == f"Twilio error {code}: invalid or non-mobile 'To' number"


def test_other_twilio_errors(http_server: HttpServer) -> None:
    twilio_error(http_server, 429, 20429, "Too Many Requests")
    http_server.respond(500, "oops")
    twilio_error(http_server, 401, 20003, "Authenticate")
    twilio_error(http_server, 400, 21606, "The From number is not a valid SMS-capable number")
    phone = "+15551234567"

    limited, failed, refused, bad = sms(http_server).send_batch([message(phone)] * 4)

    assert isinstance(limited.error, RetryableError)
    assert "Twilio error 20429: Too Many Requests" in str(limited.error)
    assert isinstance(failed.error, RetryableError)
    assert isinstance(refused.error, ConfigurationError)
    assert isinstance(bad.error, PermanentError)
    assert "21606" in str(bad.error)
    errors = [str(r.error) for r in (limited, failed, refused, bad)]
    assert all(TOKEN not in text for text in errors)


def test_unreachable_provider_fails_the_rest_at_once(http_server: HttpServer) -> None:
    http_server.delay = 2
    results = list(sms(http_server, "&timeout=0.3").send_batch([message("+15551234567")] * 3))

    assert all(isinstance(r.error, RetryableError) for r in results)
    assert len(http_server.requests) == 1
    assert results[0].error is not None and results[0].error.provider_failure
    assert results[1].error is not None and not results[1].error.provider_failure


def test_configuration(http_server: HttpServer) -> None:
    channel = sms(http_server)
    assert TOKEN not in repr(channel)
    assert channel.api_url.startswith("http://127.0.0.1:")
    default = SmsChannel(f"twilio://{SID}:{TOKEN}@?from=%2B15550001111")
    assert default.api_url == (
        f"https://api.twilio.com/2010-04-01/Accounts/{SID}/Messages.json"
    )
    for url in (f"twilio://{SID}@api.twilio.com?from=%2B1555", f"twilio://{SID}:{TOKEN}@api.twilio.com"):
        with pytest.raises(ConfigurationError) as info:
            SmsChannel(url)
        assert TOKEN not in str(info.value)


def test_twilio_host_must_be_public_unless_allowed(http_server: HttpServer) -> None:
    channel = SmsChannel(
        f"twilio://{SID}:{TOKEN}@127.0.0.1:{http_server.port}?from=%2B15550001111&https=no"
        "&allow_private=no"
    )
    [result] = channel.send_batch([message("+15551234567")])

    assert isinstance(result.error, PermanentError)
    assert "loopback" in str(result.error)
    assert http_server.connections == 0
