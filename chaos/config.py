"""Where the chaos run points, how big it is, and the environment its processes share.

notifier reads its settings from ``NOTIFIER_*`` variables once per process, when it is
first imported, so :meth:`ChaosConfig.apply_environment` runs before anything imports
``notifier``; the worker and beat subprocesses get the same variables plus the few the
chaos pipeline adds (:meth:`ChaosConfig.pipeline_environment`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RULES_FILE = Path(__file__).resolve().parent / "rules.toml"

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/notifier_chaos"
#: Its own Redis db number (bench uses 11 and 12, the tests claim empty ones from 15 down).
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/13"

#: How fast the pipeline notices and repairs damage: notifier's own settings, shorter
#: than their production defaults (5 min visibility timeout, 5 min queued/sending
#: timeouts, 30 s open circuit) so that a run ends in minutes. They change how long
#: recovery takes, not whether it happens.
RECOVERY_ENVIRONMENT = {
    "NOTIFIER_VISIBILITY_TIMEOUT": "20",
    "NOTIFIER_UNACKED_RESTORE_INTERVAL": "2",
    "NOTIFIER_RETRY_COUNTDOWN_MAX": "10",
    "NOTIFIER_RETRY_CAP": "30",
    "NOTIFIER_SWEEP_INTERVAL": "2",
    "NOTIFIER_QUEUED_TIMEOUT": "15",
    "NOTIFIER_SENDING_TIMEOUT": "20",
    "NOTIFIER_BREAKER_OPEN_SECONDS": "10",
}

#: What the chaos pipeline's workers and beat need besides the recovery timings: short
#: aggregation windows, and no per-recipient rate limits (they would only stretch the
#: run: a limited delivery is rescheduled, which is not what is being tested here).
PIPELINE_ENVIRONMENT = {
    "NOTIFIER_RULES_FILE": str(RULES_FILE),
    "NOTIFIER_RATE_LIMIT_PER_MINUTE": "0",
    "NOTIFIER_RATE_LIMIT_PER_HOUR": "0",
    "NOTIFIER_RATE_LIMIT_PER_DAY": "0",
    "NOTIFIER_ALLOW_PRIVATE_TARGETS": "1",
}


#: ``ChaosConfig.redis``: the machine's Redis, or the run's own with this persistence.
REDIS_MODES = ("shared", "aof", "aof-always", "none")


@dataclass(frozen=True)
class ChaosConfig:
    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    #: Notifications per traffic scenario.
    scale: int = 5000
    #: Payloads of the fuzz scenario (mostly bad, some good).
    fuzz_count: int = 10_000
    #: Messages of the ``fuzz_poison`` scenario (a quarter of them poison).
    fuzz_poison_count: int = 400
    #: Seconds the SMTP server is down in ``smtp_outage``.
    smtp_outage: float = 60.0
    #: Seconds Redis and Postgres stay down when restarted.
    redis_down: float = 3.0
    postgres_down: float = 10.0
    #: SIGKILLs per kill scenario, spread over the traffic.
    kills: int = 3
    #: Notifications per second the producer aims at.
    rate: float = 250.0
    #: Upper bound of the wait for the pipeline to drain after the faults end.
    drain_timeout: float = 300.0
    #: Seconds each e-mail takes at the SMTP server (so a kill lands mid-batch).
    smtp_delay: float = 0.005
    #: The ``hosts`` scenario: worker hosts (network namespaces), beats running at
    #: once, and seconds host 1 stays cut off.
    hosts: int = 3
    beats: int = 2
    host_cut: float = 30.0
    #: Hosts whose wall clock is off, "host2=+2s" each (libfaketime): what clock skew
    #: does to windows (opened by one host's clock, flushed by another's).
    host_clocks: tuple[str, ...] = ()
    #: More Postgres session settings for the hosts' sessions ("-c name=value ...").
    host_pg_options: str = ""
    #: Seed of the traffic mix and of the fuzz payloads.
    seed: int = 20261123
    #: Scenarios to run (names from ``chaos.scenarios.SCENARIOS``); empty: all.
    only: tuple[str, ...] = field(default_factory=tuple)
    #: The recovery timings to set; None: keep the environment's (the tests set theirs).
    recovery: dict[str, str] | None = field(
        default_factory=lambda: dict(RECOVERY_ENVIRONMENT)
    )
    results_dir: Path = RESULTS_DIR
    #: The broker's Redis: ``shared``, the machine's server (restarted with the machine's
    #: commands, keeping nothing); or a ``redis-server`` of the run's own on a free port
    #: and in a directory of its own (``chaos.faults.own_redis``), with ``aof`` (append
    #: only file, fsync every second), ``aof-always`` (fsync before every reply) or
    #: ``none`` (no persistence). Only an own server can be crashed (``redis_crash``).
    redis: str = "shared"
    #: Set once the run's own Redis is up: its port and directory.
    redis_port: int = 0
    redis_dir: str = ""
    #: Restart Redis and Postgres with the machine's commands (off: those scenarios skip;
    #: a Redis of the run's own is restarted anyway, it disturbs nobody).
    restart_services: bool = True
    #: Before a restart scenario, wait up to this many seconds for other users of the
    #: shared servers (tests, benchmarks) to finish; then restart anyway, and say so.
    restart_wait: float = 180.0

    @property
    def libpq_url(self) -> str:
        """The database URL as psycopg wants it, without SQLAlchemy's driver suffix."""
        scheme, rest = self.database_url.split("://", 1)
        return "postgresql://" + rest if scheme.startswith("postgres") else self.database_url

    @property
    def own_redis(self) -> bool:
        """Whether the broker is a Redis of this run's own (restartable, crashable)."""
        return self.redis != "shared"

    def apply_environment(self) -> None:
        """Point this process (and the processes it starts) at the chaos run's servers."""
        os.environ["NOTIFIER_DATABASE_URL"] = self.database_url
        os.environ["NOTIFIER_BROKER_URL"] = self.broker_url
        os.environ.update(self.recovery or {})

    def pipeline_environment(self, smtp_url: str) -> dict[str, str]:
        """What the workers and beat get on top of this process's environment."""
        pythonpath = os.pathsep.join(
            part for part in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if part
        )
        return {
            **PIPELINE_ENVIRONMENT,
            **(self.recovery or {}),
            "NOTIFIER_DATABASE_URL": self.database_url,
            "NOTIFIER_BROKER_URL": self.broker_url,
            "NOTIFIER_CHANNELS__EMAIL": smtp_url,
            "PYTHONPATH": pythonpath,
        }
