"""The egress guard: every outbound connection a producer can point somewhere goes only
to an address that was checked, within one deadline.

Three pieces:

* **Which addresses are forbidden** (``forbidden_kind``): loopback, private, link-local,
  shared (CGNAT), multicast, unspecified, reserved, and IPv6 forms that reach such an
  address in disguise (IPv4-mapped, 6to4, NAT64, Teredo). A name is refused when ANY of
  its addresses is forbidden.
* **Resolve once, check, connect to what was checked.** ``GuardedBackend`` is the
  network backend of the HTTP channels' httpx pool: it resolves the host, checks every
  address and connects to one of them, so a second DNS answer (rebinding) is never
  asked for. httpcore still hands the original name to TLS (SNI and the certificate
  check) and httpx sends it as ``Host``. ``guarded_egress`` does the same for code
  that resolves through ``socket.getaddrinfo`` itself (Apprise: requests and smtplib):
  while it is active in a thread, every lookup of that thread is checked, every TCP
  connect must go to a checked address, and requests follows no redirects.
* **One deadline per request, a bounded answer.** ``deadline`` bounds the httpx
  requests (connecting, sending and every read share it, so a server dribbling a byte
  at a time cannot hold a request past its timeout); ``guarded_egress`` shuts its
  sockets down when its time is up, and caps the body requests reads.

``use_network`` swaps the resolver (and the dialler) for tests; nothing else does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import httpcore
import requests

from notifier.channels.base import PermanentError, RetryableError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``resolve(host, port)``: the host's addresses, as strings, in the order to try them.
Resolver = Callable[[str, int], Sequence[str]]
#: ``connect(address, port, timeout)``: an open TCP stream to exactly that address.
Connector = Callable[[IPAddress, int, "float | None"], httpcore.NetworkStream]

ALLOW_HINT = "set NOTIFIER_ALLOW_PRIVATE_TARGETS=1 to allow it"

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_TEREDO = ipaddress.ip_network("2001::/32")


class HostUnreachable(RetryableError):
    """The target's host could not be reached (connection refused, DNS, timeout).

    A batch stops sending to that host: the next messages would most likely wait out
    the same timeout, one after the other.
    """


class ForbiddenAddress(PermanentError):
    """The target is, or resolves to, an address the operator has not allowed."""

    def __init__(self, host: str, address: IPAddress, kind: str, what: str = "") -> None:
        shown = host if host.strip("[]") == str(address) else f"{host} ({address})"
        prefix = f"{what} " if what else ""
        super().__init__(f"{prefix}target {shown} is {kind} address; {ALLOW_HINT}")
        self.host = host
        self.address = address
        self.kind = kind

    def named(self, what: str) -> ForbiddenAddress:
        """The same refusal, its text starting with the channel's name."""
        return ForbiddenAddress(self.host, self.address, self.kind, what)


# --- Which addresses --------------------------------------------------------------------


def forbidden_kind(address: IPAddress) -> str | None:
    """``"a loopback"``, ``"a 6to4-wrapped private"``, ... for an address off the public
    internet; None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            kind = _plain_kind(address.ipv4_mapped)
            return f"an IPv4-mapped {kind.removeprefix('a ').removeprefix('an ')}" if kind \
                else "an IPv4-mapped"
        if address in _TEREDO:
            return "a Teredo"
        if address in _NAT64_LOCAL:
            return "a local-use NAT64"
        if address in _NAT64:
            return _wrapped("NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.sixtofour is not None:
            return _wrapped("6to4", address.sixtofour)
    return _plain_kind(address)


def _wrapped(how: str, inner: ipaddress.IPv4Address) -> str | None:
    kind = _plain_kind(inner)
    return f"a {how}-wrapped {kind.removeprefix('a ').removeprefix('an ')}" if kind else None


def _plain_kind(address: IPAddress) -> str | None:
    checks = (
        ("an unspecified", address.is_unspecified),
        ("a loopback", address.is_loopback),
        ("a link-local", address.is_link_local),
        ("a multicast", address.is_multicast),
        ("a shared (CGNAT)", address in _CGNAT),
        ("a reserved", address.is_reserved),
        ("a site-local", isinstance(address, ipaddress.IPv6Address) and address.is_site_local),
        ("a private", address.is_private),
        ("a non-public", not address.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)


def literal_address(host: str) -> IPAddress | None:
    """The host as an address if it is a literal (``[::1]``, ``fe80::1%eth0``), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def check_address(host: str, address: IPAddress) -> None:
    """Raise ``ForbiddenAddress`` if ``address`` (one of ``host``'s) is off limits."""
    kind = forbidden_kind(address)
    if kind:
        raise ForbiddenAddress(host, address, kind)


# --- Resolving ------------------------------------------------------------------------


_original_getaddrinfo = socket.getaddrinfo
_executor: ThreadPoolExecutor | None = None
_executor_pid: int | None = None
_executor_lock = threading.Lock()


def system_resolve(host: str, port: int) -> list[str]:
    """The host's addresses through the system resolver (``getaddrinfo``)."""
    return _getaddrinfo_addresses(host, port)


