"""Receipts in, through a real API process: our own event format, Twilio's signed status
callbacks and Mailgun's signed webhooks (its documented sample payloads), each moving a
sent delivery forward in the run's Postgres and suppressing addresses as it should."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from sqlalchemy import text

from notifier.api.providers import twilio_signature
from notifier.storage.db import session_scope
from tests.api.server import ApiServer

#: The address Twilio calls: the public one, not the server's own (a proxy between).
PUBLIC_URL = "https://notifier.example.com"
TWILIO_TOKEN = "twilio-auth-token-for-tests"
MAILGUN_KEY = "key-mailgun-signing-key-for-tests"
ENV = {
    "NOTIFIER_EVENTS_PUBLIC_URL": PUBLIC_URL,
    "NOTIFIER_CHANNELS__SMS": f"twilio://AC123:{TWILIO_TOKEN}@api.twilio.com?from=%2B15550001111",
    "NOTIFIER_MAILGUN_WEBHOOK_SIGNING_KEY": MAILGUN_KEY,
    "NOTIFIER_SUPPRESSION_SOFT_BOUNCES": "3",
    "NOTIFIER_SUPPRESSION_SOFT_BOUNCE_WINDOW": "7",
}

#: Mailgun's documented "delivered" sample (documentation.mailgun.com, Webhook
#: Payloads), its message-id and recipient ours; ``signed`` adds a fresh signature.
MAILGUN_DELIVERED: dict[str, Any] = {
    "event-data": {
        "id": "CPgfbmQMTCKtHW6uIWtuVe",
        "timestamp": 1521472262.908181,
        "log-level": "info",
        "event": "delivered",
        "delivery-status": {
            "tls": True, "mx-host": "smtp-in.example.com", "code": 250, "description": "",
            "session-seconds": 0.4331989288330078, "utf8": True, "attempt-no": 1,
            "message": "OK", "certificate-verified": True,
        },
        "flags": {"is-routed": False, "is-authenticated": True, "is-system-test": False,
                  "is-test-mode": False},
        "envelope": {"transport": "smtp", "sender": "bob@sample.mailgun.com",
                     "sending-ip": "209.61.154.250", "targets": "alice@example.com"},
        "message": {
            "headers": {"to": "Alice <alice@example.com>", "message-id": "",
                        "from": "Bob <bob@sample.mailgun.com>",
                        "subject": "Test delivered webhook"},
            "attachments": [], "size": 111,
        },
        "recipient": "alice@example.com",
        "recipient-domain": "example.com",
        "storage": {"url": "https://se.api.mailgun.net/v3/domains/sample.mailgun.com/"
                           "messages/message_key", "key": "message_key"},
        "campaigns": [], "tags": ["my_tag_1", "my_tag_2"],
        "user-variables": {"my_var_1": "Mailgun Variable #1", "my-var-2": "awesome"},
    },
}
#: Mailgun's documented permanent failure: ``failed``, severity permanent.
MAILGUN_HARD_BOUNCE: dict[str, Any] = copy.deepcopy(MAILGUN_DELIVERED)
MAILGUN_HARD_BOUNCE["event-data"].update({
    "event": "failed", "log-level": "error", "severity": "permanent", "reason": "bounce",
    "delivery-status": {
        "attempt-no": 1, "code": 550, "session-seconds": 0.0, "mx-host": "smtp-in.example.com",
        "message": "5.1.1 The email account that you tried to reach does not exist",
        "description": "",
    },
})


@pytest.fixture(scope="module")
def events_server(database: str) -> Iterator[ApiServer]:
    server = ApiServer.start(env=ENV)
    yield server
    server.stop()


@pytest.fixture
def client(events_server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=events_server.url, timeout=30) as http:
        yield http


@pytest.fixture
def relay(events_server: ApiServer, make_key: Callable[..., str]) -> Iterator[httpx.Client]:
    """A client with an ``events`` key, as a provider's relay would hold."""
    with httpx.Client(base_url=events_server.url, timeout=30,
                      headers={"Authorization": f"Bearer {make_key('events')}"}) as http:
        yield http


