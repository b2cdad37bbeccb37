"""A real status-callback receiver for the tests: verifies each request's signature as
a caller's receiver would (``notifier.channels.webhook.verify_signature``), and counts
what it accepted per (delivery, status).

``fail_first``: every event is answered 500 that many times before it is accepted;
``always``: every request gets this status (a receiver that never recovers). A request
whose signature does not verify is answered 401 and kept in ``forged``.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from notifier.channels.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    verify_signature,
)


class CallbackReceiver:
    def __init__(self, secret: Callable[[], str], fail_first: int = 0,
                 always: int | None = None) -> None:
        #: Read on each request: the origin's secret is made when the first callback
        #: goes out (or by the test, beforehand).
        self.secret = secret
        self.fail_first = fail_first
        self.always = always
        self.accepted: Counter[tuple[str, str]] = Counter()
        self.attempts: Counter[str] = Counter()
        self.events: dict[str, dict[str, Any]] = {}
        self.forged: list[bytes] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> CallbackReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str = "/callbacks") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def total(self) -> int:
        with self.lock:
            return sum(self.accepted.values())

    def _answer(self, headers: Any, body: bytes) -> int:
        key = headers.get(IDEMPOTENCY_HEADER)
        if not verify_signature(self.secret(), headers.get(TIMESTAMP_HEADER), key, body,
                                headers.get(SIGNATURE_HEADER)):
            self.forged.append(body)
            return 401
        event = json.loads(body)
        assert event["id"] == key  # the event id is the receiver's dedup key
        with self.lock:
            self.attempts[key] += 1
            if self.always is not None:
                return self.always
            if self.attempts[key] <= self.fail_first:
                return 500
            self.accepted[(event["delivery_id"], event["status"])] += 1
            self.events[key] = event
        return 200

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = receiver._answer(self.headers, body)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
