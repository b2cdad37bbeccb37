"""Shared pieces of the HTTP-based channels (webhook, Slack, SMS): one connection pool
per process, the check that keeps targets off private networks, the mapping of HTTP
outcomes onto retryable and permanent errors, target URLs made safe to log, and
``HttpChannel``, the batch loop they share.

Not a channel itself: ``HttpChannel`` has no ``name``, so it registers nothing.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx

from notifier.channels.base import (
    Channel,
    ConfigurationError,
    DeliveryError,
    OutgoingMessage,
    PermanentError,
    RetryableError,
    SendResult,
)
from notifier.settings import get_settings, mask_url

USER_AGENT = "notifier/0.1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Path segments and query values this long or longer look like tokens (Slack, Discord
#: and Teams hooks carry theirs in the path): ``mask_target`` hides them.
SECRET_LOOKING_LENGTH = 20

_client: httpx.Client | None = None
_client_pid: int | None = None
_client_lock = threading.Lock()


def _reset_lock_in_child() -> None:
    """A fork while another thread held the lock must not leave the child deadlocked."""
    global _client_lock
    _client_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


class HostUnreachable(RetryableError):
    """The target's host could not be reached (connection refused, DNS, timeout).

    A batch stops sending to that host: the next messages would most likely wait out
    the same timeout, one after the other.
    """


# --- The pool -------------------------------------------------------------------------


def get_client() -> httpx.Client:
    """The process's pooled client, made on first use.

    Keyed by process id: a forked worker child must not share the parent's sockets, so
    it drops the inherited client (without closing it, which would shut the parent's TLS
    sessions) and makes its own. Redirects are not followed, because a redirect could
    lead past ``check_target`` to a private address. Timeouts are given per request.
    """
    global _client, _client_pid
    pid = os.getpid()
    with _client_lock:
        if _client is None or _client_pid != pid or _client.is_closed:
            _client = httpx.Client(
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT},
                limits=httpx.Limits(max_connections=100, keepalive_expiry=30.0),
            )
            _client_pid = pid
        return _client


def close_client() -> None:
    """Close this process's pool (at shutdown; the next ``get_client`` makes a new one)."""
    global _client
    with _client_lock:
        if _client is not None and _client_pid == os.getpid():
            _client.close()
        _client = None


# --- Targets --------------------------------------------------------------------------


def check_target(url: str, allow_private: bool | None = None, *, what: str = "webhook") -> None:
    """Refuse a target that is not http(s) or whose host resolves to a non-public address.

    ``allow_private`` defaults to ``NOTIFIER_ALLOW_PRIVATE_TARGETS``. A hostname is
    resolved here and again by the HTTP client when it connects, so a DNS answer that
    changes in between (DNS rebinding) gets past this check: a known limit. Pinning the
    checked address would break TLS name checks; an egress proxy that refuses private
    ranges closes the gap where that matters.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PermanentError(f"{what} target {mask_target(url)} is not an http(s) URL")
    if allow_private is None:
        allow_private = get_settings().allow_private_targets
    if allow_private:
        return
    for address in _resolve(parts.hostname, parts.port, what):
        kind = non_public_kind(address)
        if kind:
            shown = parts.hostname if parts.hostname == str(address) else (
                f"{parts.hostname} ({address})"
            )
            raise PermanentError(
                f"{what} target {shown} is {kind} address;"
                " set NOTIFIER_ALLOW_PRIVATE_TARGETS=1 to allow it"
            )


def _resolve(host: str, port: int | None, what: str) -> list[IPAddress]:
    """The host's addresses: a literal as is (no lookup), a name through getaddrinfo."""
    try:
        return [ipaddress.ip_address(host.strip("[]").split("%")[0])]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise HostUnreachable(f"{what} target {host} does not resolve: {exc}") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def non_public_kind(address: IPAddress) -> str | None:
    """``"a loopback"``, ``"a private"``, ... for an address off the public internet."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    checks = (
        ("an unspecified", address.is_unspecified),
        ("a loopback", address.is_loopback),
        ("a link-local", address.is_link_local),
        ("a multicast", address.is_multicast),
        ("a reserved", address.is_reserved),
        ("a private", address.is_private),
        ("a non-public", not address.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)


def mask_target(url: str) -> str:
    """The target as it may be logged or stored in an error: ``masking.mask_secrets`` (password,
    secret options, tokens in the path such as Slack's ``/services/T000/B000/XXXX``)."""
    return mask_url(url)  # mask_url is notifier.masking.mask_secrets


# --- Outcomes -------------------------------------------------------------------------


def raise_for_response(response: httpx.Response, detail: str | None = None) -> None:
    """Map an answer onto the error taxonomy; return quietly on 2xx.

    429 and 5xx may pass later (honouring ``Retry-After``), so may 408; every other
    answer, redirects included (they are not followed), is permanent. ``detail`` is a
    short, known-safe reason from the provider to append (Slack's ``no_service``).
    """
    status = response.status_code
    if 200 <= status < 300:
        return
    message = f"HTTP {status} from {mask_target(str(response.request.url))}"
    if detail:
        message += f": {detail}"
    if status in (408, 429) or status >= 500:
        raise RetryableError(message, retry_after=parse_retry_after(response))
    raise PermanentError(message)


def parse_retry_after(response: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date), if valid."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def transport_error(exc: httpx.HTTPError, url: str, timeout: float) -> DeliveryError:
    """A request that got no answer: retryable; unreachable when it never connected or
    timed out, so that the batch skips the host."""
    target = mask_target(url)
    if isinstance(exc, httpx.TimeoutException):
        return HostUnreachable(f"no answer from {target} within {timeout:g}s")
    if isinstance(exc, httpx.ConnectError):
        return HostUnreachable(f"cannot connect to {target}: {_reason(exc, url)}")
    if isinstance(exc, httpx.UnsupportedProtocol):
        return PermanentError(f"{target} is not an http(s) URL")
    return RetryableError(f"{type(exc).__name__} from {target}: {_reason(exc, url)}")


def _reason(exc: Exception, url: str) -> str:
    """The exception's text on one line, with the raw URL (secrets and all) masked."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.replace(url, mask_target(url))[:200]


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port): what "the same host" means when a batch skips one."""
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or ""), parts.port