def sent_delivery(channel: str = "email", email: str | None = "Alice@Example.COM",
                  phone: str | None = None, status: str = "sent") -> uuid.UUID:
    """A recipient, a notification and its delivery, sent (as the worker leaves it)."""
    recipient, note, delivery = f"r-{uuid.uuid4().hex[:8]}", uuid.uuid4(), uuid.uuid4()
    with session_scope() as session:
        session.execute(text("INSERT INTO recipients (id, email, phone) VALUES (:r, :e, :p)"
                             " ON CONFLICT DO NOTHING"), {"r": recipient, "e": email, "p": phone})
        session.execute(text(
            "INSERT INTO notifications (id, recipient_id, type, priority, title, status)"
            " VALUES (:n, :r, 'alert', 'normal', 'hello', 'delivered')"),
            {"n": note, "r": recipient})
        session.execute(text(
            "INSERT INTO deliveries (id, notification_id, recipient_id, channel, priority,"
            " status, attempts, sent_at) VALUES (:d, :n, :r, :c, 'normal', :s, 1, now())"),
            {"d": delivery, "n": note, "r": recipient, "c": channel, "s": status})
    return delivery


def row(delivery: uuid.UUID) -> Any:
    with session_scope() as session:
        return session.execute(text(
            "SELECT status, provider_detail, provider_status_at FROM deliveries WHERE id = :d"
        ), {"d": delivery}).one()


def suppressed(channel: str) -> dict[str, str]:
    with session_scope() as session:
        return dict(session.execute(text(
            "SELECT address, source FROM suppressions WHERE channel = :c"), {"c": channel}).all())


def event(delivery: uuid.UUID, name: str, permanent: bool = False,
          detail: str = "") -> dict[str, Any]:
    return {"delivery_id": str(delivery), "event": name, "permanent": permanent,
            "detail": detail}


# --- our own format ----------------------------------------------------------------


def test_a_delivered_event_moves_sent_to_delivered_once(relay: httpx.Client) -> None:
    delivery = sent_delivery()
    answer = relay.post("/v1/events/email", json=event(delivery, "delivered", detail="250 OK"))
    assert answer.status_code == 200, answer.text
    assert answer.json() | {"delivery_id": None} == {
        "delivery_id": None, "result": "applied", "status": "delivered", "suppressed": False}
    status, detail, at = row(delivery)
    assert (status, detail) == ("delivered", "250 OK") and at is not None
    again = relay.post("/v1/events/email", json=event(delivery, "delivered"))
    assert again.json()["result"] == "unchanged" and row(delivery)[1] == "250 OK"


def test_a_hard_bounce_suppresses_and_a_late_delivered_does_not_undo_it(
    relay: httpx.Client,
) -> None:
    delivery = sent_delivery(email="  Alice@Example.COM ")
    bounce = relay.post("/v1/events/email", json=event(
        delivery, "bounced", permanent=True, detail="550 5.1.1 no such user"))
    assert bounce.json()["status"] == "bounced" and bounce.json()["suppressed"] is True
    assert suppressed("email") == {"alice@example.com": "bounce"}
    late = relay.post("/v1/events/email", json=event(delivery, "delivered"))
    assert late.json()["result"] == "unchanged" and row(delivery)[0] == "bounced"
    # A complaint after a bounce still moves it on (the stronger event).
    assert relay.post("/v1/events/email", json=event(delivery, "complained")
                      ).json()["status"] == "complained"


def test_a_complaint_suppresses(relay: httpx.Client) -> None:
    delivery = sent_delivery(email="carol@example.com")
    answer = relay.post("/v1/events/email", json=event(delivery, "complained",
                                                       detail="abuse report"))
    assert answer.json() == {"delivery_id": str(delivery), "result": "applied",
                             "status": "complained", "suppressed": True}
    assert suppressed("email") == {"carol@example.com": "complaint"}


