"""The egress guard against real local servers: forbidden addresses are never connected
to (DNS rebinding, literal forms, redirects, every Apprise scheme), connections go to
the checked address under the URL's name, and a request has one deadline and reads a
bounded answer.

There is no DNS or public network here: ``use_network`` gives the guard a resolver
that answers what each test says, and a dialler that records every address the guard
decides to connect to, connecting for real to loopback (the local servers) and
refusing anything else ("no route"). What the guard decides is the guard's own code.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpcore
import pytest

from notifier.channels.apprise import AppriseChannel, unguarded_schemes
from notifier.channels.base import (
    AddressError,
    ConfigurationError,
    OutgoingMessage,
    PermanentError,
    RetryableError,
)
from notifier.channels.egress import (
    IPAddress,
    forbidden_kind,
    guarded_egress,
    system_connect,
    use_network,
)
from notifier.channels.http import close_client, get_client
from notifier.channels.slack import SlackChannel
from notifier.channels.webhook import WebhookChannel
from notifier.settings import get_settings
from tests.http_server import HttpServer, http_server_fixture  # noqa: F401
from tests.smtp_server import SmtpServer

PUBLIC = "93.184.216.34"


def message(address: str | None) -> OutgoingMessage:
    return OutgoingMessage(
        delivery_id=uuid.uuid4(), recipient_id="user-1", address=address,
        type="order.shipped", priority="high", title="Shipped", body="It arrives Tuesday.",
    )


def webhook(options: str = "allow_private=no") -> WebhookChannel:
    return WebhookChannel(f"webhook://?{options}")


def apprise_channel(options: str = "allow_private=no") -> AppriseChannel:
    return AppriseChannel(f"apprise://?{options}")


class Resolver:
    """Answers from a script: one answer per lookup, the last one repeating."""

    def __init__(self, *answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        index = min(len(self.lookups), len(self.answers)) - 1
        return list(self.answers[index])


class Dialler:
    """Records every address the guard connects to; only loopback has a route here."""

    def __init__(self) -> None:
        self.dialled: list[str] = []

    def __call__(self, address: IPAddress, port: int, timeout: float | None) -> Any:
        self.dialled.append(str(address))
        if address.is_loopback:
            return system_connect(address, port, timeout)
        raise httpcore.ConnectError(f"no route to {address} (test network)")


@pytest.fixture(autouse=True)
def receiver() -> None:
    """The webhook receiver exists: webhooks are signed with its own secret."""
    from notifier.storage.db import session_scope

    with session_scope() as session:
        session.connection().exec_driver_sql("INSERT INTO recipients (id) VALUES ('user-1')")


@pytest.fixture
def fresh_pools() -> Iterator[None]:
    """No pooled connection from another test; none left for the next."""
    close_client()
    yield
    close_client()


@pytest.fixture
def dialler(fresh_pools: None) -> Iterator[Dialler]:
    recorder = Dialler()
    with use_network(connect=recorder):
        yield recorder


# --- Which addresses --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "a loopback"),
        ("10.1.2.3", "a private"),
        ("172.16.0.1", "a private"),
        ("192.168.0.1", "a private"),
        ("169.254.169.254", "a link-local"),
        ("100.64.0.1", "a shared (CGNAT)"),
        ("0.0.0.0", "an unspecified"),
        ("224.0.0.251", "a multicast"),
        ("240.0.0.1", "a reserved"),
        ("255.255.255.255", "a reserved"),
        ("::1", "a loopback"),
        ("::", "an unspecified"),
        ("fe80::1", "a link-local"),
        ("fc00::1", "a private"),
        ("ff02::1", "a multicast"),
        ("::ffff:127.0.0.1", "an IPv4-mapped loopback"),
        ("::ffff:10.0.0.1", "an IPv4-mapped private"),
        ("::ffff:8.8.8.8", "an IPv4-mapped"),
        ("2002:7f00:1::1", "a 6to4-wrapped loopback"),
        ("2002:a9fe:a9fe::1", "a 6to4-wrapped link-local"),
        ("64:ff9b::7f00:1", "a NAT64-wrapped loopback"),
        ("64:ff9b::a9fe:a9fe", "a NAT64-wrapped link-local"),
        ("64:ff9b:1::1", "a local-use NAT64"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "a Teredo"),
        ("::127.0.0.1", "a reserved"),
        ("192.0.2.1", "a private"),
    ],
)
def test_forbidden_kinds(address: str, kind: str) -> None:
    assert forbidden_kind(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize(
    "address", ["8.8.8.8", PUBLIC, "2001:4860:4860::8888", "2002:808:808::1", "64:ff9b::808:808"]
)
def test_public_addresses_pass(address: str) -> None:
    assert forbidden_kind(ipaddress.ip_address(address)) is None


# --- Webhook, Slack, SMS: resolve once, check, connect to what was checked -----------


def test_rebinding_name_never_reaches_the_local_server(
    http_server: HttpServer, dialler: Dialler
) -> None:
    """The name answers a public address first and 127.0.0.1 on every later lookup:
    each connection is made to the address its own single lookup checked."""
    resolver = Resolver([PUBLIC], ["127.0.0.1"])
    target = f"http://rebind.example.test:{http_server.port}/hook"
    with use_network(resolve=resolver):
        [first] = webhook().send_batch([message(target)])
        [second] = webhook().send_batch([message(target)])

    assert isinstance(first.error, RetryableError)  # the public address has no route here
    assert isinstance(second.error, PermanentError)
    assert str(second.error) == (
        "webhook target rebind.example.test (127.0.0.1) is a loopback address;"
        " set NOTIFIER_ALLOW_PRIVATE_TARGETS=1 to allow it"
    )
    assert resolver.lookups == ["rebind.example.test"] * 2  # one lookup per connection
    assert dialler.dialled == [PUBLIC]
    assert http_server.connections == 0


def test_name_with_any_forbidden_address_is_refused(
    http_server: HttpServer, dialler: Dialler
) -> None:
    resolver = Resolver([PUBLIC, "127.0.0.1"])
    target = f"http://mixed.example.test:{http_server.port}/hook"
    with use_network(resolve=resolver):
        results = list(webhook().send_batch([message(target), message(target)]))

    assert all(isinstance(r.error, PermanentError) for r in results)
    assert "mixed.example.test (127.0.0.1) is a loopback address" in str(results[0].error)
    assert not any(r.error.provider_failure for r in results if r.error)
    assert resolver.lookups == ["mixed.example.test"]  # the batch remembers the refusal
    assert dialler.dialled == []
    assert http_server.connections == 0


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "[::ffff:127.0.0.1]", "[::1]", "169.254.169.254", "100.64.0.1", "0.0.0.0",
     "[2002:7f00:1::1]", "[64:ff9b::7f00:1]", "[::ffff:7f00:1]"],
)
def test_forbidden_literals_are_refused_without_connecting(
    http_server: HttpServer, dialler: Dialler, host: str
) -> None:
    target = f"http://{host}:{http_server.port}/hook"

    [result] = webhook().send_batch([message(target)])

    assert isinstance(result.error, PermanentError)
    assert "address; set NOTIFIER_ALLOW_PRIVATE_TARGETS=1" in str(result.error)
    assert dialler.dialled == []
    assert http_server.connections == 0


def test_slack_and_sms_go_through_the_same_guard(
    http_server: HttpServer, dialler: Dialler
) -> None:
    from notifier.channels.sms import SmsChannel

    with use_network(resolve=Resolver(["127.0.0.1"])):
        [slack] = SlackChannel("slack://?allow_private=no").send_batch(
            [message(f"http://hooks.example.test:{http_server.port}/services/T/B/X")]
        )
        sms = SmsChannel(
            f"twilio://AC1:tok@api.example.test:{http_server.port}?from=%2B15550001111"
            "&https=no&allow_private=no"
        )
        [text] = sms.send_batch([message("+15551234567")])

    assert "slack target hooks.example.test (127.0.0.1) is a loopback" in str(slack.error)
    assert "sms target api.example.test (127.0.0.1) is a loopback" in str(text.error)
    assert dialler.dialled == []
    assert http_server.connections == 0


def test_connection_goes_to_the_checked_address_under_the_name(
    http_server: HttpServer, dialler: Dialler
) -> None:
    """Private addresses allowed: a made-up name resolved by the guard is reached at
    the address it checked, with the name in ``Host``; the pool keeps the connection
    and makes no further lookup for it."""
    resolver = Resolver(["127.0.0.1"])
    target = f"http://hooks.example.test:{http_server.port}/hook"
    with use_network(resolve=resolver):
        results = list(webhook("allow_private=yes").send_batch([message(target)] * 5))

    assert all(r.sent for r in results)
    requests = http_server.wait_for(5)
    assert {r.headers["Host"] for r in requests} == {f"hooks.example.test:{http_server.port}"}
    assert dialler.dialled == ["127.0.0.1"]
    assert resolver.lookups == ["hooks.example.test"]
    assert http_server.connections == 1


def test_pools_are_separate_per_policy(fresh_pools: None) -> None:
    assert get_client(True) is not get_client(False)
    assert get_client(True) is get_client(True)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for ``hooks.example.test`` only (not for 127.0.0.1)."""
    directory = tmp_path_factory.mktemp("egress-cert")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-nodes", "-days", "1", "-newkey", "ec",
         "-pkeyopt", "ec_paramgen_curve:prime256v1", "-keyout", str(key), "-out", str(cert),
         "-subj", "/CN=hooks.example.test", "-addext", "subjectAltName=DNS:hooks.example.test"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def test_tls_checks_the_name_not_the_pinned_address(
    certificate: tuple[Path, Path], dialler: Dialler, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the pool made next trusts it
    server_names: list[str | None] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)  # type: ignore[assignment,misc,return-value]
    server = HttpServer()
    server._server.socket = context.wrap_socket(server._server.socket, server_side=True)
    resolver = Resolver(["127.0.0.1"])
    with server, use_network(resolve=resolver):
        [good] = webhook("allow_private=yes").send_batch(
            [message(f"https://hooks.example.test:{server.port}/hook")]
        )
        [wrong] = webhook("allow_private=yes").send_batch(
            [message(f"https://other.example.test:{server.port}/hook")]
        )

    assert good.sent
    assert server_names[0] == "hooks.example.test"
    assert server.requests[0].headers["Host"] == f"hooks.example.test:{server.port}"
    assert isinstance(wrong.error, RetryableError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(wrong.error)  # cert is not other.example.test's
    assert len(server.requests) == 1
    assert dialler.dialled == ["127.0.0.1", "127.0.0.1"]


def test_redirect_to_a_local_server_is_not_followed(
    http_server: HttpServer, fresh_pools: None
) -> None:
    with HttpServer() as internal:
        http_server.respond_always(302, headers={"Location": internal.url("/latest/meta-data")})

        [result] = webhook("allow_private=yes").send_batch([message(http_server.url())])

        assert isinstance(result.error, PermanentError)
        assert str(result.error).startswith("HTTP 302 from")
        assert internal.connections == 0


@pytest.mark.parametrize(
    "target",
    ["http://example.com:99999/", "http://[::1", "http://[::1/x", "ftp://example.com/",
     "http://exa mple.com/", "http://:80/", "http://example.com:0/", "http://\x00/",
     "http://" + "a" * 300 + ".com/", "javascript:alert(1)"],
)
def test_malformed_target_fails_its_message_alone(
    http_server: HttpServer, fresh_pools: None, target: str
) -> None:
    bad, good = webhook("allow_private=yes").send_batch(
        [message(target), message(http_server.url())]
    )

    assert isinstance(bad.error, PermanentError)
    assert not bad.error.provider_failure
    assert good.sent


# --- The deadline and the response cap --------------------------------------------------


class DribblingServer:
    """Accepts connections and sends an answer one byte every ``interval`` seconds."""

    def __init__(self, answer: bytes, interval: float = 0.2) -> None:
        self.answer = answer
        self.interval = interval
        self.sent = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hook"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> DribblingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                continue
            with connection:
                connection.recv(65536)
                for byte in self.answer:
                    if self._stop.wait(self.interval):
                        return
                    try:
                        connection.sendall(bytes([byte]))
                    except OSError:
                        break
                    self.sent += 1


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
     b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n" + b"x" * 60],
    ids=["dribbled-headers", "dribbled-body"],
)
def test_a_dribbling_server_cannot_hold_a_request_past_its_timeout(
    fresh_pools: None, answer: bytes
) -> None:
    with DribblingServer(answer) as server:
        started = time.monotonic()
        [result] = webhook("allow_private=yes&timeout=1").send_batch([message(server.url)])
        elapsed = time.monotonic() - started

    assert isinstance(result.error, RetryableError)
    assert str(result.error) == f"no answer from {server.url} within 1s"
    assert elapsed < 4  # per-read timeouts let this run for len(answer) * 0.2 s
    assert server.sent < len(answer)


