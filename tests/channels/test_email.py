"""The e-mail channel against a real SMTP server (aiosmtpd), no mocks."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from notifier.channels import email as email_channel
from notifier.channels.base import (
    AddressError,
    ConfigurationError,
    OutgoingMessage,
    PermanentError,
    RetryableError,
    SendResult,
)
from notifier.channels.email import EmailChannel
from tests.smtp_server import SmtpServer

PASSWORD = "s3cret-Pa55"


def message(n: int = 0, **fields: Any) -> OutgoingMessage:
    values: dict[str, Any] = {
        "delivery_id": uuid.uuid4(),
        "recipient_id": f"user-{n}",
        "address": f"user{n}@example.com",
        "type": "alert",
        "priority": "normal",
        "title": f"Title {n}",
        "body": f"Body {n}\nsecond line <b>&",
    }
    values.update(fields)
    return OutgoingMessage(**values)


@pytest.fixture
def channel(smtp_server: SmtpServer) -> Iterator[EmailChannel]:
    channel = EmailChannel(smtp_server.url(from_name="Notifier"))
    yield channel
    channel.close()


def send(channel: EmailChannel, messages: list[OutgoingMessage]) -> list[SendResult]:
    results = list(channel.send_batch(messages))
    assert [r.delivery_id for r in results] == [m.delivery_id for m in messages]
    return results


# --- what arrives ---------------------------------------------------------------------


def test_batch_arrives_over_one_connection_as_text_and_html(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    batch = [message(n, recipient_name=f"User {n}" if n else None) for n in range(3)]
    results = send(channel, batch)

    assert all(r.sent for r in results)
    assert smtp_server.connections == 1
    arrived = smtp_server.messages
    assert smtp_server.message_ids() == [str(m.delivery_id) for m in batch]
    for sent, mail, (mail_from, rcpt_tos) in zip(
        batch, arrived, smtp_server.envelopes, strict=True
    ):
        assert mail_from == "notifier@example.com"
        assert rcpt_tos == [sent.address]
        assert mail["Subject"] == sent.title
        assert mail["From"] == "Notifier <notifier@example.com>"
        expected_to = f"User {sent.recipient_id[-1]} <{sent.address}>"
        assert mail["To"] == (expected_to if sent.recipient_name else sent.address)
        assert mail["Message-ID"] == f"<{sent.delivery_id}@notifier>"
        assert mail["X-Notifier-Delivery-Id"] == str(sent.delivery_id)
        assert mail["Date"]
        assert mail.get_content_type() == "multipart/alternative"
        text, html = mail.iter_parts()
        assert text.get_content_type() == "text/plain"
        assert text.get_content() == sent.body + "\n"
        assert html.get_content_type() == "text/html"
        assert "second line &lt;b&gt;&amp;" in html.get_content()
        assert f"Body {sent.recipient_id[-1]}<br>" in html.get_content()


def test_a_long_digest_arrives_whole(smtp_server: SmtpServer, channel: EmailChannel) -> None:
    """Many lines, one far longer than SMTP's 1,000 bytes, and non-ASCII: every line goes
    out CRLF-terminated and short (quoted-printable), and comes back as it was sent."""
    body = "\n".join(f"- item {i}: Überweisung fällig, ünïcödé" for i in range(200))
    body += "\n" + "x" * 5000
    title = "200 Überweisungen " + "y" * 300
    [result] = send(channel, [message(body=body, title=title, recipient_name="Zoë Ärger")])
    assert result.sent, result.error
    [mail] = smtp_server.messages
    text, _ = mail.iter_parts()
    assert text.get_content() == body + "\n"
    assert mail["Subject"] == title
    assert mail["To"] == "Zoë Ärger <user0@example.com>"


def test_given_html_is_used_as_the_html_part(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    send(channel, [message(html="<h1>Digest</h1>")])

    _, html = smtp_server.messages[0].iter_parts()
    assert html.get_content() == "<h1>Digest</h1>\n"


def test_results_are_yielded_as_each_message_is_accepted(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    results = channel.send_batch([message(n) for n in range(3)])

    assert next(results).sent
    assert len(smtp_server.messages) == 1
    assert next(results).sent
    assert len(smtp_server.messages) == 2
    assert next(results).sent
    assert next(results, None) is None


def test_a_resend_keeps_the_message_id(smtp_server: SmtpServer, channel: EmailChannel) -> None:
    once = message()
    send(channel, [once])
    send(channel, [once])

    first, second = smtp_server.messages
    assert first["Message-ID"] == second["Message-ID"] == f"<{once.delivery_id}@notifier>"


# --- the kept session -----------------------------------------------------------------


def test_batches_reuse_the_session_until_close(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    assert all(r.sent for r in send(channel, [message(1), message(2)]))
    assert all(r.sent for r in send(channel, [message(3)]))
    assert smtp_server.connections == 1

    channel.close()
    assert all(r.sent for r in send(channel, [message(4)]))
    assert smtp_server.connections == 2
    assert len(smtp_server.messages) == 4


def test_reconnects_when_the_server_closed_the_kept_session(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    send(channel, [message(1)])
    smtp_server.drop_connections()

    results = send(channel, [message(2), message(3)])

    assert all(r.sent for r in results)
    assert smtp_server.connections == 2
    assert len(smtp_server.messages) == 3


def test_reconnects_after_a_server_restart(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    send(channel, [message(1)])
    smtp_server.stop()
    smtp_server.start()

    assert all(r.sent for r in send(channel, [message(2)]))
    assert len(smtp_server.messages) == 2


def test_an_idle_session_is_probed_and_replaced(
    smtp_server: SmtpServer, channel: EmailChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    send(channel, [message(1)])
    smtp_server.drop_connections()
    monkeypatch.setattr(email_channel, "IDLE_CHECK_SECONDS", 0.0)
    # The NOOP finds the session dead, so the one in-batch reconnect is still unused:
    # a second drop mid-batch is survived too.
    batch = channel.send_batch([message(2), message(3)])

    assert next(batch).sent
    smtp_server.drop_connections()
    assert next(batch).sent
    assert smtp_server.connections == 3


def test_only_one_reconnect_per_batch(smtp_server: SmtpServer, channel: EmailChannel) -> None:
    batch = channel.send_batch([message(n) for n in range(4)])
    assert next(batch).sent
    smtp_server.drop_connections()
    assert next(batch).sent  # the session died: replaced once
    smtp_server.drop_connections()

    rest = list(batch)  # died again: the batch gives up, the rest is retried later

    assert all(isinstance(r.error, RetryableError) for r in rest)
    assert len(rest) == 2
    assert smtp_server.connections == 2
    assert all(r.sent for r in send(channel, [message(5)]))  # the next batch starts afresh


def test_a_kept_session_to_a_server_gone_for_good_fails_the_batch(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    send(channel, [message(1)])
    smtp_server.stop()

    results = send(channel, [message(n) for n in range(2, 5)])

    assert all(isinstance(r.error, RetryableError) for r in results)
    assert all(r.error.provider_failure for r in results if r.error)


# --- SMTP answers ---------------------------------------------------------------------


def test_4xx_is_retryable_for_that_message_only(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    smtp_server.fail_next(1, 451, "greylisted, try again later")
    batch = [message(n) for n in range(3)]

    results = send(channel, batch)

    assert isinstance(results[0].error, RetryableError)
    assert str(results[0].error) == "SMTP 451: greylisted, try again later"
    assert results[1].sent and results[2].sent
    assert smtp_server.message_ids() == [str(m.delivery_id) for m in batch[1:]]
    assert smtp_server.connections == 1


def test_5xx_is_permanent_for_that_message_only(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    send(channel, [message(0)])
    smtp_server.fail_next(1, 554, "content rejected")

    results = send(channel, [message(1), message(2)])

    assert isinstance(results[0].error, PermanentError)
    assert not isinstance(results[0].error, RetryableError)
    assert str(results[0].error) == "SMTP 554: content rejected"
    assert results[1].sent
    assert len(smtp_server.messages) == 2
    assert smtp_server.connections == 1


def test_fail_always_fails_every_message_until_reset(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    smtp_server.fail_always()
    results = send(channel, [message(n) for n in range(3)])
    assert [str(r.error) for r in results] == ["SMTP 550: mailbox unavailable"] * 3
    assert smtp_server.messages == []

    smtp_server.reset()
    assert send(channel, [message(4)])[0].sent


def test_421_closes_the_session_and_the_next_message_reconnects(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    smtp_server.fail_next(1, 421, "shutting down")

    results = send(channel, [message(n) for n in range(3)])

    assert isinstance(results[0].error, RetryableError)
    assert results[1].sent and results[2].sent
    assert smtp_server.connections == 2


@pytest.mark.parametrize(("code", "kind"), [(550, PermanentError), (450, RetryableError)])
def test_refused_recipient_fails_that_message_only(
    smtp_server: SmtpServer, channel: EmailChannel, code: int, kind: type[Exception]
) -> None:
    smtp_server.refuse_recipient("user1@example.com", code)
    batch = [message(n) for n in range(3)]

    results = send(channel, batch)

    error = results[1].error
    assert isinstance(error, kind)
    assert str(error).startswith(f"SMTP {code}: ")
    assert "recipient refused" in str(error)
    if code == 550:
        assert error.provider_failure is False
    assert results[0].sent and results[2].sent
    assert smtp_server.message_ids() == [str(batch[0].delivery_id), str(batch[2].delivery_id)]
    assert smtp_server.connections == 1


# --- addresses and headers ------------------------------------------------------------


def test_header_injection_in_title_and_name_adds_no_header(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    sneaky = message(
        title="Hi\r\nBcc: evil@x.example\nX-Evil:\x00 1",
        recipient_name="Eve\r\nBcc: evil@x.example",
    )

    assert send(channel, [sneaky])[0].sent

    mail = smtp_server.messages[0]
    assert mail.get_all("Bcc") is None
    assert mail.get_all("X-Evil") is None
    assert mail.get_all("Subject") == ["Hi Bcc: evil@x.example X-Evil: 1"]
    (to,) = mail.get_all("To")
    assert to.addresses[0].display_name == "Eve Bcc: evil@x.example"
    assert to.addresses[0].addr_spec == "user0@example.com"
    assert smtp_server.envelopes[0][1] == ["user0@example.com"]


@pytest.mark.parametrize(
    "address",
    [
        "user@example.com\r\nBcc: evil@x.example",
        "user@example.com\n",
        "user@example.com, evil@x.example",
        "user@example.com;evil@x.example",
        "Eve <user@example.com>",
        "no-at-sign.example.com",
        "two@@example.com",
        "@example.com",
        "user@",
        "user@localhost",
        "user name@example.com",
        "",
    ],
)
def test_bad_address_is_permanent_and_never_reaches_the_server(
    smtp_server: SmtpServer, channel: EmailChannel, address: str
) -> None:
    results = send(channel, [message(1, address=address), message(2)])

    error = results[0].error
    assert isinstance(error, PermanentError)
    assert not isinstance(error, RetryableError)
    assert error.provider_failure is False
    assert str(error).startswith("email: bad address ")
    assert results[1].sent
    assert smtp_server.envelopes == [("notifier@example.com", ["user2@example.com"])]


def test_bad_addresses_alone_open_no_session(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    results = send(channel, [message(1, address="nope"), message(2, address="a@b,c@d.e")])

    assert all(isinstance(r.error, PermanentError) for r in results)
    assert smtp_server.connections == 0


def test_missing_address_names_the_recipient(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    results = send(channel, [message(1, address=None, recipient_id="alice"), message(2)])

    assert isinstance(results[0].error, PermanentError)
    assert "'alice'" in str(results[0].error)
    assert results[1].sent


# --- an unreachable server ------------------------------------------------------------


def test_server_down_fails_every_message_retryable_at_once(smtp_server: SmtpServer) -> None:
    channel = EmailChannel(smtp_server.url())
    smtp_server.stop()

    started = time.monotonic()
    results = send(channel, [message(n) for n in range(5)])

    assert time.monotonic() - started < 1.0
    assert all(isinstance(r.error, RetryableError) for r in results)
    assert "unreachable" in str(results[0].error)
    assert f"127.0.0.1:{smtp_server.port}" in str(results[0].error)


class _SilentServer:
    """Accepts TCP connections and never says a word; counts the connections."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for connection in self.accepted:
            connection.close()


