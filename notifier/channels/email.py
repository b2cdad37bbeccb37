"""The e-mail channel: SMTP through :mod:`smtplib`, one kept session per worker process.

Configured by ``smtp://[user:password@]host[:port]?from=...&from_name=...&starttls=auto
&timeout=10&verify=yes`` (``smtps://`` for TLS from the first byte). A batch goes over
one SMTP session that stays open for the next batch, so a busy worker does not pay a
TCP, TLS and AUTH handshake per message.

Addresses: an internationalised domain (``user@bücher.de``) is sent in its IDNA form
(``user@xn--bcher-kva.de``); a non-ASCII local part goes out with SMTPUTF8 where the
server offers it and is refused (``AddressError``, that delivery alone) where it does
not. A refused login or sender is our configuration (``ConfigurationError``): the
deliveries wait for the fix instead of being dead-lettered.
"""

from __future__ import annotations

import contextlib
import email.errors
import html
import random
import re
import smtplib
import ssl
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.charset import QP, Charset
from email.header import Header
from email.headerregistry import Address
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import formataddr, formatdate, parseaddr
from urllib.parse import unquote

import idna

from notifier.channels.base import (
    AddressError,
    Channel,
    ConfigurationError,
    DeliveryError,
    OutgoingMessage,
    PermanentError,
    RetryableError,
    SendResult,
)
from notifier.schemas import idna_domain