def slow_resolver(host: str, port: int) -> list[str]:
    time.sleep(3)
    return ["127.0.0.1"]


def test_the_deadline_covers_the_lookup(http_server: HttpServer, dialler: Dialler) -> None:
    with use_network(resolve=slow_resolver):
        started = time.monotonic()
        [hook] = webhook("allow_private=yes&timeout=0.5").send_batch(
            [message(f"http://slow-dns.example.test:{http_server.port}/hook")]
        )
        [notify] = apprise_channel("allow_private=yes&timeout=0.5").send_batch(
            [message(f"json://slow-dns.example.test:{http_server.port}/notify")]
        )
        elapsed = time.monotonic() - started

    assert isinstance(hook.error, RetryableError)
    assert "within 0.5s" in str(hook.error)
    assert isinstance(notify.error, RetryableError)
    assert "within 0.5s" in str(notify.error)
    assert elapsed < 2.5  # two lookups of 3 s each, cut at 0.5 s
    assert http_server.connections == 0


class BigAnswerServer:
    """Answers every request with ``status`` and a body of ``size`` bytes, counting the
    bytes the client took before it hung up."""

    def __init__(self, status: int, size: int) -> None:
        self.status = status
        self.size = size
        self.sent = 0
        self.done = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hook"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> BigAnswerServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._listener.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        connection, _ = self._listener.accept()
        with connection:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            connection.recv(65536)
            connection.sendall(
                f"HTTP/1.1 {self.status} X\r\nContent-Length: {self.size}\r\n\r\n".encode()
            )
            chunk = b"no_service" + b"x" * (65536 - 10)
            try:
                while self.sent < self.size:
                    connection.sendall(chunk)
                    self.sent += len(chunk)
            except OSError:
                pass
        self.done.set()


