"""Failover: what the e-mail channel's second provider adds to an attempt whose preferred
provider is down (issue 15; the aim: at most the connect timeout plus 50 ms).

Each attempt is one ``deliver_batch`` of one delivery in this process: the worker's
code without Celery (claim in Postgres, circuits in Redis, send, record), the backup
being the bench's SMTP server. Four cases, ``attempts`` each (fewer for the slow one):

* ``direct``: one provider, up: an attempt without failover, the base line;
* ``refused``: the preferred provider's port is closed (the connection refused at once);
* ``blackholed``: the preferred provider drops our SYNs (a listening socket whose
  backlog is full): the attempt waits out its connect timeout (``timeout=``, 1 s here);
* ``circuit_open``: the preferred provider's circuit is open, as it is once
  ``NOTIFIER_BREAKER_FAILURE_THRESHOLD`` attempts failed: passed over at the cost of one
  Redis round trip.

In ``refused`` and ``blackholed`` the circuit's threshold is out of reach, so that every
attempt pays the failover (in service only the first few do). The extra time of a case
is its quantile less ``direct``'s.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench import database
from bench.delivery import NO_RATE_LIMITS, ServerProcess, make_deliveries, smtp_server, smtp_url
from bench.scenarios import RECIPIENTS, Bench, Outcome
from bench.series import summary
from notifier.channels import close_channels
from notifier.pipeline.delivery import deliver_batch
from notifier.settings import Settings, get_settings
from notifier.storage.state import state_redis

#: The preferred provider's connect timeout (the e-mail channel's ``timeout`` option).
CONNECT_TIMEOUT = 1.0
#: The aim: failover costs an attempt at most the connect timeout plus this.
AIM_EXTRA_MS = 50.0
CASES = ("direct", "refused", "blackholed", "circuit_open")
#: Attempts before the timed ones: sessions opened, the circuit opened where it is to be.
WARM_UP = 20


def email_failover(bench: Bench, attempts: int) -> Outcome:
    """Per-attempt latency of each case, and the extra of each over ``direct``."""
    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    with smtp_server(bench.config) as backup, _closed_port() as refused, \
            _blackhole() as blackholed:
        for case, primary in (("direct", None), ("refused", refused),
                              ("blackholed", blackholed), ("circuit_open", refused)):
            count = max(10, attempts // 5) if case == "blackholed" else attempts
            results[case] = _attempts(bench, _settings(case, primary, backup), case, count)
    seconds = time.perf_counter() - started
    base = results["direct"]
    extra = {case: {q: _less(results[case][q], base[q]) for q in ("p50", "p99")}
             for case in CASES if case != "direct"}
    sent = sum(int(r["sent"]) for r in results.values())
    total = sum(int(r["count"]) for r in results.values())
    return Outcome(
        "email_failover", "e-mail failover: extra time per attempt, primary down",
        total, seconds, seconds, sent,
        extra={"attempts_ms": results, "extra_ms": extra,
               "connect_timeout_s": CONNECT_TIMEOUT,
               "aim_ms": CONNECT_TIMEOUT * 1000 + AIM_EXTRA_MS},
    )


def _settings(case: str, primary: str | None, backup: ServerProcess) -> Settings:
    urls = [smtp_url(backup)]
    if primary is not None:
        urls.insert(0, f"smtp://{primary}?from=notifier%40example.com&starttls=no"
                       f"&timeout={CONNECT_TIMEOUT:g}")
    settings = get_settings()
    return settings.model_copy(update={
        "channels": {**settings.channels, "email": json.dumps(urls)}, **NO_RATE_LIMITS,
        # Every attempt pays the failover, except where the circuit is to be open.
        "breaker_failure_threshold": 1 if case == "circuit_open" else 1_000_000,
        "breaker_open_seconds": 3600.0,
    })


def _attempts(bench: Bench, settings: Settings, case: str, count: int) -> dict[str, Any]:
    """``count`` attempts of one delivery each, timed one by one (after a warm-up that
    opens the sessions and, for ``circuit_open``, the primary's circuit)."""
    close_channels()
    state = state_redis()
    for key in state.scan_iter("notifier.breaker.*"):
        state.delete(key)
    database.reset(bench.conn, RECIPIENTS)
    try:
        for delivery in make_deliveries(WARM_UP, "email"):
            deliver_batch("email", [delivery], settings, state)
        ids = make_deliveries(count, "email")
        times, sent = [], 0
        for delivery in ids:
            began = time.perf_counter()
            outcome = deliver_batch("email", [delivery], settings, state)
            times.append((time.perf_counter() - began) * 1000)
            sent += outcome.sent
    finally:
        close_channels()
        state.close()
    return {**summary(sorted(times)), "sent": sent}


def _less(value: Any, base: Any) -> float | None:
    return None if value is None or base is None else round(value - base, 1)


@contextmanager
def _closed_port() -> Iterator[str]:
    """``host:port`` where nothing listens: a connection is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield f"127.0.0.1:{port}"


@contextmanager
def _blackhole() -> Iterator[str]:
    """``host:port`` that drops every SYN: a listening socket with a backlog of 0 and one
    connection already waiting in it, so the kernel answers no further handshake."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield f"127.0.0.1:{listener.getsockname()[1]}"