#: On the wire every line ends in CRLF: ``sendmail`` sends bytes as they are, and a
#: server takes bare LF text as one overlong line ("500 Line too long").
_WIRE = compat32.clone(linesep="\r\n")
#: Bodies as UTF-8 in quoted-printable: readable where ASCII, never an overlong line.
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP
#: A kept session idle longer than this is checked with NOOP before it is trusted.
IDLE_CHECK_SECONDS = 30.0
#: Whitespace and control characters: in a header they could start a new header line.
_UNSAFE_HEADER_CHARS = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u2028\u2029]+")
#: Characters that never belong in one bare address (a list, a header, a display name).
_NOT_IN_ADDRESS = re.compile(r"[\s\x00-\x1f\x7f-\x9f,;<>()\"\\]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


class _SessionLost(Exception):
    """The SMTP session died under a message; a new session may still work."""

    def __init__(self, error: RetryableError) -> None:
        super().__init__(str(error))
        self.error = error


class _BatchFailed(Exception):
    """No session can be had; ``error`` is the result of this and every later message."""

    def __init__(self, error: DeliveryError) -> None:
        super().__init__(str(error))
        self.error = error


class EmailChannel(Channel):
    """Sends each message as multipart/alternative (text and HTML) over SMTP."""

    name = "email"
    schemes = ("smtp", "smtps")
    address_field = "email"
    has_providers = True

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.implicit_tls = self.parts.scheme == "smtps"
        self.host, self.port = self._address_of_server()
        self.username = unquote(self.parts.username) if self.parts.username else None
        self._password = unquote(self.parts.password) if self.parts.password else ""
        self.sender = self._sender()
        self._from_header = formataddr((self.sender.display_name, self.sender.addr_spec),
                                       "utf-8")
        self.starttls = self._starttls_mode()
        self.timeout = self.number("timeout", 10.0)
        if self.timeout <= 0:
            raise ConfigurationError(f"email: option timeout: must be above 0, got {self.timeout}")
        self.verify = self.flag("verify", True)
        self._smtp: smtplib.SMTP | None = None
        self._last_used = 0.0

    # --- configuration ----------------------------------------------------------------

    def _address_of_server(self) -> tuple[str, int]:
        try:
            port = self.parts.port
        except ValueError:
            raise ConfigurationError(
                f"email: option port: not a port number in {self.masked_url!r}"
            ) from None
        if not self.parts.hostname:
            raise ConfigurationError(f"email: option host: missing in {self.masked_url!r}")
        return self.parts.hostname, port or (465 if self.implicit_tls else 25)

    def _sender(self) -> Mailbox:
        """The From address; checked now so a typo fails at start, not per message.

        A domain without a dot (``notifier@localhost``, the default) is fine for the
        sender, which the operator chooses; an internationalised one is sent as IDNA.
        """
        sender = self.option("from", "")
        if not sender:
            raise ConfigurationError("email: option from: missing (the sender address)")
        try:
            address = _idna_address(_address(sender, self.option("from_name", ""),
                                             dotless_domain=True))
        except (ValueError, email.errors.MessageError):
            raise ConfigurationError(
                f"email: option from: not a single e-mail address: {sender!r}"
            ) from None
        if not address.username.isascii():
            raise ConfigurationError(
                f"email: option from: {sender!r} has a non-ASCII local part; use an ASCII one"
            )
        return address

    def _starttls_mode(self) -> bool | None:
        """True: required, False: never, None (``auto``): when the server offers it."""
        value = self.option("starttls", "auto").lower()
        if value == "auto":
            return None
        if value in ("1", "yes", "true", "on", "0", "no", "false", "off"):
            return self.flag("starttls", False)
        raise ConfigurationError(
            f"email: option starttls: expected auto, yes or no, got {value!r}"
        )

    # --- sending ----------------------------------------------------------------------

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> Iterator[SendResult]:
        """Send over one session; after the server is found unreachable the remaining
        messages fail at once with the same error, so a dead server is not hammered."""
        self._drop_if_stale()
        failed: DeliveryError | None = None
        may_reconnect = True
        for message in messages:
            if failed is not None:
                yield SendResult(message.delivery_id, failed)
                continue
            try:
                may_reconnect = self._send(message, may_reconnect)
            except _BatchFailed as exc:
                failed = exc.error
                yield SendResult(message.delivery_id, failed)
            except DeliveryError as exc:
                yield SendResult(message.delivery_id, exc)
            else:
                yield SendResult(message.delivery_id)

    def _send(self, message: OutgoingMessage, may_reconnect: bool) -> bool:
        """Send one message, replacing a session that died under it once per batch
        (servers close idle sessions). Returns whether a reconnect is still allowed."""
        mail, recipient = self._compose(message)
        try:
            self._transmit(mail, recipient)
            return may_reconnect
        except _SessionLost as lost:
            if not may_reconnect:
                raise _BatchFailed(lost.error) from None
        try:
            self._transmit(mail, recipient)
        except _SessionLost as lost:
            raise _BatchFailed(lost.error) from None
        return False

    def _transmit(self, mail: bytes, recipient: str) -> None:
        smtp = self._session()
        options = self._mail_options(smtp, recipient)
        try:
            smtp.sendmail(self.sender.addr_spec, [recipient], mail, mail_options=options)
        except smtplib.SMTPSenderRefused as exc:
            raise self._sender_refused(exc) from None
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            raise _response_error(code, text, "recipient refused") from None
        except smtplib.SMTPResponseException as exc:  # sender refused, data refused, ...
            raise _response_error(exc.smtp_code, exc.smtp_error) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise PermanentError(f"email: {exc}") from None
        except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
            self._drop()
            if _timed_out(exc):  # a slow server; a resend now would only wait again
                raise _BatchFailed(self._unreachable(exc)) from None
            raise _SessionLost(self._unreachable(exc)) from None
        except OSError as exc:  # not answering, or worse
            self._drop()
            raise _BatchFailed(self._unreachable(exc)) from None
        finally:
            self._after_command()

    def _mail_options(self, smtp: smtplib.SMTP, recipient: str) -> list[str]:
        """SMTPUTF8 for a non-ASCII local part, if the server offers it; without it, that
        address cannot be sent to (``AddressError``), and nothing else is affected."""
        if recipient.isascii():
            return []
        if not smtp.has_extn("smtputf8"):
            raise AddressError(
                f"email: {recipient!r} has a non-ASCII local part and the SMTP server"
                f" {self.host}:{self.port} does not offer SMTPUTF8"
            )
        return ["SMTPUTF8"]

    def _after_command(self) -> None:
        """Note the session's last use; forget it if smtplib closed it (after a 421)."""
        if self._smtp is not None and self._smtp.sock is None:
            self._smtp = None
        self._last_used = time.monotonic()

    # --- the session ------------------------------------------------------------------

    def _session(self) -> smtplib.SMTP:
        if self._smtp is None:
            self._smtp = self._connect()
        return self._smtp

    def _connect(self) -> smtplib.SMTP:
        """A new logged-in session; any failure here ends the batch (``_BatchFailed``)."""
        try:
            smtp = self._open()
        except OSError as exc:
            raise _BatchFailed(self._unreachable(exc)) from None
        try:
            self._secure_and_login(smtp)
        except smtplib.SMTPAuthenticationError as exc:
            _quietly_close(smtp)
            raise _BatchFailed(self._login_refused(exc)) from None
        except ConfigurationError as exc:
            _quietly_close(smtp)
            raise _BatchFailed(exc) from None
        except OSError as exc:
            _quietly_close(smtp)
            raise _BatchFailed(self._unreachable(exc)) from None
        return smtp

    def _open(self) -> smtplib.SMTP:
        if self.implicit_tls:
            return smtplib.SMTP_SSL(
                self.host, self.port, timeout=self.timeout, context=self._tls_context()
            )
        return smtplib.SMTP(self.host, self.port, timeout=self.timeout)

    def _secure_and_login(self, smtp: smtplib.SMTP) -> None:
        smtp.ehlo_or_helo_if_needed()
        if not self.implicit_tls and self.starttls is not False:
            if smtp.has_extn("starttls"):
                smtp.starttls(context=self._tls_context())
                smtp.ehlo()
            elif self.starttls:
                raise ConfigurationError(
                    f"email: {self.host}:{self.port} does not offer STARTTLS (starttls=yes)"
                )
        if self.username:
            if not smtp.has_extn("auth"):
                raise ConfigurationError(
                    f"email: {self.host}:{self.port} offers no AUTH (without TLS, servers"
                    " usually hide it; check starttls)"
                )
            smtp.login(self.username, self._password)

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _drop_if_stale(self) -> None:
        """A session idle for a while may have been closed by the server: probe it."""
        if self._smtp is None or time.monotonic() - self._last_used < IDLE_CHECK_SECONDS:
            return
        try:
            code, _ = self._smtp.noop()
        except OSError:
            code = 0
        if code != 250:
            self._drop()

    def _drop(self) -> None:
        if self._smtp is not None:
            _quietly_close(self._smtp)
            self._smtp = None

    def close(self) -> None:
        """End the kept session politely (QUIT)."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except OSError:
            _quietly_close(smtp)

    # --- errors -----------------------------------------------------------------------

    def _unreachable(self, exc: OSError) -> RetryableError:
        reason = _one_line(str(exc)) or type(exc).__name__
        if _timed_out(exc):
            reason = f"timed out after {self.timeout:g}s"
        return RetryableError(
            self._scrub(f"email: SMTP server {self.host}:{self.port} unreachable: {reason}")
        )

    def _login_refused(self, exc: smtplib.SMTPAuthenticationError) -> ConfigurationError:
        text = _decode(exc.smtp_error)
        return ConfigurationError(
            self._scrub(
                f"email: the SMTP server refused the login of user {self.username!r} at"
                f" {self.host}:{self.port} ({exc.smtp_code} {text})"
            )
        )

    def _sender_refused(self, exc: smtplib.SMTPSenderRefused) -> DeliveryError:
        """A server refusing our sender (5xx: not allowed, authentication required) is our
        configuration, not the recipient's: the delivery is held, never dead-lettered."""
        if not 500 <= exc.smtp_code < 600:
            return _response_error(exc.smtp_code, exc.smtp_error, "sender refused")
        return ConfigurationError(
            self._scrub(
                f"email: the SMTP server {self.host}:{self.port} refused the sender"
                f" {self.sender.addr_spec!r} ({exc.smtp_code} {_decode(exc.smtp_error)});"
                " check option from and the login"
            )
        )

    def _scrub(self, text: str) -> str:
        """Errors quote server text; make sure the password never rides along."""
        return text.replace(self._password, "***") if self._password else text

    # --- composing --------------------------------------------------------------------

    def _compose(self, message: OutgoingMessage) -> tuple[bytes, str]:
        """The message as sent and the bare recipient address (``PermanentError`` when
        the address is unusable: the server is never asked about it).

        Built with the classic MIME classes: the ``email.policy`` API parses every
        header it is given and took 4-5 ms per message (more than the whole SMTP
        exchange over a kept session); this takes under 1 ms. Header injection stays
        impossible: every header value is one line (``_header_text``) and addresses are
        checked (``_address``)."""
        if message.address is None:
            raise AddressError(
                f"email: recipient {message.recipient_id!r} has no e-mail address"
            )
        to = _recipient(message.address, message.recipient_name or "")
        html_body = message.html or _text_to_html(message.body)
        plain = self._compose_plain(message, to, html_body)
        if plain is None:
            plain = self._compose_classic(message, to, html_body)
        return plain, to.addr_spec

    def _compose_classic(self, message: OutgoingMessage, to: Mailbox, html_body: str) -> bytes:
        """Any message, through the MIME classes (encoded words, folded headers)."""
        # A non-ASCII local part (sent only with SMTPUTF8) goes into the To header as raw
        # UTF-8, which the classic generator would turn into an encoded word: it writes
        # a unique ASCII stand-in that is swapped for the address in the bytes.
        shown = to.addr_spec if to.addr_spec.isascii() else (
            f"{message.delivery_id}@smtputf8.invalid"
        )
        mail = MIMEMultipart("alternative")
        # typeshed types header values as str; the compat32 policy takes a Header too.
        mail["Subject"] = _encoded_header(_header_text(message.title))  # type: ignore[assignment]
        mail["From"] = self._from_header
        mail["To"] = formataddr((to.display_name, shown), "utf-8")
        mail["Date"] = formatdate(localtime=True)
        # The delivery id is the idempotency key: a resend carries the same Message-ID.
        mail["Message-ID"] = f"<{message.delivery_id}@notifier>"
        mail["X-Notifier-Delivery-Id"] = str(message.delivery_id)
        mail.attach(_utf8_part(message.body, "plain"))
        mail.attach(_utf8_part(html_body, "html"))
        data = mail.as_bytes(policy=_WIRE)
        if shown != to.addr_spec:
            data = data.replace(shown.encode(), to.addr_spec.encode(), 1)
        return data

    def _compose_plain(
        self, message: OutgoingMessage, to: Mailbox, html_body: str
    ) -> bytes | None:
        """The common case written out directly: the same bytes the MIME classes give
        (a test holds them equal), at a tenth of their cost, which was most of the
        worker's time per e-mail. Only for headers that are ASCII and short enough
        that nothing is encoded or folded; None for any other message (the classic
        path then builds it)."""
        if not to.addr_spec.isascii():  # SMTPUTF8: the classic path's stand-in
            return None
        headers = [
            f"Subject: {_header_text(message.title)}", f"From: {self._from_header}",
            f"To: {formataddr((to.display_name, to.addr_spec), 'utf-8')}",
        ]
        if any(len(line) > _PLAIN_HEADER_MAX or not line.isascii() for line in headers):
            return None
        try:
            parts = [_qp_part(message.body, "plain"), _qp_part(html_body, "html")]
        except UnicodeError:  # a lone surrogate: the classic path says what is wrong
            return None
        boundary = _boundary()
        if any(boundary in part for part in parts):
            return None
        delimiter = f"\r\n--{boundary}"
        return "".join((
            f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n'
            "MIME-Version: 1.0\r\n", "\r\n".join(headers),
            f"\r\nDate: {formatdate(localtime=True)}\r\n"
            f"Message-ID: <{message.delivery_id}@notifier>\r\n"
            f"X-Notifier-Delivery-Id: {message.delivery_id}\r\n\r\n--{boundary}\r\n",
            parts[0], delimiter, "\r\n", parts[1], delimiter, "--\r\n",
        )).encode("ascii")


#: Longest header line the generator leaves unfolded (``compat32``'s 78).
_PLAIN_HEADER_MAX = 78
#: The generator's boundary: 15 "=", a random 19-digit number, "==".
_BOUNDARY_DIGITS = len(repr(sys.maxsize - 1))


def _boundary() -> str:
    return f"{'=' * 15}{random.randrange(sys.maxsize):0{_BOUNDARY_DIGITS}d}=="


def _qp_part(text: str, subtype: str) -> str:
    """A text part as ``_utf8_part`` and the generator write it: its headers, then the
    text in UTF-8 quoted-printable (which holds no bare CR or LF), ending in CRLF."""
    body = _UTF8_QP.body_encode(_ending_in_newline(text)).replace("\n", "\r\n")
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\nMIME-Version: 1.0\r\n'
            f"Content-Transfer-Encoding: quoted-printable\r\n\r\n{body}")