def test_a_huge_answer_is_read_only_up_to_the_cap(fresh_pools: None) -> None:
    size = 200 * 1024 * 1024
    cap = get_settings().http_max_response_bytes
    with BigAnswerServer(200, size) as server:
        # Slack: the same HTTP path as webhooks, without a receiver's signing secret.
        channel = SlackChannel("slack://?allow_private=yes&timeout=5")
        response = channel.post(server.url, message(server.url))
        assert server.done.wait(5)

    assert len(response.content) == cap
    assert response.content.startswith(b"no_service")
    assert server.sent < size // 10  # what the client never read stayed unsent


def test_slack_reads_its_error_from_the_capped_prefix(fresh_pools: None) -> None:
    with BigAnswerServer(404, 50 * 1024 * 1024) as server:
        [result] = SlackChannel("slack://?allow_private=yes&timeout=5").send_batch(
            [message(server.url)]
        )

    assert isinstance(result.error, PermanentError)
    assert str(result.error) == f"HTTP 404 from {server.url}"  # the prefix is no short code


# --- Apprise ----------------------------------------------------------------------------


def test_apprise_self_hosted_schemes_are_guarded(http_server: HttpServer) -> None:
    port = http_server.port
    addresses = [
        f"gotify://127.0.0.1:{port}/AbCdEfGhIjKlMnO",
        f"ntfy://127.0.0.1:{port}/alerts",
        "ntfys://169.254.169.254/alerts",
        f"json://[::ffff:127.0.0.1]:{port}/notify",
        f"xml://0.0.0.0:{port}/notify",
    ]

    results = list(apprise_channel().send_batch([message(a) for a in addresses]))

    assert all(isinstance(r.error, PermanentError) for r in results), results
    assert "apprise target 127.0.0.1 is a loopback address" in str(results[0].error)
    assert "169.254.169.254 is a link-local address" in str(results[2].error)
    assert all(not r.error.provider_failure for r in results if r.error)
    assert http_server.connections == 0