def _lookup(host: str, port: int) -> Sequence[str]:
    """``network().resolve`` within the current deadline. A lookup cannot be
    interrupted: past the deadline it is left to finish in a helper thread."""
    resolve = network().resolve
    left = time_left()
    if left is None:
        return resolve(host, port)
    future = _lookup_executor().submit(resolve, host, port)
    try:
        return future.result(timeout=max(left, 0.0))
    except FutureTimeout:
        raise TimeoutError(f"no DNS answer for {host} within the deadline") from None


def _getaddrinfo_addresses(host: str, port: int) -> list[str]:
    infos = _original_getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _lookup_executor() -> ThreadPoolExecutor:
    """Threads for lookups under a deadline, made again in a forked child (threads do
    not survive a fork). Sixteen, so that a few names whose DNS hangs (until the
    resolver's own timeout) do not hold up every other lookup of the process."""
    global _executor, _executor_pid
    with _executor_lock:
        if _executor is None or _executor_pid != os.getpid():
            _executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="egress-dns")
            _executor_pid = os.getpid()
        return _executor


def _reset_in_child() -> None:
    global _executor_lock
    _executor_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_in_child)


def system_connect(address: IPAddress, port: int, timeout: float | None) -> httpcore.NetworkStream:
    """A TCP stream to exactly ``address`` (a literal: no lookup happens)."""
    return httpcore.SyncBackend().connect_tcp(str(address), port, timeout=timeout)


@dataclass(frozen=True)
class Network:
    """How names are resolved and addresses dialled: the system's, unless a test says."""

    resolve: Resolver = system_resolve
    connect: Connector = system_connect


_network = Network()


def network() -> Network:
    return _network


@contextlib.contextmanager
def use_network(
    resolve: Resolver | None = None, connect: Connector | None = None
) -> Iterator[Network]:
    """Resolve (and dial) through the given functions for the block: for tests, which
    have no DNS of their own. Connections already pooled are not affected."""
    global _network
    previous = _network
    _network = Network(resolve or previous.resolve, connect or previous.connect)
    try:
        yield _network
    finally:
        _network = previous


def resolve_checked(host: str, port: int, allow_private: bool) -> list[IPAddress]:
    """The host's addresses, once, each checked: ``ForbiddenAddress`` if any is off
    limits (unless allowed), ``OSError`` if the name does not resolve."""
    literal = literal_address(host)
    if literal is not None:
        addresses = [literal]
    else:
        answers = _lookup(host, port)
        addresses = [_parse_answer(answer) for answer in answers]
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
    if not allow_private:
        for address in addresses:
            check_address(host, address)
    return addresses


def _parse_answer(answer: str) -> IPAddress:
    address = literal_address(answer)
    if address is None:
        raise socket.gaierror(socket.EAI_FAIL, f"resolver answered {answer!r}, not an address")
    return address


# --- The deadline ---------------------------------------------------------------------


_deadline: ContextVar[float | None] = ContextVar("egress_deadline", default=None)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Everything on the wire inside the block (lookup, connect, TLS, every write and
    read) shares ``seconds`` in all."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def time_left() -> float | None:
    """Seconds left before the current deadline; None outside one."""
    end = _deadline.get()
    return None if end is None else end - time.monotonic()