def _recipient(address: str, display_name: str) -> Mailbox:
    """The recipient's address as it goes on the wire (an internationalised domain in
    its IDNA form); ``AddressError`` when it is unusable, so that this delivery alone
    fails and the server is never asked about it."""
    try:
        checked = _address(address, display_name)
    except (ValueError, email.errors.MessageError):
        raise AddressError(f"email: bad address {address!r}") from None
    try:
        return _idna_address(checked)
    except (idna.IDNAError, UnicodeError):
        raise AddressError(
            f"email: the domain of {address!r} is not a valid internationalised domain name"
        ) from None


@dataclass(frozen=True)
class Mailbox:
    """A checked address: ``username@domain`` and a display name safe for a header."""

    display_name: str
    username: str
    domain: str

    @property
    def addr_spec(self) -> str:
        return f"{self.username}@{self.domain}"


def _idna_address(address: Mailbox) -> Mailbox:
    """The address with its domain in IDNA form (``bücher.de`` -> ``xn--bcher-kva.de``),
    as SMTP needs it; ``idna.IDNAError`` for a domain IDNA refuses."""
    if address.domain.isascii():
        return address
    return Mailbox(address.display_name, address.username, idna_domain(address.domain))


def _address(address: str, display_name: str, *, dotless_domain: bool = False) -> Mailbox:
    """One bare ``local@domain`` with a display name made safe; ValueError otherwise.
    The domain must have a dot unless ``dotless_domain`` (``localhost``). A non-ASCII
    local part passes (it is sent only where the server offers SMTPUTF8)."""
    if _NOT_IN_ADDRESS.search(address) or address.count("@") != 1:
        raise ValueError(address)
    if parseaddr(address) != ("", address):
        raise ValueError(address)
    local, _, domain = address.partition("@")
    if not local or not domain.strip("."):
        raise ValueError(address)
    if not dotless_domain and "." not in domain.strip("."):
        raise ValueError(address)
    # Address() parses the addr-spec itself and raises on leftovers or defects. It
    # refuses any non-ASCII local part, so it checks the same shape in ASCII.
    ascii_local = _NON_ASCII.sub("x", local)
    checked = Address(addr_spec=f"{ascii_local}@{domain}")
    if checked.username != ascii_local:  # it would have quoted or changed the local part
        raise ValueError(address)
    return Mailbox(_header_text(display_name), local, checked.domain)