# --- The batch loop -------------------------------------------------------------------


class HttpChannel(Channel):
    """A channel that sends each message as one POST over the process's pool.

    Options every HTTP channel takes: ``timeout`` (seconds, default 10) and
    ``allow_private`` (yes/no, default ``NOTIFIER_ALLOW_PRIVATE_TARGETS``). Subclasses
    say where a message goes (``target``), what is posted (``request``) and, if the
    provider's answers carry a reason worth keeping, how to read them (``check_response``).
    """

    #: Whether failures at the target count towards the channel's circuit breaker. False
    #: where every recipient has a server of their own: one dead endpoint must not stop
    #: the channel for everybody.
    target_is_provider: ClassVar[bool] = True

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.timeout = self.number("timeout", 10.0)
        if self.timeout <= 0:
            raise ConfigurationError(f"{self.name}: option timeout: must be above 0")
        self.allow_private = self.flag("allow_private", get_settings().allow_private_targets)

    def target(self, message: OutgoingMessage) -> str:
        """The URL the message is posted to."""
        raise NotImplementedError

    def request(self, message: OutgoingMessage) -> dict[str, Any]:
        """Keyword arguments of ``httpx.Client.post``: the body, headers, auth."""
        raise NotImplementedError

    def check_response(self, response: httpx.Response) -> None:
        raise_for_response(response)

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> Iterator[SendResult]:
        """One POST per message; a failure stops nothing but further messages to a host
        that could not be reached, which fail at once instead of waiting out a timeout."""
        checked: dict[tuple[str, str, int | None], DeliveryError | None] = {}
        down: dict[tuple[str, str, int | None], DeliveryError] = {}
        for message in messages:
            try:
                self._send(message, checked, down)
            except DeliveryError as error:
                if not self.target_is_provider:
                    error.provider_failure = False
                yield SendResult(message.delivery_id, error)
            else:
                yield SendResult(message.delivery_id)

    def _send(
        self,
        message: OutgoingMessage,
        checked: dict[tuple[str, str, int | None], DeliveryError | None],
        down: dict[tuple[str, str, int | None], DeliveryError],
    ) -> None:
        url = self.target(message)
        key = origin(url)
        if key in down:
            skipped = RetryableError(f"not tried: {down[key]}")
            skipped.provider_failure = False  # the one failure that was tried counts
            raise skipped
        if key not in checked:
            checked[key] = _check_error(url, self.allow_private, self.name)
        if checked[key] is not None:
            raise _copy(checked[key])
        try:
            self.post(url, message)
        except HostUnreachable as error:
            down[key] = error
            raise

    def post(self, url: str, message: OutgoingMessage) -> httpx.Response:
        kwargs = self.request(message)
        try:
            response = get_client().post(url, timeout=self.timeout, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(exc, url, self.timeout) from None
        self.check_response(response)
        return response


def _check_error(url: str, allow_private: bool, what: str) -> DeliveryError | None:
    try:
        check_target(url, allow_private, what=what)
    except DeliveryError as error:
        return error
    return None


def _copy(error: DeliveryError) -> DeliveryError:
    """A fresh error of the same kind, so each message's result owns its exception."""
    copy = type(error)(str(error))
    copy.__dict__.update(error.__dict__)
    return copy