def capped(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` cut to the time left; ``error`` when none is left."""
    left = time_left()
    if left is None:
        return timeout
    if left <= 0:
        raise error("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


# --- httpcore: the pinned, deadline-bound network -------------------------------------


class DeadlineStream(httpcore.NetworkStream):
    """A stream whose every operation waits at most the time left before the deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, capped(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, capped(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # server_hostname is the URL's name (httpcore passes it): SNI and the
        # certificate check are against the name, not the pinned address.
        inner = self._inner.start_tls(
            ssl_context, server_hostname, capped(timeout, httpcore.ConnectTimeout)
        )
        return DeadlineStream(inner)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's network for the HTTP channels: resolve once, check every address,
    connect to a checked one; streams bound by the request's deadline."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = resolve_checked(host, port, self.allow_private)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from None
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"{host} does not resolve: {exc}") from None
        failure: Exception = httpcore.ConnectError(f"{host}: no address to connect to")
        for address in addresses:
            try:
                stream = network().connect(
                    address, port, capped(timeout, httpcore.ConnectTimeout)
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
                continue
            for option in socket_options or ():
                stream.get_extra_info("socket").setsockopt(*option)
            return DeadlineStream(stream)
        raise failure

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not an egress target")


# --- Socket-level guard (Apprise: requests, smtplib) ----------------------------------


_local = threading.local()
_patch_lock = threading.Lock()
_patched = False


@dataclass
class Guard:
    """One guarded block's rules and what happened in it, for the caller's error."""

    allow_private: bool
    max_response_bytes: int | None = None
    refused: ForbiddenAddress | None = None
    redirect: str | None = None
    expired: bool = False
    truncated: bool = False
    _sockets: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def track(self, sock: socket.socket) -> None:
        """Remember a socket the block connects, so the deadline can cut it."""
        with self._lock:
            if self.expired:
                raise TimeoutError("the request's deadline passed")
            self._sockets.append(sock)

    def expire(self) -> None:
        """The deadline passed: shut every socket of the block down, which wakes a
        read blocked on one of them, and refuse further connections."""
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def guarded_egress(
    allow_private: bool, timeout: float | None = None, max_response_bytes: int | None = None
) -> Iterator[Guard]:
    """For this thread, while the block runs:

    * every ``socket.getaddrinfo`` answer is checked (all of its addresses, unless
      private ones are allowed), and a TCP ``connect`` must go to a checked literal
      address: the connection goes only where the check looked;
    * ``requests`` follows no redirect and reads at most ``max_response_bytes`` of a
      body;
    * after ``timeout`` seconds in all, every socket the block connected is shut down
      (``Guard.expired``).

    Other threads are untouched; outside a block the hooks do nothing.
    """
    _install_hooks()
    guard = Guard(allow_private, max_response_bytes)
    bound = deadline(timeout) if timeout is not None else contextlib.nullcontext()
    timer = threading.Timer(timeout, guard.expire) if timeout is not None else None
    previous = getattr(_local, "guard", None)
    _local.guard = guard
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        with bound:  # bounds the lookups, which shutting sockets down cannot interrupt
            yield guard
    finally:
        if timer is not None:
            timer.cancel()
        _local.guard = previous


def _current_guard() -> Guard | None:
    return getattr(_local, "guard", None)


def _install_hooks() -> None:
    """Route ``socket.getaddrinfo``, ``socket.socket.connect`` and two steps of requests
    (redirects, reading a body) through this module, once per process. Outside a
    guarded block each behaves exactly as before."""
    global _patched
    with _patch_lock:
        if _patched:
            return
        socket.getaddrinfo = _guarded_getaddrinfo
        original_connect = socket.socket.connect
        original_redirect = requests.Session.get_redirect_target
        original_iter_content = requests.Response.iter_content

        def connect(self: socket.socket, address: Any) -> None:
            guard = _current_guard()
            if guard is not None and self.family in (socket.AF_INET, socket.AF_INET6):
                _check_connect(guard, address)
                guard.track(self)
            return original_connect(self, address)

        def get_redirect_target(
            self: requests.Session, resp: requests.Response
        ) -> str | None:
            target = original_redirect(self, resp)
            guard = _current_guard()
            if guard is not None and target:
                guard.redirect = str(target)[:200]
                return None
            return target

        def iter_content(
            self: requests.Response, *args: Any, **kwargs: Any
        ) -> Iterator[Any]:
            chunks = original_iter_content(self, *args, **kwargs)
            guard = _current_guard()
            if guard is None or guard.max_response_bytes is None:
                return chunks
            return _capped_chunks(self, chunks, guard)

        # Replacing methods: each takes the instances of the class it is set on, which
        # typeshed's signatures (written for base classes) cannot say.
        socket.socket.connect = connect  # type: ignore[method-assign, assignment]
        requests.Session.get_redirect_target = get_redirect_target  # type: ignore[method-assign, assignment]
        requests.Response.iter_content = iter_content  # type: ignore[method-assign]
        _patched = True


def _check_connect(guard: Guard, address: Any) -> None:
    """A guarded connect goes to a literal address that passes the check; a name here
    would be resolved by the C library, out of the guard's sight."""
    host = str(address[0]) if isinstance(address, tuple) and address else ""
    literal = literal_address(host)
    if literal is None:
        raise OSError(f"egress guard: connect to a name ({host[:100]!r}) is not allowed")
    if not guard.allow_private:
        try:
            check_address(host, literal)
        except ForbiddenAddress as refused:
            guard.refused = guard.refused or refused
            raise OSError(str(refused)) from None


def _capped_chunks(
    response: requests.Response, chunks: Iterator[Any], guard: Guard
) -> Iterator[Any]:
    """The body's chunks up to the guard's byte limit; past it the connection is closed
    (not drained) and ``Guard.truncated`` set."""
    limit = guard.max_response_bytes or 0
    total = 0
    for chunk in chunks:
        if total + len(chunk) >= limit:
            yield chunk[: limit - total]
            guard.truncated = True
            with contextlib.suppress(Exception):
                response.raw.close()
            return
        total += len(chunk)
        yield chunk


def _guarded_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
    guard = _current_guard()
    if guard is None or host is None:
        return _original_getaddrinfo(host, port, *args, **kwargs)
    name = host.decode() if isinstance(host, bytes) else str(host)
    try:
        addresses = resolve_checked(name, _port_number(port), guard.allow_private)
    except ForbiddenAddress as refused:
        guard.refused = guard.refused or refused
        raise socket.gaierror(socket.EAI_FAIL, str(refused)) from None
    except TimeoutError:
        guard.expire()
        raise
    infos: list[Any] = []
    for address in addresses:
        infos.extend(_original_getaddrinfo(str(address), port, *args, **kwargs))
    return infos


def _port_number(port: Any) -> int:
    try:
        return int(port or 0)
    except (TypeError, ValueError):
        return socket.getservbyname(str(port))