def test_soft_bounces_suppress_at_the_third_within_the_window(relay: httpx.Client) -> None:
    """Below N nothing is suppressed and the status stays sent (the provider still
    tries); a replay of one delivery's soft bounce counts once; the Nth suppresses."""
    first, second, third = (sent_delivery(email="dave@example.com") for _ in range(3))
    for delivery in (first, second, second):
        answer = relay.post("/v1/events/email", json=event(delivery, "bounced",
                                                           detail="452 mailbox full"))
        assert answer.json()["suppressed"] is False and answer.json()["status"] == "sent"
    assert suppressed("email") == {}
    answer = relay.post("/v1/events/email", json=event(third, "failed", detail="421 later"))
    assert answer.json()["suppressed"] is True
    assert suppressed("email") == {"dave@example.com": "soft-bounces"}
    with session_scope() as session:
        reason = session.execute(text("SELECT reason FROM suppressions")).scalar_one()
    assert reason == "3 soft bounces within 7 days: 421 later"


def test_refusals_name_the_field_and_are_counted(
    relay: httpx.Client, events_server: ApiServer, make_key: Callable[..., str],
) -> None:
    delivery = sent_delivery()
    bad = relay.post("/v1/events/email", json={
        "delivery_id": "nope", "event": "opened", "permanent": "yes", "detail": "x" * 501,
        "extra": 1})
    assert bad.status_code == 422
    assert {p["field"] for p in bad.json()["detail"]} == {
        "delivery_id", "event", "permanent", "detail", "extra"}
    assert relay.post("/v1/events/email", json=event(uuid.uuid4(), "delivered")
                      ).status_code == 404
    # A delivery of another channel is not this channel's.
    assert relay.post("/v1/events/sms", json=event(delivery, "delivered")).status_code == 404
    assert relay.post("/v1/events/pigeon", json=event(delivery, "delivered")).status_code == 404
    queued = sent_delivery(status="queued")
    refused = relay.post("/v1/events/email", json=event(queued, "delivered"))
    assert refused.status_code == 409 and "queued" in refused.json()["error"]
    assert relay.post("/v1/events/email", content=b"[1,", headers={
        "content-type": "application/json"}).status_code == 400
    assert relay.post("/v1/events/email", content=b"{}" + b" " * 70_000).status_code == 413
    for scopes in (("send",), ("read",)):
        assert httpx.post(f"{events_server.url}/v1/events/email",
                          json=event(delivery, "delivered"),
                          headers={"Authorization": f"Bearer {make_key(*scopes)}"}
                          ).status_code == 403
    assert httpx.post(f"{events_server.url}/v1/events/email",
                      json=event(delivery, "delivered")).status_code == 401
    assert row(delivery)[0] == "sent"
    # Whatever a relay passes on, the detail is stored as one printable line.
    surrogate = relay.post("/v1/events/email", headers={"content-type": "application/json"},
                           content=json.dumps(event(delivery, "delivered", detail="\ud800")))
    assert surrogate.status_code == 422 and surrogate.json()["detail"][0]["field"] == "detail"
    odd = relay.post("/v1/events/email", json=event(delivery, "delivered",
                                                    detail="250\x00 ok\r\n\tthanks\x7f"))
    assert odd.status_code == 200 and row(delivery)[1] == "250 ok thanks"
    scrape = _metrics()
    assert 'notifier_receipts_refused_total{reason="malformed",source="api"}' in scrape
    assert 'notifier_receipts_refused_total{reason="unknown delivery",source="api"}' in scrape


# --- Twilio --------------------------------------------------------------------------


def _twilio_post(client: httpx.Client, delivery: uuid.UUID | str, form: dict[str, str],
                 signature: str | None = "sign", url: str | None = None) -> httpx.Response:
    """POST as Twilio does to the StatusCallback the SMS channel set: signed over the
    public URL (``url`` overrides what is signed)."""
    path = f"/v1/events/twilio?{urlencode({'delivery_id': str(delivery)})}"
    headers = {}
    if signature == "sign":
        signature = twilio_signature(TWILIO_TOKEN, url or PUBLIC_URL + path, list(form.items()))
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    return client.post(path, data=form, headers=headers)


