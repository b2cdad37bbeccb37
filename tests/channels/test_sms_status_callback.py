"""The SMS channel asks Twilio for status callbacks when receipts are taken: every
message's form carries ``StatusCallback``, our public events URL with its delivery id
(Twilio signs that URL when it calls back: ``tests/api/test_events.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from notifier.settings import get_settings
from tests.channels.test_sms import message, sms
from tests.http_server import HttpServer, http_server_fixture  # noqa: F401


@pytest.fixture
def public_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("NOTIFIER_EVENTS_PUBLIC_URL", "https://notifier.example.com/")
    get_settings.cache_clear()
    yield "https://notifier.example.com"
    monkeypatch.delenv("NOTIFIER_EVENTS_PUBLIC_URL")
    get_settings.cache_clear()


def test_every_sms_carries_its_status_callback(http_server: HttpServer, public_url: str) -> None:
    http_server.respond_json(201, {"sid": "SM123", "status": "queued"})
    sent = [message("+15551234567"), message("+15551234568")]
    assert all(result.sent for result in sms(http_server).send_batch(sent))
    for request, original in zip(http_server.wait_for(2), sent, strict=True):
        callback = urlsplit(request.form["StatusCallback"])
        assert f"{callback.scheme}://{callback.netloc}" == public_url
        assert callback.path == "/v1/events/twilio"
        assert parse_qs(callback.query) == {"delivery_id": [str(original.delivery_id)]}


def test_no_status_callback_without_a_public_url(http_server: HttpServer) -> None:
    http_server.respond_json(201, {"sid": "SM123", "status": "queued"})
    [result] = sms(http_server).send_batch([message("+15551234567")])
    assert result.sent and "StatusCallback" not in http_server.wait_for(1)[0].form