def test_a_server_that_does_not_answer_is_tried_once_per_batch() -> None:
    silent = _SilentServer()
    try:
        channel = EmailChannel(f"smtp://127.0.0.1:{silent.port}?from=n%40example.com&timeout=0.3")
        started = time.monotonic()
        results = send(channel, [message(n) for n in range(4)])
        elapsed = time.monotonic() - started
    finally:
        silent.close()

    assert all(isinstance(r.error, RetryableError) for r in results)
    assert "timed out after 0.3s" in str(results[0].error)
    assert len(silent.accepted) == 1
    assert elapsed < 1.5


def test_a_slow_server_times_out_the_message_and_the_rest_of_the_batch(
    smtp_server: SmtpServer,
) -> None:
    channel = EmailChannel(smtp_server.url(timeout="0.3"))
    smtp_server.delay = 2.0

    started = time.monotonic()
    results = send(channel, [message(n) for n in range(3)])

    assert time.monotonic() - started < 1.5
    assert all(isinstance(r.error, RetryableError) for r in results)
    assert "timed out after 0.3s" in str(results[0].error)
    assert smtp_server.connections == 1  # no resend on a second session
    smtp_server.delay = 0.0
    last = message(4)
    assert send(channel, [last])[0].sent
    channel.close()
    assert smtp_server.message_ids() == [str(last.delivery_id)]


