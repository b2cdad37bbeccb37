"""A real SMTP server for tests: aiosmtpd on 127.0.0.1 with a handler tests can steer.

The e-mail channel and the delivery pipeline are tested against it instead of mocks,
so that what they do on the wire (one session per batch, RSET after a refusal, the
headers that actually arrive) is what the tests see. The server runs in aiosmtpd's
own thread; every piece of state tests read or set is guarded by one lock.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

DELIVERY_ID_HEADER = "X-Notifier-Delivery-Id"


@dataclass
class _Failure:
    """A scripted answer to DATA: ``remaining`` None means until ``reset``."""

    code: int
    text: str
    remaining: int | None


@dataclass
class _State:
    lock: threading.Condition = field(default_factory=threading.Condition)
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    sessions: list[SMTP] = field(default_factory=list)
    data_failure: _Failure | None = None
    refused: dict[str, int] = field(default_factory=dict)
    refused_senders: dict[str, int] = field(default_factory=dict)
    delay: float = 0.0
    logins: int = 0
    #: While set (``hold``), each DATA waits for it before it is answered.
    gate: asyncio.Event | None = None
    holding: bool = False
    #: Delivery ids of the messages whose DATA waits at the gate now.
    held: list[str] = field(default_factory=list)


class _Handler:
    """aiosmtpd hooks; every decision reads the shared ``_State``."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def _count_session(self, server: SMTP) -> None:
        # EHLO comes again after STARTTLS on the same connection: count protocol objects.
        with self.state.lock:
            if not any(known is server for known in self.state.sessions):
                self.state.sessions.append(server)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        self._count_session(server)
        session.host_name = hostname
        return responses

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        self._count_session(server)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        with self.state.lock:
            code = self.state.refused_senders.get(address.lower())
        if code is not None:
            return f"{code} sender {address} not allowed"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        with self.state.lock:
            code = self.state.refused.get(address.lower())
        if code is not None:
            return f"{code} recipient {address} refused"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.state.lock:
            delay = self.state.delay
            gate = None
            if self.state.holding:
                gate = self.state.gate = self.state.gate or asyncio.Event()
        if gate is not None:
            await self._wait_at(gate, envelope)
        if delay:
            await asyncio.sleep(delay)
        with self.state.lock:
            failure = self.state.data_failure
            if failure is not None:
                if failure.remaining is not None:
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self.state.data_failure = None
                return f"{failure.code} {failure.text}"
            content = envelope.original_content or envelope.content
            assert isinstance(content, bytes)
            # Line ends as a mail reader shows them, so bodies compare to what was sent.
            content = content.replace(b"\r\n", b"\n")
            parsed = email.message_from_bytes(content, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            self.state.messages.append(parsed)
            self.state.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self.state.lock.notify_all()
        return "250 Message accepted for delivery"

    async def _wait_at(self, gate: asyncio.Event, envelope: Envelope) -> None:
        """Hold the answer to DATA until ``release``; a client that goes away meanwhile
        (aiosmtpd then cancels this) leaves no message behind, as a real server keeps
        none it has not acknowledged."""
        content = envelope.original_content or envelope.content
        assert isinstance(content, bytes)
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        delivery_id = str(parsed[DELIVERY_ID_HEADER])
        with self.state.lock:
            self.state.held.append(delivery_id)
            self.state.lock.notify_all()
        try:
            await gate.wait()
        finally:
            with self.state.lock:
                self.state.held.remove(delivery_id)
                self.state.lock.notify_all()


class SmtpServer:
    """An SMTP server on 127.0.0.1 for one test, optionally with STARTTLS/SMTPS and AUTH.

    ``tls=True`` offers STARTTLS with a self-signed certificate (made by ``openssl``);
    ``implicit_tls=True`` speaks TLS from the first byte (``smtps://``); ``auth=(user,
    password)`` requires that login (over TLS only, as real servers do); ``smtputf8=True``
    offers SMTPUTF8 (internationalised local parts).
    """

    def __init__(
        self,
        *,
        tls: bool = False,
        implicit_tls: bool = False,
        auth: tuple[str, str] | None = None,
        port: int | None = None,
        smtputf8: bool = False,
    ) -> None:
        self.tls = tls
        self.smtputf8 = smtputf8
        self.implicit_tls = implicit_tls
        self.auth = auth
        self.port = port or _free_port()
        self._state = _State()
        self._controller: Controller | None = None

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> SmtpServer:
        """Listen on ``self.port`` (the same port again after ``stop``)."""
        assert self._controller is None, "already started"
        self._controller = Controller(
            _Handler(self._state), hostname="127.0.0.1", port=self.port, **self._smtp_kwargs()
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open session; accepted messages are kept."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def url(self, **options: Any) -> str:
        """The channel URL for this server; ``options`` add to or replace the query
        (``None`` drops one). Credentials are included when the server requires them."""
        scheme = "smtps" if self.implicit_tls else "smtp"
        query: dict[str, Any] = {"from": "notifier@example.com"}
        if self.tls or self.implicit_tls:
            query["verify"] = "no"
        query.update(options)
        query = {key: value for key, value in query.items() if value is not None}
        userinfo = ""
        if self.auth:
            userinfo = f"{quote(self.auth[0], safe='')}:{quote(self.auth[1], safe='')}@"
        return f"{scheme}://{userinfo}127.0.0.1:{self.port}?{urlencode(query)}"

    # --- what arrived -----------------------------------------------------------------

    @property
    def messages(self) -> list[EmailMessage]:
        """Accepted messages in order (a copy: safe to read while the server runs)."""
        with self._state.lock:
            return list(self._state.messages)

    @property
    def envelopes(self) -> list[tuple[str, list[str]]]:
        """``(MAIL FROM, [RCPT TO, ...])`` of each accepted message, in order."""
        with self._state.lock:
            return [(sender, list(rcpts)) for sender, rcpts in self._state.envelopes]

    def message_ids(self) -> list[str]:
        """Delivery ids (the ``X-Notifier-Delivery-Id`` header) of accepted messages."""
        return [str(message[DELIVERY_ID_HEADER]) for message in self.messages]

    @property
    def connections(self) -> int:
        """SMTP sessions opened so far (a session counts at its first EHLO/HELO)."""
        with self._state.lock:
            return len(self._state.sessions)

    @property
    def logins(self) -> int:
        """Successful AUTH commands so far."""
        with self._state.lock:
            return self._state.logins

    def wait_for(self, count: int, timeout: float) -> None:
        """Block until at least ``count`` messages were accepted, else AssertionError."""
        with self._state.lock:
            arrived = self._state.lock.wait_for(
                lambda: len(self._state.messages) >= count, timeout
            )
            if not arrived:
                raise AssertionError(
                    f"SMTP server: expected {count} messages within {timeout}s,"
                    f" got {len(self._state.messages)}"
                )

    # --- steering ---------------------------------------------------------------------

    @property
    def delay(self) -> float:
        """Seconds each DATA waits before the message is recorded and accepted."""
        with self._state.lock:
            return self._state.delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        with self._state.lock:
            self._state.delay = seconds

    def hold(self) -> None:
        """Hold every DATA answer from now until ``release``: the client waits with its
        message sent and not acknowledged (see ``wait_for_held``)."""
        with self._state.lock:
            self._state.holding = True

    def release(self) -> None:
        """Answer the held DATA commands (and stop holding new ones)."""
        controller = self._controller
        assert controller is not None, "not started"
        with self._state.lock:
            self._state.holding = False
            gate, self._state.gate = self._state.gate, None
        if gate is not None:
            controller.loop.call_soon_threadsafe(gate.set)

    def wait_for_held(self, count: int, timeout: float) -> list[str]:
        """Block until ``count`` DATA commands wait at the gate; their delivery ids."""
        with self._state.lock:
            if not self._state.lock.wait_for(lambda: len(self._state.held) >= count, timeout):
                raise AssertionError(f"SMTP server: {count} held messages expected within"
                                     f" {timeout}s, {len(self._state.held)} held")
            return list(self._state.held)

    def wait_until_not_held(self, delivery_ids: list[str], timeout: float) -> None:
        """Block until none of these messages waits at the gate (answered, or its
        client went away: then the server keeps nothing of it)."""
        with self._state.lock:
            if not self._state.lock.wait_for(
                lambda: not set(delivery_ids) & set(self._state.held), timeout
            ):
                raise AssertionError(f"SMTP server: {delivery_ids} still held")

    def fail_next(self, count: int, code: int = 451, text: str = "try again later") -> None:
        """Answer the next ``count`` DATA commands with ``code`` (nothing is recorded)."""
        with self._state.lock:
            self._state.data_failure = _Failure(code, text, count)

    def fail_always(self, code: int = 550, text: str = "mailbox unavailable") -> None:
        """Answer every DATA command with ``code`` until ``reset``."""
        with self._state.lock:
            self._state.data_failure = _Failure(code, text, None)

    def refuse_recipient(self, address: str, code: int = 550) -> None:
        """Answer ``RCPT TO`` for ``address`` with ``code`` until ``reset``."""
        with self._state.lock:
            self._state.refused[address.lower()] = code

    def refuse_sender(self, address: str, code: int = 553) -> None:
        """Answer ``MAIL FROM`` for ``address`` with ``code`` until ``reset``."""
        with self._state.lock:
            self._state.refused_senders[address.lower()] = code

    def drop_connections(self) -> None:
        """Close every open session from the server side, as an idle timeout would."""
        controller = self._controller
        assert controller is not None, "not started"
        with self._state.lock:
            sessions = list(self._state.sessions)
        done = threading.Event()

        def close_all() -> None:
            for server in sessions:
                if server.transport is not None:
                    server.transport.close()
            done.set()

        controller.loop.call_soon_threadsafe(close_all)
        assert done.wait(5), "SMTP server: could not close the sessions"
        time.sleep(0.05)  # let the closes reach the clients' sockets

    def reset(self) -> None:
        """Forget messages, counters and scripted failures; keep running."""
        with self._state.lock:
            self._state.messages.clear()
            self._state.envelopes.clear()
            self._state.sessions.clear()
            self._state.data_failure = None
            self._state.refused.clear()
            self._state.refused_senders.clear()
            self._state.delay = 0.0
            self._state.logins = 0

    # --- set-up -----------------------------------------------------------------------

    def _smtp_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"enable_SMTPUTF8": self.smtputf8}
        if self.tls or self.implicit_tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._load_certificate(context)
            kwargs["ssl_context" if self.implicit_tls else "tls_context"] = context
        if self.auth:
            kwargs["authenticator"] = self._authenticate
            # aiosmtpd only knows about STARTTLS: with implicit TLS it would hide AUTH.
            kwargs["auth_require_tls"] = not self.implicit_tls
        return kwargs

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        assert self.auth is not None
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = self.auth
        if auth_data.login == user.encode() and auth_data.password == password.encode():
            with self._state.lock:
                self._state.logins += 1
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    @staticmethod
    def _load_certificate(context: ssl.SSLContext) -> None:
        """Load a fresh self-signed certificate for 127.0.0.1 and localhost; the files
        live only as long as it takes to load them."""
        with tempfile.TemporaryDirectory(prefix="smtp-test-cert-") as directory:
            cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
            subprocess.run(
                [
                    "openssl", "req", "-x509", "-nodes", "-days", "1",
                    "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                ],
                check=True, capture_output=True, timeout=30,
            )
            context.load_cert_chain(cert, key)


def _free_port() -> int:
    """A port nothing listens on now (the kernel's pick, released at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
