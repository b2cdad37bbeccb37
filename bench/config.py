"""Where the benchmark runs and how big it is, and the environment its processes share.

The notifier package reads its settings from ``NOTIFIER_*`` variables when it is first
imported, so :meth:`BenchConfig.apply_environment` must run before anything imports
``notifier``; the worker subprocesses inherit the same variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/notifier_bench"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/12"
#: Every worker of every scenario runs with this many pool processes, so that the naive
#: baseline, the empty task and the pipeline are compared on equal terms.
CONCURRENCY = 2


@dataclass(frozen=True)
class BenchConfig:
    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    #: The state Redis (breakers, rate limits, the empty task's counter); empty: the
    #: broker when it is Redis, else the default broker's Redis db.
    redis_url: str = ""
    #: Notifications per pipeline scenario (and in the backlog of the latency scenario).
    count: int = 50_000
    #: Notifications of the naive baseline; it is slow, and its rate is per second anyway.
    naive_count: int = 10_000
    #: Tasks of the empty-task scenario (a rate per second, so fewer suffice).
    empty_count: int = 20_000
    #: Producer threads of the extra unbuffered ``notify`` scenario (0 or 1: skip it).
    notify_threads: int = 4
    #: Critical notifications sent one at a time while the backlog drains.
    criticals: int = 200
    #: Seconds between two critical notifications.
    critical_spacing: float = 0.005
    #: E-mails per delivery scenario (naive, reused session, pooled worker).
    emails: int = 2000
    #: Webhook requests of the pooled delivery scenario.
    webhooks: int = 2000
    #: Requests of the naive webhook baseline (a new client each: slow, so fewer).
    naive_webhooks: int = 300
    #: Pool processes of the delivery worker (each keeps one SMTP session, one HTTP pool).
    delivery_concurrency: int = 4
    #: Deliveries per ``notifier.deliver`` task; 0: the notifier's setting
    #: (``NOTIFIER_DELIVERY_BATCH_SIZE``, default 100).
    delivery_batch_size: int = 0
    #: The SMTP server the e-mail scenarios send to: ``fast`` (a minimal asyncio server)
    #: or ``aiosmtpd``.
    smtp_server: str = "fast"
    #: Milliseconds the minimal SMTP server holds back each reply, as a distant server's
    #: round trip would (0: loopback as it is).
    smtp_reply_delay_ms: float = 0.0
    #: Processes of each delivery server, sharing one port (SO_REUSEPORT).
    server_processes: int = 1
    #: Attempts timed per case of ``email_failover`` (a fifth of them where each waits
    #: out the connect timeout; see bench.failover).
    failover_attempts: int = 100
    #: Provider events posted by the ``receipts`` step (bench.receipts).
    receipts: int = 2000
    #: Status callbacks sent by the ``callbacks`` step (bench.callbacks).
    callbacks: int = 2000
    #: Timed runs of each delivery scenario; the fastest counts (see bench.delivery).
    delivery_runs: int = 3
    #: Recipients of the simulated aggregation day part (``aggregation_efficiency``).
    aggregation_recipients: int = 300
    #: Hours the aggregation scenario simulates (on a simulated clock, not waited for).
    aggregation_hours: float = 6.0
    #: Notifications waiting in aggregation windows when beat starts (``flush_latency``).
    flush_waiting: int = 100_000
    #: Seconds over which those windows close, one after another.
    flush_spread: float = 30.0
    #: Seconds between beat's flushes (``NOTIFIER_FLUSH_INTERVAL``); 0: the notifier's
    #: setting (1 s by default).
    flush_interval: float = 0.0
    #: Processes of the ``notifier api`` the HTTP scenarios start (``NOTIFIER_API_WORKERS``).
    api_workers: int = 1
    #: Keep-alive connections of the HTTP load generator (each one request at a time).
    api_connections: int = 8
    #: Requests of ``api_single`` (one notification each); ``api_lists`` sends ``count``
    #: notifications in lists of ``api_list_size``.
    api_requests: int = 20_000
    api_list_size: int = 100
    #: Live inbox streams ``sse_fanout`` holds open on one API process.
    sse_streams: int = 1000
    #: Messages sent to the one recipient of ``sse_fanout``'s second case (each one
    #: fanned out to every stream).
    sse_one_recipient_messages: int = 3
    #: Seconds between two ``SELECT count(*)`` polls while waiting for rows.
    poll_interval: float = 0.05
    #: Seconds between two samples of the items done, for the throughput-over-time plot.
    sample_interval: float = 0.1
    #: Draw the PNG plots (needs matplotlib: ``pip install -e ".[bench]"``).
    plots: bool = True
    #: Profile the hot paths with py-spy on an extra, untimed pass (``bench.profile``).
    profile: bool = True
    #: Write the run's figures as the new baseline (``bench.baseline``) after the report.
    save_baseline: bool = False
    #: Scenarios to run (names from ``bench.__main__.STEP_NAMES``); empty means all.
    only: tuple[str, ...] = field(default_factory=tuple)

    @property
    def state_redis_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        return self.broker_url if self.broker_url.startswith("redis") else DEFAULT_BROKER_URL

    @property
    def libpq_url(self) -> str:
        """The database URL as psycopg wants it, without SQLAlchemy's driver suffix."""
        scheme, rest = self.database_url.split("://", 1)
        return "postgresql://" + rest if scheme.startswith("postgres") else self.database_url

    def timeout_for(self, count: int) -> float:
        """Seconds to wait for ``count`` rows before giving up on a scenario."""
        return 60.0 + count / 250

    def apply_environment(self) -> None:
        """Point this process (and the workers it starts) at the benchmark's servers."""
        os.environ["NOTIFIER_DATABASE_URL"] = self.database_url
        os.environ["NOTIFIER_BROKER_URL"] = self.broker_url
        os.environ["NOTIFIER_REDIS_URL"] = self.state_redis_url
        if self.flush_interval > 0:
            os.environ["NOTIFIER_FLUSH_INTERVAL"] = str(self.flush_interval)

    def worker_environment(self) -> dict[str, str]:
        """The environment of a worker subprocess: ours, plus the repository on the path."""
        env = dict(os.environ)
        env["NOTIFIER_DATABASE_URL"] = self.database_url
        env["NOTIFIER_BROKER_URL"] = self.broker_url
        env["NOTIFIER_REDIS_URL"] = self.state_redis_url
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if part
        )
        return env
