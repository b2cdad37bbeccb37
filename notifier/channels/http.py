"""Shared pieces of the HTTP-based channels (webhook, Slack, SMS): one guarded connection
pool per process and policy, the check of a target URL, the mapping of HTTP outcomes onto
retryable and permanent errors, target URLs made safe to log, and ``HttpChannel``, the
batch loop they share.

Every request goes through ``notifier.channels.egress``: the pool's connections are made
to the address that was resolved and checked (no second lookup, no rebinding), a request
has one deadline for everything it does on the wire, and at most
``NOTIFIER_HTTP_MAX_RESPONSE_BYTES`` of an answer's body is read.

Not a channel itself: ``HttpChannel`` has no ``name``, so it registers nothing.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar
from urllib.parse import SplitResult, urlsplit

import httpcore
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
from notifier.channels.egress import (
    ForbiddenAddress,
    GuardedBackend,
    HostUnreachable,
    check_address,
    deadline,
    literal_address,
    resolve_checked,
)
from notifier.settings import get_settings, mask_url

logger = logging.getLogger(__name__)

__all__ = ["HostUnreachable", "HttpChannel", "check_target", "get_client", "mask_target"]

USER_AGENT = "notifier/0.1"

#: Response headers that describe the body as sent; a capped copy drops them.
_BODY_HEADERS = ("content-length", "content-encoding", "transfer-encoding")

#: A DNS name as sent (after IDNA): labels of letters, digits, ``-`` and ``_``.
_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                       r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?")

_clients: dict[bool, httpx.Client] = {}
_clients_pid: int | None = None
_client_lock = threading.Lock()


def _reset_lock_in_child() -> None:
    """A fork while another thread held the lock must not leave the child deadlocked."""
    global _client_lock
    _client_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


# --- The pool -------------------------------------------------------------------------


def get_client(allow_private: bool | None = None) -> httpx.Client:
    """The process's pooled client for targets checked with ``allow_private`` (default:
    ``NOTIFIER_ALLOW_PRIVATE_TARGETS``), made on first use.

    One pool per policy, so a connection opened where private addresses are allowed is
    never reused for a channel that refuses them. Keyed by process id: a forked worker
    child must not share the parent's sockets, so it drops the inherited clients (without
    closing them, which would shut the parent's TLS sessions) and makes its own.
    Redirects are not followed; proxies from the environment are not used (the proxy,
    not we, would choose the address); timeouts are given per request.
    """
    global _clients_pid
    if allow_private is None:
        allow_private = get_settings().allow_private_targets
    pid = os.getpid()
    with _client_lock:
        if _clients_pid != pid:
            _clients.clear()
            _clients_pid = pid
        client = _clients.get(allow_private)
        if client is None or client.is_closed:
            client = _clients[allow_private] = _make_client(allow_private)
        return client


def _make_client(allow_private: bool) -> httpx.Client:
    limits = httpx.Limits(max_connections=100, keepalive_expiry=30.0)
    transport = httpx.HTTPTransport(limits=limits)
    # httpx 0.28 takes no network backend: the pool it made is swapped for one that
    # connects through the guard, with the same limits and TLS defaults.
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=GuardedBackend(allow_private),
    )
    return httpx.Client(
        transport=transport,
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
    )


def close_client() -> None:
    """Close this process's pools (at shutdown; the next ``get_client`` makes new ones)."""
    with _client_lock:
        if _clients_pid == os.getpid():
            for client in _clients.values():
                client.close()
        _clients.clear()


# --- Targets --------------------------------------------------------------------------