# --- configuration and secrets --------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "option"),
    [
        ("smtp://mail.example.com?from=a%40b.example&starttls=maybe", "starttls"),
        ("smtp://mail.example.com?from=a%40b.example&timeout=soon", "timeout"),
        ("smtp://mail.example.com?from=a%40b.example&timeout=0", "timeout"),
        ("smtp://mail.example.com?from=a%40b.example&verify=perhaps", "verify"),
        ("smtp://mail.example.com", "from"),
        ("smtp://mail.example.com?from=not-an-address", "from"),
        ("smtp://mail.example.com?from=a%40b.example%0d%0aBcc%3a+x%40y.example", "from"),
        ("smtp://mail.example.com:99999?from=a%40b.example", "port"),
        ("smtp://mail.example.com:smtp?from=a%40b.example", "port"),
        ("smtp://?from=a%40b.example", "host"),
    ],
)
def test_bad_url_names_the_option(url: str, option: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"^email: option {option}: "):
        EmailChannel(url)


def test_wrong_scheme_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="smtp:// or smtps://"):
        EmailChannel(f"http://user:{PASSWORD}@mail.example.com")


def test_defaults_and_ports() -> None:
    plain = EmailChannel("smtp://mail.example.com?from=a%40b.example")
    assert (plain.port, plain.starttls, plain.timeout, plain.verify) == (25, None, 10.0, True)
    implicit = EmailChannel("smtps://mail.example.com?from=a%40b.example&starttls=no")
    assert (implicit.port, implicit.implicit_tls, implicit.starttls) == (465, True, False)
    assert EmailChannel("smtp://m.example:587?from=a%40b.example").port == 587


