"""A real HTTP server for tests: records what it receives, answers what it is told.

``HttpServer`` runs ``http.server.ThreadingHTTPServer`` on 127.0.0.1 (a free port) in a
thread, speaking HTTP/1.1 with keep-alive, so that tests can count the TCP connections
a client opened. Answers come from a queue (``respond``), then from the standing answer
(``respond_always``, by default ``200 ok``). Use it as a context manager, or through the
``http_server`` fixture (import it into a test module under its function's name, so that
the test's parameter does not shadow the import: ``from tests.http_server import
http_server_fixture  # noqa: F401``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest


@dataclass(frozen=True)
class Request:
    """One request as received."""

    method: str
    #: The path with its query string, as sent.
    path: str
    #: Case-insensitive: ``request.headers["content-type"]``.
    headers: Message
    body: bytes
    #: Which TCP connection (1, 2, ...) carried it.
    connection: int

    @property
    def json(self) -> Any:
        """The body parsed as JSON; None if it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def form(self) -> dict[str, str]:
        """The body parsed as ``application/x-www-form-urlencoded`` (last value wins)."""
        pairs = parse_qs(self.body.decode(), keep_blank_values=True)
        return {key: values[-1] for key, values in pairs.items()}

    @property
    def query(self) -> dict[str, str]:
        return {key: values[-1] for key, values in parse_qs(urlsplit(self.path).query).items()}


@dataclass
class Response:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    #: Seconds to wait before answering; None: the server's ``delay``.
    delay: float | None = None


class HttpServer:
    """A scriptable local HTTP server; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.requests: list[Request] = []
        #: Seconds every answer waits, unless its ``respond`` said otherwise.
        self.delay: float = 0.0
        self._queue: deque[Response] = deque()
        self._always = Response()
        self._connections = 0
        self._sockets: set[socket.socket] = set()
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer((host, 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    # --- Life cycle -----------------------------------------------------------------

    def __enter__(self) -> HttpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and cut every open connection (sleeping answers give up)."""
        self._closing.set()
        self._server.shutdown()
        with self._changed:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join(timeout=5)

    # --- Addresses ------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/hook") -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    # --- Script ---------------------------------------------------------------------

    def respond(
        self,
        status: int,
        body: bytes | str = b"",
        headers: dict[str, str] | None = None,
        times: int = 1,
        delay: float | None = None,
    ) -> None:
        """Queue an answer for the next ``times`` requests (after those already queued)."""
        response = Response(status, _bytes(body), dict(headers or {}), delay)
        with self._changed:
            self._queue.extend([response] * times)

    def respond_always(
        self,
        status: int,
        body: bytes | str = b"",
        headers: dict[str, str] | None = None,
        delay: float | None = None,
    ) -> None:
        """The answer once the queue is empty (initially ``200 ok``)."""
        with self._changed:
            self._always = Response(status, _bytes(body), dict(headers or {}), delay)

    def respond_json(self, status: int, payload: Any, times: int = 1) -> None:
        """Queue a JSON answer."""
        self.respond(status, json.dumps(payload), {"Content-Type": "application/json"}, times)

    def reset(self) -> None:
        """Forget requests, queued answers and the delay; answer ``200 ok`` again.
        Connections stay open and counted."""
        with self._changed:
            self.requests.clear()
            self._queue.clear()
            self._always = Response()
            self.delay = 0.0

    # --- Observations ---------------------------------------------------------------

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        with self._changed:
            return self._connections

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Request]:
        """The requests once at least ``count`` have arrived; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"expected {count} requests within {timeout}s, got {len(self.requests)}"
                    )
                self._changed.wait(left)
            return list(self.requests)

    # --- Serving --------------------------------------------------------------------

    def _connected(self, sock: socket.socket) -> int:
        with self._changed:
            self._connections += 1
            self._sockets.add(sock)
            return self._connections

    def _disconnected(self, sock: socket.socket) -> None:
        with self._changed:
            self._sockets.discard(sock)

    def _record(self, request: Request) -> Response:
        with self._changed:
            self.requests.append(request)
            response = self._queue.popleft() if self._queue else self._always
            self._changed.notify_all()
            return response

    def _wait(self, response: Response) -> None:
        delay = self.delay if response.delay is None else response.delay
        if delay > 0:
            self._closing.wait(delay)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(_Handler):
            owner = server

        return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: HttpServer

    def setup(self) -> None:
        super().setup()
        self.connection_number = self.owner._connected(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.owner._disconnected(self.connection)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except OSError:  # the client gave up (a timeout test): nothing to answer
            self.close_connection = True

    def _serve(self) -> None:
        request = Request(
            self.command, self.path, self.headers, self._read_body(), self.connection_number
        )
        response = self.owner._record(request)
        self.owner._wait(response)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(chunks)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pytest shows the test's own output, not an access log."""


def _bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else body


@pytest.fixture(name="http_server")
def http_server_fixture() -> Iterator[HttpServer]:
    """A running ``HttpServer``, closed after the test."""
    with HttpServer() as server:
        yield server