def _ending_in_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _utf8_part(text: str, subtype: str) -> MIMEText:
    """A text part in UTF-8 quoted-printable, ending in a newline."""
    # typeshed wants a charset name; MIMEText hands a Charset on to set_payload as is.
    return MIMEText(_ending_in_newline(text), subtype, _UTF8_QP)  # type: ignore[arg-type]


def _encoded_header(text: str) -> str | Header:
    """ASCII as is; anything else as RFC 2047 encoded words."""
    return text if text.isascii() else Header(text, "utf-8")


def _header_text(text: str) -> str:
    """Collapse line breaks and control characters so a value stays one header."""
    return _UNSAFE_HEADER_CHARS.sub(" ", text).strip()


def _text_to_html(text: str) -> str:
    escaped = html.escape(text.replace("\r\n", "\n")).replace("\n", "<br>\n")
    return f"<html><body><p>{escaped}</p></body></html>\n"


def _response_error(code: int, text: bytes | str, what: str = "") -> DeliveryError:
    """SMTP 4xx may pass later; 5xx will not."""
    message = f"SMTP {code}: {_decode(text)}" + (f" ({what})" if what else "")
    if 500 <= code < 600:
        return PermanentError(message)
    return RetryableError(message)


def _decode(text: bytes | str) -> str:
    return _one_line(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


def _one_line(text: str) -> str:
    return _UNSAFE_HEADER_CHARS.sub(" ", text).strip()


def _timed_out(exc: BaseException) -> bool:
    """smtplib reports a read timeout as SMTPServerDisconnected; the cause tells."""
    return isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError)


def _quietly_close(smtp: smtplib.SMTP) -> None:
    with contextlib.suppress(OSError):
        smtp.close()