def test_password_is_never_shown(smtp_server: SmtpServer) -> None:
    url = f"smtp://mailer:{PASSWORD}@127.0.0.1:{smtp_server.port}?from=n%40example.com"
    channel = EmailChannel(url)

    assert PASSWORD not in str(channel)
    assert PASSWORD not in repr(channel)
    assert PASSWORD not in channel.masked_url
    # The plain server offers no AUTH: a configuration error that must not quote the URL.
    results = send(channel, [message(1)])
    assert isinstance(results[0].error, ConfigurationError)
    smtp_server.stop()
    results += send(channel, [message(2)])
    assert isinstance(results[1].error, RetryableError)
    for result in results:
        assert PASSWORD not in str(result.error)
    with pytest.raises(ConfigurationError) as bad:
        EmailChannel(url.replace("?", ":99999?"))
    assert PASSWORD not in str(bad.value)


def test_starttls_yes_against_a_server_without_it(smtp_server: SmtpServer) -> None:
    channel = EmailChannel(smtp_server.url(starttls="yes"))

    results = send(channel, [message(1), message(2)])

    assert all(isinstance(r.error, ConfigurationError) for r in results)
    assert "does not offer STARTTLS" in str(results[0].error)
    assert smtp_server.messages == []


# --- TLS and AUTH ---------------------------------------------------------------------


@pytest.fixture
def tls_server() -> Iterator[SmtpServer]:
    with SmtpServer(tls=True, auth=("mailer", PASSWORD)) as server:
        yield server