def test_apprise_guard_allows_what_the_operator_allows(http_server: HttpServer) -> None:
    """The control: the same gotify address reaches the local server when allowed."""
    address = f"gotify://127.0.0.1:{http_server.port}/AbCdEfGhIjKlMnO"

    [result] = apprise_channel("allow_private=yes").send_batch([message(address)])

    assert result.sent
    assert http_server.wait_for(1)[0].path.startswith("/message")


def test_apprise_names_are_resolved_once_and_checked(http_server: HttpServer) -> None:
    port = http_server.port
    for answers in (["127.0.0.1"], [PUBLIC, "127.0.0.1"]):
        with use_network(resolve=Resolver(answers)):
            [result] = apprise_channel().send_batch(
                [message(f"ntfy://ntfy.example.test:{port}/alerts")]
            )
        assert isinstance(result.error, PermanentError)
        assert "ntfy.example.test (127.0.0.1) is a loopback address" in str(result.error)
    assert http_server.connections == 0


def test_apprise_mailto_smtp_host_is_guarded() -> None:
    with SmtpServer() as smtp:
        address = (
            f"mailto://example.com?smtp=127.0.0.1&port={smtp.port}"
            "&from=notifier@example.com&to=ops@example.com&mode=insecure"
        )
        [refused] = apprise_channel().send_batch([message(address)])
        assert isinstance(refused.error, PermanentError)
        assert "apprise target 127.0.0.1 is a loopback address" in str(refused.error)
        assert smtp.connections == 0
        assert smtp.messages == []

        [allowed] = apprise_channel("allow_private=yes").send_batch([message(address)])
        assert allowed.sent  # the control: the same address reaches the server when allowed
        assert len(smtp.messages) == 1