def _twilio_form(status: str, **extra: str) -> dict[str, str]:
    return {"MessageSid": "SM" + "a" * 32, "SmsSid": "SM" + "a" * 32, "AccountSid": "AC123",
            "MessageStatus": status, "SmsStatus": status, "To": "+15558675310",
            "From": "+15550001111", "ApiVersion": "2010-04-01", **extra}


def test_twilio_signature_is_the_documented_one() -> None:
    """Twilio's own example (docs, "Validating requests"): token 12345."""
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234",
              "From": "+14158675309", "To": "+18005551212"}
    assert twilio_signature("12345", "https://mycompany.com/myapp.php?foo=1&bar=2",
                            list(params.items())) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def test_twilio_callbacks_good_bad_and_missing_signatures(client: httpx.Client) -> None:
    delivery = sent_delivery("sms", email=None, phone="+1 (555) 867-5310")
    ignored = _twilio_post(client, delivery, _twilio_form("sent"))
    assert ignored.status_code == 200 and ignored.json()["result"] == "ignored"
    missing = _twilio_post(client, delivery, _twilio_form("delivered"), signature=None)
    assert missing.status_code == 401 and missing.json()["detail"] == [{"reason": "unsigned"}]
    forged = _twilio_post(client, delivery, _twilio_form("delivered"),
                          signature="RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert forged.status_code == 401
    # Signed over the server's own URL, not the public one Twilio called: refused.
    inner = client.base_url.join(f"/v1/events/twilio?delivery_id={delivery}")
    assert _twilio_post(client, delivery, _twilio_form("delivered"), url=str(inner)
                        ).status_code == 401
    # Another delivery's id in the query breaks the signature over the URL.
    other = sent_delivery("sms", email=None, phone="+15558675311")
    body = _twilio_form("delivered")
    signature = twilio_signature(TWILIO_TOKEN, f"{PUBLIC_URL}/v1/events/twilio?delivery_id="
                                 f"{delivery}", list(body.items()))
    assert client.post(f"/v1/events/twilio?delivery_id={other}", data=body,
                       headers={"X-Twilio-Signature": signature}).status_code == 401
    assert row(delivery)[0] == "sent" and row(other)[0] == "sent"
    good = _twilio_post(client, delivery, _twilio_form("delivered"))
    assert good.status_code == 200 and good.json()["status"] == "delivered"
    assert row(delivery)[1] == "Twilio delivered"


def test_twilio_undelivered_to_a_landline_suppresses_the_number(client: httpx.Client) -> None:
    delivery = sent_delivery("sms", email=None, phone="+1 555 867 5312")
    answer = _twilio_post(client, delivery, _twilio_form("undelivered", ErrorCode="30006",
                                                         To="+15558675312"))
    assert answer.json()["status"] == "undeliverable" and answer.json()["suppressed"] is True
    assert suppressed("sms") == {"+15558675312": "bounce"}
    soft = sent_delivery("sms", email=None, phone="+15558675313")
    answer = _twilio_post(client, soft, _twilio_form("failed", ErrorCode="30003"))
    assert answer.json()["suppressed"] is False and answer.json()["status"] == "sent"
    assert _twilio_post(client, "not-a-uuid", _twilio_form("delivered")).status_code == 422
    assert _twilio_post(client, uuid.uuid4(), _twilio_form("delivered")).status_code == 404


# --- Mailgun -------------------------------------------------------------------------


def _signed(payload: dict[str, Any], delivery: uuid.UUID, *, age: float = 0.0,
            token: str | None = None) -> dict[str, Any]:
    body = copy.deepcopy(payload)
    body["event-data"]["message"]["headers"]["message-id"] = f"{delivery}@notifier"
    timestamp = str(int(time.time() - age))
    token = token or uuid.uuid4().hex + uuid.uuid4().hex[:18]  # 50 characters, as Mailgun's
    body["signature"] = {"timestamp": timestamp, "token": token, "signature": hmac.new(
        MAILGUN_KEY.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()}
    return body


def test_mailgun_samples_good_tampered_stale_and_replayed(client: httpx.Client) -> None:
    delivery = sent_delivery(email="alice@example.com")
    good = _signed(MAILGUN_DELIVERED, delivery)
    answer = client.post("/v1/events/mailgun", json=good)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "delivered"
    status, detail, at = row(delivery)
    assert (status, detail) == ("delivered", "250 OK")
    assert at.timestamp() == pytest.approx(1521472262.908181)  # the event's own time
    replayed = client.post("/v1/events/mailgun", json=good)
    assert replayed.status_code == 409 and replayed.json()["detail"] == [{"reason": "replayed"}]
    tampered = _signed(MAILGUN_HARD_BOUNCE, delivery)
    tampered["signature"]["timestamp"] = str(int(tampered["signature"]["timestamp"]) + 1)
    assert client.post("/v1/events/mailgun", json=tampered).status_code == 401
    wrong_key = _signed(MAILGUN_HARD_BOUNCE, delivery)
    wrong_key["signature"]["signature"] = hmac.new(
        b"another key", b"x", hashlib.sha256).hexdigest()
    assert client.post("/v1/events/mailgun", json=wrong_key).status_code == 401
    stale = client.post("/v1/events/mailgun", json=_signed(MAILGUN_HARD_BOUNCE, delivery,
                                                           age=301))
    assert stale.status_code == 401 and stale.json()["detail"] == [{"reason": "stale"}]
    unsigned = copy.deepcopy(MAILGUN_HARD_BOUNCE)
    assert client.post("/v1/events/mailgun", json=unsigned).status_code == 401
    assert row(delivery)[0] == "delivered" and suppressed("email") == {}
    # The recipient changed address since: the one Mailgun reports bounced is suppressed.
    with session_scope() as session:
        session.execute(text("UPDATE recipients SET email = 'alice.new@example.com' WHERE id ="
                             " (SELECT recipient_id FROM deliveries WHERE id = :d)"),
                        {"d": delivery})
    bounce = client.post("/v1/events/mailgun", json=_signed(MAILGUN_HARD_BOUNCE, delivery))
    assert bounce.json()["status"] == "bounced" and bounce.json()["suppressed"] is True
    assert suppressed("email") == {"alice@example.com": "bounce"}
    assert row(delivery)[1] == ("permanent bounce 550 5.1.1 The email account that you"
                                " tried to reach does not exist")
    # Unknown to us: 406, so that Mailgun does not retry it for hours.
    assert client.post("/v1/events/mailgun", json=_signed(MAILGUN_DELIVERED, uuid.uuid4())
                       ).status_code == 406
    scrape = _metrics()
    for reason in ("replayed", "stale", "bad signature", "unsigned", "unknown delivery"):
        assert f'notifier_receipts_refused_total{{reason="{reason}",source="mailgun"}}' in scrape
    assert 'notifier_suppressions_total{channel="email",source="bounce"}' in scrape


def test_mailgun_events_not_ours_are_refused(client: httpx.Client) -> None:
    delivery = sent_delivery()
    foreign = _signed(MAILGUN_DELIVERED, delivery)
    foreign["event-data"]["message"]["headers"]["message-id"] = "20130503182626.1@mailgun.org"
    answer = client.post("/v1/events/mailgun", json=foreign)
    assert answer.status_code == 422 and "message-id" in answer.json()["error"]
    opened = _signed(MAILGUN_DELIVERED, delivery)
    opened["event-data"]["event"] = "opened"
    assert client.post("/v1/events/mailgun", json=opened).json()["result"] == "ignored"
    assert client.post("/v1/events/mailgun", json=[1]).status_code == 422


# --- the suppression list ------------------------------------------------------------


def test_suppressions_are_listed_added_and_removed_by_admin_keys(
    events_server: ApiServer, make_key: Callable[..., str],
) -> None:
    admin = {"Authorization": f"Bearer {make_key('admin')}"}
    with httpx.Client(base_url=events_server.url, headers=admin, timeout=30) as api:
        added = api.post("/v1/suppressions", json={"channel": "email",
                                                   "address": "Erin@Example.com"})
        assert added.status_code == 201 and added.json()["added"] is True
        assert api.post("/v1/suppressions", json={"channel": "email",
                                                  "address": "erin@example.com"}
                        ).status_code == 200
        bad = api.post("/v1/suppressions", json={"channel": "email", "address": "a\nb",
                                                 "reason": ""})
        assert bad.status_code == 422
        assert {p["field"] for p in bad.json()["detail"]} == {"address", "reason"}
        assert api.post("/v1/suppressions", json={"channel": "pigeon", "address": "x"}
                        ).status_code == 422
        [entry] = api.get("/v1/suppressions", params={"address": "ERIN"}).json()
        assert entry["address"] == "erin@example.com" and entry["source"] == "manual"
        assert api.get("/v1/suppressions", params={"channel": "sms"}).json() == []
        assert api.delete("/v1/suppressions", params={"channel": "email",
                                                      "address": "ERIN@example.com"}
                          ).status_code == 204
        assert api.delete("/v1/suppressions", params={"channel": "email",
                                                      "address": "erin@example.com"}
                          ).status_code == 404
    for scopes in (("send", "read"), ("events",)):
        headers = {"Authorization": f"Bearer {make_key(*scopes)}"}
        assert httpx.get(f"{events_server.url}/v1/suppressions", headers=headers
                         ).status_code == 403


def _metrics() -> str:
    """One scrape of this host's metrics directory (the API process writes there)."""
    from notifier.worker import metrics

    body, _ = metrics.exposition()
    return body.decode()


def test_the_notification_shows_what_the_provider_said(
    relay: httpx.Client, events_server: ApiServer, make_key: Callable[..., str],
) -> None:
    delivery = sent_delivery(email="frank@example.com")
    relay.post("/v1/events/email", json=event(delivery, "bounced", permanent=True,
                                              detail="550 5.1.1 no such user"))
    with session_scope() as session:
        note = session.execute(text("SELECT notification_id FROM deliveries WHERE id = :d"),
                               {"d": delivery}).scalar_one()
    shown = httpx.get(f"{events_server.url}/v1/notifications/{note}",
                      headers={"Authorization": f"Bearer {make_key('read')}"}).json()
    [seen] = shown["deliveries"]
    assert (seen["status"], seen["provider_detail"]) == ("bounced", "550 5.1.1 no such user")
    assert seen["provider_status_at"] is not None


def test_the_status_callback_the_sms_channel_sets_is_the_one_taken(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """End to end over the URL itself: the channel's ``StatusCallback`` for a message,
    called as Twilio calls it (its path and query on our server, signed whole)."""
    from urllib.parse import urlsplit

    from notifier.channels.base import OutgoingMessage
    from notifier.channels.sms import status_callback
    from notifier.settings import get_settings

    delivery = sent_delivery("sms", email=None, phone="+15558675314")
    monkeypatch.setenv("NOTIFIER_EVENTS_PUBLIC_URL", PUBLIC_URL)
    get_settings.cache_clear()
    try:
        callback = status_callback(OutgoingMessage(
            delivery_id=delivery, recipient_id="r", address="+15558675314", type="alert",
            priority="normal", title="t", body=""))
    finally:
        monkeypatch.delenv("NOTIFIER_EVENTS_PUBLIC_URL")
        get_settings.cache_clear()
    assert callback is not None
    form = _twilio_form("delivered")
    parts = urlsplit(callback)
    answer = client.post(f"{parts.path}?{parts.query}", data=form, headers={
        "X-Twilio-Signature": twilio_signature(TWILIO_TOKEN, callback, list(form.items()))})
    assert answer.status_code == 200 and answer.json()["status"] == "delivered"