@pytest.mark.parametrize("starttls", ["auto", "yes"])
def test_starttls_and_login(tls_server: SmtpServer, starttls: str) -> None:
    channel = EmailChannel(tls_server.url(starttls=starttls))
    try:
        assert all(r.sent for r in send(channel, [message(1), message(2)]))
        assert all(r.sent for r in send(channel, [message(3)]))
    finally:
        channel.close()

    assert len(tls_server.messages) == 3
    assert tls_server.connections == 1
    assert tls_server.logins == 1


def test_starttls_no_hides_auth_and_is_a_configuration_error(tls_server: SmtpServer) -> None:
    results = send(EmailChannel(tls_server.url(starttls="no")), [message(1)])

    assert isinstance(results[0].error, ConfigurationError)
    assert "offers no AUTH" in str(results[0].error)


def test_refused_login_is_a_configuration_error_without_the_password(
    tls_server: SmtpServer,
) -> None:
    url = tls_server.url().replace(PASSWORD, "wrong-" + PASSWORD)
    results = send(EmailChannel(url), [message(n) for n in range(3)])

    assert all(isinstance(r.error, ConfigurationError) for r in results)
    error = str(results[0].error)
    assert error.startswith("email: the SMTP server refused the login of user 'mailer'")
    assert "535" in error
    assert PASSWORD not in error
    assert tls_server.connections == 1
    assert tls_server.messages == []


def test_certificate_is_verified_by_default(tls_server: SmtpServer) -> None:
    results = send(EmailChannel(tls_server.url(verify=None)), [message(1), message(2)])

    assert all(isinstance(r.error, RetryableError) for r in results)
    assert "CERTIFICATE_VERIFY_FAILED" in str(results[0].error)
    assert tls_server.messages == []


def test_implicit_tls() -> None:
    with SmtpServer(implicit_tls=True, auth=("mailer", PASSWORD)) as server:
        channel = EmailChannel(server.url())
        try:
            assert server.url().startswith("smtps://")
            assert all(r.sent for r in send(channel, [message(1), message(2)]))
        finally:
            channel.close()
        assert len(server.messages) == 2
        assert server.logins == 1


# --- internationalised addresses --------------------------------------------------------


def test_an_internationalised_domain_goes_out_in_idna_and_a_bad_one_alone_is_refused(
    smtp_server: SmtpServer, channel: EmailChannel
) -> None:
    good = message(0, address="user@bücher.de", recipient_name="Jürgen")
    bad = message(1, address="user@bü_cher.de")
    results = send(channel, [bad, good])

    assert isinstance(results[0].error, AddressError)
    assert "not a valid internationalised domain name" in str(results[0].error)
    assert results[1].sent
    [(_, rcpt_tos)] = smtp_server.envelopes
    assert rcpt_tos == ["user@xn--bcher-kva.de"]
    [mail] = smtp_server.messages
    assert mail["To"].addresses[0].addr_spec == "user@xn--bcher-kva.de"
    assert mail["To"].addresses[0].display_name == "Jürgen"


def test_a_non_ascii_local_part_needs_smtputf8() -> None:
    with SmtpServer(smtputf8=True) as server:
        channel = EmailChannel(server.url())
        try:
            [result] = send(channel, [message(0, address="jürgen@example.com",
                                              recipient_name="Jürgen")])
        finally:
            channel.close()
        assert result.sent
        [mail] = server.messages
        raw = mail.as_bytes()
        assert "<jürgen@example.com>".encode() in raw  # raw UTF-8 in To, as SMTPUTF8 allows
        assert b"smtputf8.invalid" not in raw
        assert server.envelopes[0][1] == ["jürgen@example.com"]


def test_a_refused_sender_is_our_configuration(
    smtp_server: SmtpServer,
) -> None:
    channel = EmailChannel(smtp_server.url(**{"from": "blocked@example.com"}))
    smtp_server.refuse_sender("blocked@example.com", code=553)
    try:
        results = send(channel, [message(0), message(1)])
    finally:
        channel.close()
    assert all(isinstance(r.error, ConfigurationError) for r in results)
    assert "refused the sender 'blocked@example.com' (553" in str(results[0].error)


def test_the_default_sender_is_valid() -> None:
    from notifier.settings import DEFAULT_CHANNEL_URLS

    assert EmailChannel(DEFAULT_CHANNEL_URLS["email"]).sender.addr_spec == "notifier@localhost"