def test_apprise_follows_no_redirect(http_server: HttpServer) -> None:
    with HttpServer() as internal:
        http_server.respond_always(302, headers={"Location": internal.url("/latest/meta-data")})

        [result] = apprise_channel("allow_private=yes").send_batch(
            [message(f"json://127.0.0.1:{http_server.port}/notify")]
        )

        assert isinstance(result.error, PermanentError)
        assert "answered with a redirect, which is not followed" in str(result.error)
        assert len(http_server.requests) == 1
        assert internal.connections == 0


def test_apprise_unguardable_schemes_refused_unless_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert {"dbus", "kde", "glib", "gnome", "macosx", "windows", "syslog", "rsyslog",
            "mqtt", "xmpp", "irc", "growl"} <= unguarded_schemes()
    assert not {"json", "gotify", "ntfy", "mailto", "slack", "tgram"} & unguarded_schemes()

    [refused] = apprise_channel().send_batch([message("syslog://")])
    assert isinstance(refused.error, PermanentError)
    assert str(refused.error) == (
        "apprise: the syslog:// plugin connects where the egress guard cannot check it;"
        " add syslog to NOTIFIER_APPRISE_ALLOWED_SCHEMES to allow it"
    )

    monkeypatch.setenv("NOTIFIER_APPRISE_ALLOWED_SCHEMES", "dbus, Syslog")
    get_settings.cache_clear()
    try:
        [listed] = apprise_channel().send_batch([message("syslog://")])
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert listed.error is None or "NOTIFIER_APPRISE_ALLOWED_SCHEMES" not in str(listed.error)