def parse_target(url: str, what: str) -> SplitResult:
    """The target's parts, if it is an http(s) URL with a host and a valid port.

    Anything else is that one message's ``PermanentError`` (never an exception out of
    the batch): a port out of range, ``[::1`` without its bracket, a host that is no
    DNS name. (What only httpx can judge, such as a non-ASCII name IDNA refuses, is
    refused the same way when the request is built.) The URL itself is not repeated:
    it may hold a secret and, being malformed, cannot be masked reliably.
    """
    try:
        parts = urlsplit(url)
        port, host = parts.port, parts.hostname
    except (ValueError, TypeError) as exc:
        raise PermanentError(f"{what} target is not a valid URL: {_reason_text(exc)}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise PermanentError(f"{what} target {_shown(url)} is not an http(s) URL")
    if port == 0:
        raise PermanentError(f"{what} target is not a valid URL: port 0")
    if host.isascii() and literal_address(host) is None and not _HOSTNAME.fullmatch(host):
        raise PermanentError(f"{what} target is not a valid URL: its host is not a DNS name")
    return parts


def _reason_text(exc: Exception) -> str:
    return " ".join(str(exc).split())[:100] or type(exc).__name__


def check_target(url: str, allow_private: bool | None = None, *, what: str = "webhook") -> None:
    """Refuse a target that is not a valid http(s) URL or whose host is, or resolves to,
    a forbidden address (any of its addresses: see ``egress.forbidden_kind``).

    ``allow_private`` defaults to ``NOTIFIER_ALLOW_PRIVATE_TARGETS``. This is the check
    on its own, for a clear answer up front; sending does not rely on it: the pool's
    connections resolve once more and connect only to what that lookup checked.
    """
    parts = parse_target(url, what)
    if allow_private is None:
        allow_private = get_settings().allow_private_targets
    if allow_private:
        return
    host = parts.hostname or ""
    try:
        resolve_checked(host, parts.port or _default_port(parts), allow_private=False)
    except ForbiddenAddress as error:
        raise error.named(what) from None
    except (OSError, UnicodeError) as exc:
        raise HostUnreachable(f"{what} target {host} does not resolve: {exc}") from None


def _precheck(parts: SplitResult, allow_private: bool, what: str) -> DeliveryError | None:
    """The refusal of a literal forbidden address, found without a lookup; names are
    checked when the pool connects (once, on the address it connects to)."""
    address = literal_address(parts.hostname or "")
    if allow_private or address is None:
        return None
    try:
        check_address(parts.hostname or "", address)
    except ForbiddenAddress as error:
        return error.named(what)
    return None


def _default_port(parts: SplitResult) -> int:
    return 443 if parts.scheme == "https" else 80


def _shown(url: str) -> str:
    """``mask_target(url)``, or a placeholder when even masking cannot parse it."""
    try:
        return mask_target(url)
    except Exception:  # an error message must never raise itself
        return "(unparseable URL)"


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


def read_capped(response: httpx.Response, limit: int) -> httpx.Response:
    """The streamed answer with at most ``limit`` bytes of its body read.

    An uncompressed body whose ``Content-Length`` is within the limit is read as is
    (h11 reads no byte past that length). Any other is read up to the limit into a
    copy of the answer; the rest is never read: leaving the stream closes that
    connection instead of draining it. A compressed body is not inflated (we ask for
    ``identity``): no decompression bomb.
    """
    length = response.headers.get("content-length", "")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if length.isdigit() and int(length) <= limit and encoding == "identity":
        response.read()
        return response
    body = bytearray()
    for chunk in response.iter_raw():
        body += chunk[: limit - len(body)]
        if len(body) >= limit:
            break
    headers = [
        (name, value) for name, value in response.headers.multi_items()
        if name.lower() not in _BODY_HEADERS
    ]
    return httpx.Response(
        response.status_code, headers=headers, content=bytes(body), request=response.request
    )


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
        that could not be reached, which fail at once instead of waiting out a timeout.
        Whatever goes wrong with one message is that message's result alone."""
        checked: dict[tuple[str, str, int | None], DeliveryError | None] = {}
        down: dict[tuple[str, str, int | None], DeliveryError] = {}
        for message in messages:
            try:
                self._send(message, checked, down)
            except DeliveryError as error:
                if not self.target_is_provider:
                    error.provider_failure = False
                yield SendResult(message.delivery_id, error)
            except Exception as exc:  # one message's bug is its own
                yield SendResult(message.delivery_id, self._unexpected(exc))
            else:
                yield SendResult(message.delivery_id)

    def _unexpected(self, exc: Exception) -> DeliveryError:
        """An exception no rule foresaw: retryable (it may be ours, and fixed), never the
        provider's fault, logged by class only (its text may carry an address)."""
        logger.warning("%s: unexpected %s while sending", self.name, type(exc).__name__)
        error = RetryableError(f"{self.name}: unexpected {type(exc).__name__} while sending")
        error.provider_failure = False
        return error

    def _send(
        self,
        message: OutgoingMessage,
        checked: dict[tuple[str, str, int | None], DeliveryError | None],
        down: dict[tuple[str, str, int | None], DeliveryError],
    ) -> None:
        url = self.target(message)
        parts = parse_target(url, self.name)
        key = (parts.scheme, parts.hostname or "", parts.port)
        if key in down:
            skipped = RetryableError(f"not tried: {down[key]}")
            skipped.provider_failure = False  # the one failure that was tried counts
            raise skipped
        if key not in checked:
            checked[key] = _precheck(parts, self.allow_private, self.name)
        refused = checked[key]
        if refused is not None:
            raise copy_error(refused)
        try:
            self.post(url, message)
        except ForbiddenAddress as error:
            checked[key] = error
            raise
        except HostUnreachable as error:
            down[key] = error
            raise

    def post(self, url: str, message: OutgoingMessage) -> httpx.Response:
        """POST within one deadline of ``timeout`` seconds (lookup, connect, TLS, the
        request, the answer), reading at most ``NOTIFIER_HTTP_MAX_RESPONSE_BYTES``."""
        kwargs = self.request(message)
        client = get_client(self.allow_private)
        limit = get_settings().http_max_response_bytes
        try:
            with deadline(self.timeout), client.stream(
                "POST", url, timeout=self.timeout, **kwargs
            ) as streamed:
                response = read_capped(streamed, limit)
        except httpx.InvalidURL as exc:
            raise PermanentError(
                f"{self.name} target is not a valid URL: {_reason_text(exc)}"
            ) from None
        except httpx.HTTPError as exc:
            raise transport_error(exc, url, self.timeout) from None
        except ForbiddenAddress as error:
            raise error.named(self.name) from None
        self.check_response(response)
        return response


def copy_error(error: DeliveryError) -> DeliveryError:
    """A fresh error of the same kind, so each message's result owns its exception."""
    copy = Exception.__new__(type(error))
    Exception.__init__(copy, str(error))
    copy.__dict__.update(error.__dict__)
    return copy