def test_apprise_allowed_schemes_must_be_apprise_schemes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFIER_APPRISE_ALLOWED_SCHEMES", "dbus,dbsu")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError) as info:
            apprise_channel()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert str(info.value) == "NOTIFIER_APPRISE_ALLOWED_SCHEMES: not an Apprise scheme: dbsu"


def test_apprise_address_must_be_one_url(http_server: HttpServer) -> None:
    two = f"json://127.0.0.1:{http_server.port}/a, json://127.0.0.1:{http_server.port}/b"

    [result] = apprise_channel("allow_private=yes").send_batch([message(two)])

    assert isinstance(result.error, AddressError)
    assert http_server.connections == 0


def test_guard_covers_only_its_own_thread(http_server: HttpServer) -> None:
    """Inside the guard this thread cannot resolve to loopback nor connect to a name
    (the C library would resolve it unchecked); another thread is untouched."""
    seen: list[object] = []

    def other_thread() -> None:
        seen.append(socket.getaddrinfo("127.0.0.1", 80)[0][4][0])

    with guarded_egress(allow_private=False) as guard:
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo("127.0.0.1", 80)
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    with (
        guarded_egress(allow_private=True),
        socket.socket() as sock,
        pytest.raises(OSError, match="connect to a name"),
    ):
        sock.connect(("localhost", http_server.port))
    assert guard.refused is not None
    assert seen == ["127.0.0.1"]
    assert socket.getaddrinfo("127.0.0.1", 80)[0][4][0] == "127.0.0.1"
    assert http_server.connections == 0


def test_apprise_send_has_one_deadline() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n" + b"x" * 40
    with DribblingServer(answer) as server:
        address = server.url.replace("http://", "json://")
        started = time.monotonic()
        first, second = apprise_channel("allow_private=yes&timeout=1").send_batch(
            [message(address), message(address)]
        )
        elapsed = time.monotonic() - started

    assert isinstance(first.error, RetryableError)
    assert str(first.error).startswith("apprise: no answer from json://127.0.0.1:")
    assert str(first.error).endswith("within 1s")
    assert isinstance(second.error, RetryableError)
    assert str(second.error).startswith("not tried: apprise: no answer")
    assert elapsed < 4  # Apprise's own timeouts are per read: 8 s here
    assert server.sent < len(answer)


def test_apprise_reads_a_huge_answer_only_up_to_the_cap() -> None:
    size = 200 * 1024 * 1024
    with BigAnswerServer(200, size) as server:
        address = server.url.replace("http://", "json://")
        [result] = apprise_channel("allow_private=yes&timeout=5").send_batch([message(address)])
        assert server.done.wait(5)

    assert result.sent
    assert server.sent < size // 10


def test_hooks_are_inert_outside_a_guarded_block(http_server: HttpServer) -> None:
    """Other code in the process (requests elsewhere, kombu, psycopg) is untouched:
    redirects are followed and loopback connects as before."""
    import requests

    with guarded_egress(allow_private=True):
        pass  # the hooks are installed now
    with HttpServer() as other:
        http_server.respond(302, headers={"Location": other.url("/moved")})

        answer = requests.get(http_server.url("/start"), timeout=5)

        assert answer.status_code == 200
        assert [r.path for r in other.wait_for(1)] == ["/moved"]
