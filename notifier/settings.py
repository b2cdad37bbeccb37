"""The one settings object, read from ``NOTIFIER_*`` environment variables.

Every tunable of the pipeline lives here, documented beside its definition, so that
operators find them in one place and modules never grow constants of their own.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from typing import Annotated, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from notifier.masking import SECRET_OPTIONS as SECRET_OPTIONS
from notifier.masking import mask_secrets

PRIORITIES: tuple[str, ...] = ("critical", "high", "normal", "low")
"""Priorities from most to least urgent; each has its own queue ``notifier.<priority>``."""

#: Every channel, by the name a notification or a preference asks for (public contract):
#: its plugin is ``notifier/channels/<name>.py``, its queues ``notifier.deliver.<name>``.
CHANNEL_NAMES: frozenset[str] = frozenset(
    ("email", "webhook", "inapp", "slack", "apprise", "sms", "console")
)

#: Channel URLs used unless ``NOTIFIER_CHANNELS__<NAME>`` says otherwise.
DEFAULT_CHANNEL_URLS: dict[str, str] = {
    "email": "smtp://127.0.0.1:25?from=notifier%40localhost",
    "webhook": "webhook://",
    "slack": "slack://",
    "apprise": "apprise://",
    "inapp": "inapp://",
    "console": "console://",
}

_DATABASE_SCHEMES = ("postgresql", "postgresql+psycopg", "postgres")
_BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel", "amqp", "amqps", "pyamqp")
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+socket", "sentinel", "redis+cluster",
                  "rediss+cluster")
#: Kombu's default port of a Sentinel, used where a ``sentinel://`` part names none.
SENTINEL_PORT = 26379


class ConfigError(Exception):
    """A setting is wrong or what it points at does not answer.

    The message is one line that names the variable, ready to show to a person.
    """


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NOTIFIER_", env_nested_delimiter="__", extra="ignore",
        # The docstring under each field is its description (docs/configuration.md is
        # generated from them: ``make docs``).
        use_attribute_docstrings=True,
    )

    # --- Connections and ingest -----------------------------------------------------
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/notifier"
    """SQLAlchemy URL of the Postgres database (driver psycopg 3)."""
    broker_url: str = "redis://127.0.0.1:6379/0"
    """Celery broker URL (Redis or RabbitMQ). Redis behind Sentinel: every Sentinel as
    kombu writes it, ``sentinel://:password@host1:26379/0;sentinel://host2:26379/0``
    (the master's password and db in the first part), with
    ``NOTIFIER_BROKER_SENTINEL_MASTER`` (``docs/high-availability.md``)."""
    visibility_timeout: int = Field(300, ge=1)
    """Seconds before Redis hands an unacknowledged message to another worker. This is
    how long recovery from a killed worker takes; it must exceed the longest batch."""
    unacked_restore_interval: int = Field(10, ge=1)
    """Seconds between the broker's scans for messages whose visibility timeout passed."""
    broker_idle_poll_interval: float = Field(0.01, ge=0.001, le=1.0)
    """Redis broker, where Redis refuses client tracking (which wakes idle workers at
    once): seconds an idle worker waits before it looks at its queues again (our transport
    takes a message with a script, which cannot block). The latency it may add, against
    one ``EXISTS`` per interval per idle worker (docs/reliability.md)."""
    dedup_window: int = Field(86400, ge=0)
    """Seconds an idempotency key is remembered; a repeat within it is dropped."""
    ingest_batch_size: int = Field(500, ge=1)
    """Most notifications written to Postgres in one ingest transaction."""
    ingest_batch_min: int = Field(50, ge=1)
    """The smallest ingest batch: used at an empty queue (see ``adaptive_high_water``)."""
    ingest_flush_interval: float = Field(0.05, gt=0)
    """Seconds a partial ingest batch waits for more messages before it is written."""
    critical_lanes: int = Field(2, ge=0, le=8)
    """Pool processes a prefork worker runs beyond ``-c`` for critical ingest batches
    (the critical lane, ``notifier/worker/lane.py``): a critical batch starts on a free
    one at once, never behind a bulk batch. With two, criticals arriving while one lane
    batch is being written start at once instead of gathering behind it (under a
    50,000 backlog on 2 cores, in alternating runs, critical p99 fell from 62-93 ms to
    48-51 ms, p50 from 19-24 to 12-16 ms). Each costs a pool process (about 50-70 MB)
    and its Postgres connection. 0: no lane; critical batches go first among the
    batches waiting for one of the ``-c`` processes."""
    worker_prefetch_multiplier: int | None = Field(None, ge=1)
    """Messages a worker process may hold unacknowledged; ingest batches form from them.
    Unset: four batches' worth (4 x ``ingest_batch_size``), so that the batches in
    flight and those waiting never reach the limit and a critical message can always be
    fetched."""
    client_chunk_size: int = Field(500, ge=1)
    """Notifications per broker message in ``notify_many`` and the buffered producer."""
    buffer_max_delay: float = Field(0.05, gt=0)
    """Seconds the buffered producer holds a partial message before publishing it."""
    default_channels: list[str] = ["inapp"]
    """Channels used when neither the notification nor the recipient names any (a JSON
    list: ``NOTIFIER_DEFAULT_CHANNELS='["inapp", "email"]'``)."""
    ingest_commit_attempts: int = Field(3, ge=1)
    """Attempts (with backoff) to commit an ingest batch before its messages go back
    to the queue, e.g. while Postgres restarts."""
    max_data_bytes: int = Field(65536, ge=1)
    """Largest accepted ``data`` object, in bytes of JSON."""
    database_pool_size: int = Field(4, ge=1)
    """Most Postgres connections one process opens (a worker's pool process, its flush
    loop, a CLI command), kept open once opened. A prefork pool process uses at most
    two at once (a delivery batch's recorder and the in-app or webhook channel's
    session); ``-P threads`` or gevent needs two per concurrent task. At the limit a
    task waits for a free connection (30 s, then its batch fails and is retried).
    The budget of a fleet: ``docs/scaling.md``."""
    database_idle_timeout: float = Field(5.0, ge=0, le=3600)
    """Seconds an ingest, flush or sweep transaction may sit idle between two
    statements before Postgres ends its session (``idle_in_transaction_session_timeout``,
    set for each of these transactions alone: ``SET LOCAL``, so a pooler hands nothing
    on). None of them waits on purpose between statements; a worker whose host was cut
    off mid-transaction would otherwise keep its row locks (the aggregation windows it
    was adding to) until the server's TCP keepalives notice, stalling every other
    host's ingest of the same groups (``docs/scaling.md``, many hosts). 0: the
    server's own setting. A delivery batch's claim is never bounded (``delivery.Claim``)."""
    database_lock_timeout: float = Field(10.0, ge=0, le=3600)
    """Seconds a statement of those transactions waits for a row lock (``lock_timeout``,
    ``SET LOCAL``) before its transaction fails and is retried (an ingest batch goes
    back to its queue, no failure counted): bounds a wait the idle timeout cannot, on a
    holder that is not idle (blocked sending to a peer that is gone), and lets the
    waiter's own locks go. Above ``database_idle_timeout``, so a waiter outlasts an idle
    holder rather than failing first. 0: the server's own setting."""
    database_prepared_statements: bool = False
    """Let psycopg prepare statements a connection runs often (server-side, from their
    fifth run). Off: it saved no measurable CPU here (a batch is a few large statements:
    38 us of Postgres CPU per ingested notification either way), and a pooler in
    transaction mode that does not carry prepared statements between server
    connections breaks it (PgBouncer before 1.21, as Debian 12's 1.18, or later without
    ``max_prepared_statements``: ``prepared statement "_pg3_0" already exists``). On is
    safe straight to Postgres or behind PgBouncer 1.21+ with ``max_prepared_statements``."""

    # --- Limits ---------------------------------------------------------------------
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    """Largest broker message (bytes of its body, before decoding). A bigger one is
    dead-lettered undecoded (a prefix, its size and SHA-256) and acknowledged."""
    max_message_notifications: int = Field(1000, ge=1)
    """Most notifications in one message; a message of more is dead-lettered whole."""
    max_url_chars: int = Field(2048, ge=16)
    """Longest URL address (``recipient.addresses`` of webhook, Slack, Apprise), in
    characters. A URL that does not parse (bad port, no host) is refused at ingest."""
    max_email_chars: int = Field(320, ge=6)
    """Longest e-mail address, in characters (RFC 5321 allows 320)."""
    max_addresses: int = Field(16, ge=1)
    """Most entries in a recipient's ``addresses``."""
    max_reason_chars: int = Field(1000, ge=100)
    """Longest rejection reason kept in a dead letter or a log line; quoted values in a
    reason are cut to 80 characters, so a reason never repeats a huge value."""
    dead_letter_payload_bytes: int = Field(65536, ge=1024)
    """A dead letter keeps at most this many bytes of its payload's JSON (plus the full
    size and SHA-256); a truncated one cannot be replayed."""
    message_max_failures: int = Field(5, ge=1)
    """A message whose batch failed (not because Postgres was away) or killed its pool
    process this many times is dead-lettered instead of being tried again."""
    message_failures_ttl: int = Field(86400, ge=60)
    """Seconds the failure count of a message is kept (in the state Redis)."""
    worker_held_bytes: int = Field(16 * 1024 * 1024, ge=1024 * 1024)
    """Bytes of messages a worker may hold (waiting or in its pool) before it stops
    fetching from the bulk queues; at twice this it stops fetching critical ones too.
    A held message costs about three times its size in memory (the broker's copy,
    the body, the decoded objects): with 60 messages of 7.8 MB queued, a ``-c 2``
    worker peaked at 524 MiB RSS with 16 MiB here, 755 MiB with 64 MiB, 1,088 MiB
    without a byte budget (it grows with the backlog)."""

    # --- Retention (``notifier/pipeline/retention.py``, ``docs/retention.md``) ----------
    retention_interval: float = Field(3600, gt=0)
    """Seconds between beat's retention runs (``notifier.purge_expired``, every table)."""
    retention_notifications_days: float = Field(30, ge=0)
    """Days a notification is kept from its last change, once delivered, digested,
    suppressed, cancelled or failed (or dispatched with no delivery); 0 keeps it
    forever. Nothing unfinished is ever purged, and a row is kept while another row
    refers to it (a notification while it has deliveries, a digest while it has member
    notifications or deliveries), so deliveries <= notifications <= digests must hold
    (0 counts as forever; checked at start)."""
    retention_deliveries_days: float = Field(30, ge=0)
    """Days a delivery is kept once finished (sent or past it, dead, cancelled,
    suppressed; from its last change), and only when no delivery of the same
    notification or digest is still on its way; 0 keeps it forever. At most
    ``retention_notifications_days``."""
    retention_digests_days: float = Field(30, ge=0)
    """Days a digest is kept from its creation, once it has no delivery and no member
    notification left; 0 keeps it forever. At least ``retention_notifications_days``."""
    retention_dead_letters_days: float = Field(90, ge=0)
    """Dead letters, from when they were written, replayed or not. Their delivery may be
    gone before them; replaying such a one is skipped and says so."""
    retention_inbox_read_days: float = Field(90, ge=0)
    """In-app inbox messages, from when the recipient read them."""
    retention_inbox_unread_days: float = Field(0, ge=0)
    """Unread inbox messages, from their delivery: kept forever (0) unless set, and then
    at least as long as read ones (they are the recipient's, not ours)."""
    retention_windows_hours: float = Field(1, ge=0)
    """Aggregation windows this many hours past their due time that hold no waiting
    notification (the flush deletes the windows it turns into digests; this clears
    what it leaves, e.g. windows whose members were all cancelled)."""
    retention_batch_size: int = Field(1000, ge=1, le=100_000)
    """Rows deleted per transaction (per table); each batch is its own short transaction
    that skips rows locked by the pipeline."""
    retention_batch_pause: float = Field(0.1, ge=0)
    """Seconds to pause between two full batches, leaving Postgres to the pipeline."""
    retention_run_seconds: float = Field(120, gt=0)
    """Most seconds one retention run spends; what is left waits for the next run. At
    most half ``visibility_timeout`` is used, so Redis never hands a run that is still
    going to a second worker."""
    retention_lock_timeout: float = Field(1.0, gt=0)
    """Seconds a purge statement waits for a lock before giving up on that table until
    the next run (it never queues behind the pipeline's writes)."""

    # --- Logging --------------------------------------------------------------------
    log_level: str = "INFO"
    """Logging level of the worker and the CLI."""
    log_format: Literal["text", "json"] = "text"
    """``text`` (one readable line) or ``json`` (one object per line, for a log store)."""

    # --- Aggregation ----------------------------------------------------------------
    rules_file: str | None = None
    """A TOML file of aggregation rules per notification type, over the built-in ones
    (``docs/aggregation.md``); a mistake in it stops the worker and beat at start."""
    flush_interval: float = Field(1.0, gt=0)
    """Seconds between beat's flush ticks (``notifier.flush_windows``). With the flush
    loop (``NOTIFIER_FLUSH_LOOP``) a tick only keeps the workers' loops armed, for five
    ticks, so a stopped beat stops the flush; without it each tick flushes what is due."""
    flush_loop: bool = True
    """Each worker that consumes ``notifier.deliver.critical`` (the queue of beat's
    ticks) runs one flush loop, a process of its own beside the pool: it sleeps until
    the next window is due and flushes it then, instead of at beat's next tick. Loops of
    several workers share the due windows (``SKIP LOCKED``). Off: beat's tick flushes."""
    flush_loop_poll: float = Field(0.2, gt=0, le=60)
    """How long an idle flush loop sleeps before looking again for the next due window
    (seconds; it never sleeps past one it knows of). A loop that keeps finding nothing
    doubles it up to ``NOTIFIER_FLUSH_INTERVAL``, woken at once by ingest's ``NOTIFY``
    when a window falls due early (its group reached the rule's maximum) or opens due
    sooner. Behind a pooler (PgBouncer), where ``LISTEN`` cannot work, it stays at this:
    how late such a window can be flushed there."""
    flush_batch_size: int = Field(100, ge=1)
    """Windows flushed per transaction; a flush takes chunk after chunk while they come
    back full. Small chunks commit (and publish) the first windows of a burst sooner:
    with beat's one-second flush at 100,000 waiting, p99 close-to-queued was 0.9 s with
    100 and 1.3 s with 500 (``make bench``)."""

    # --- Metrics --------------------------------------------------------------------
    metrics_dir: str | None = None
    """Where worker processes keep their Prometheus values (multiprocess mode); one per
    host is fine, several workers may share it. Default: ``/tmp/notifier-metrics-<uid>``."""
    metrics_port: int = Field(0, ge=0, le=65535)
    """A worker serves /metrics on this port (0: it does not; `notifier metrics` can)."""
    metrics_address: str = "127.0.0.1"
    """The address /metrics binds to: loopback, unless a scraper elsewhere needs it."""

    # --- Delivery -------------------------------------------------------------------
    channels: dict[str, str] = {}
    """Channel name -> the URL that configures it (``NOTIFIER_CHANNELS__EMAIL=smtp://...``),
    or for ``email`` and ``sms`` a JSON list of up to 5 URLs, its providers in order of
    preference (``'["smtps://primary...", "smtp://backup..."]'``), failed over between
    within an attempt. Entries given here replace the defaults one by one. Options in the
    query string (``?retry_max_attempts=3``) override the retry settings below for that
    channel.
    Each channel's URL and options: ``docs/channels.md``."""
    redis_url: str | None = None
    """Redis for the circuit breakers and rate limits (the state Redis); default: the
    broker, if Redis (through its Sentinels, if it has them). Also
    ``sentinel://host1:26379/0;sentinel://host2:26379/0`` (with
    ``NOTIFIER_REDIS_SENTINEL_MASTER``) or a Redis Cluster,
    ``redis+cluster://:password@host1:7000,host2:7000`` (``rediss+cluster://`` for TLS;
    any reachable nodes, the rest are discovered; database 0 only)."""
    delivery_batch_size: int = Field(100, ge=1)
    """Deliveries of one channel carried by one delivery task (one connection)."""
    delivery_batch_min: int = Field(10, ge=1)
    """The fewest deliveries per task: used when the channel's queue is empty, so a
    trickle spreads over the worker processes instead of queuing behind one."""
    adaptive_high_water: float = Field(10.0, gt=0)
    """Batch sizes grow with the backlog from their minimum (empty queue) to their
    maximum (``*_batch_size``), reached when this many maximum batches are waiting."""
    adaptive_refresh: float = Field(1.0, gt=0)
    """Seconds between two reads of a queue's depth for choosing batch sizes."""
    delivery_batch_max_seconds: float = Field(20.0, gt=0)
    """A delivery task sending longer than this returns its unsent deliveries to the
    queue (as it does when its worker shuts down), so a slow provider cannot hold a
    worker's warm shutdown past an orchestrator's grace period."""
    delivery_claim_wait: float = Field(2.0, gt=0, le=60)
    """Seconds a delivery batch, holding its claim's connection (``delivery.Claim``),
    waits for its second connection to claim its deliveries. Behind PgBouncer with
    fewer server connections than twice the processes delivering at once, every batch
    could hold its claim's connection while waiting for a second one until PgBouncer's
    ``query_wait_timeout``; past this wait a batch gives its claim back (holding
    nothing, having claimed nothing) and tries again after a random pause
    (``docs/scaling.md``, sizing PgBouncer). Straight to Postgres no batch waits for a
    connection: only a claim slower than this (an overloaded server) is tried again."""
    delivery_claim_attempts: int = Field(3, ge=1, le=20)
    """Tries of a delivery batch to claim within ``delivery_claim_wait``; after the last
    its deliveries are queued again a few seconds later, no attempt counted."""

    # --- Egress ---------------------------------------------------------------------
    allow_private_targets: bool = False
    """Let webhook, Slack, SMS and Apprise targets resolve to private, loopback,
    link-local or CGNAT addresses (``docs/egress.md``); a channel URL's
    ``allow_private=yes`` does it for that channel alone."""
    http_max_response_bytes: int = Field(65536, ge=1024)
    """Most bytes of an HTTP answer's body read by the webhook, Slack and SMS channels;
    the rest is never read (errors are parsed from this prefix)."""
    apprise_allowed_schemes: Annotated[frozenset[str], NoDecode] = frozenset()
    """Apprise schemes allowed although the egress guard cannot check where they
    connect (desktop and OS notifiers, syslog, MQTT, XMPP, IRC, ...), comma-separated:
    ``NOTIFIER_APPRISE_ALLOWED_SCHEMES=dbus,syslog``. Every other scheme Apprise knows
    goes through the guard (``notifier.channels.egress``); these bypass it."""

    # --- Redis Sentinel and Cluster (``docs/high-availability.md``) ------------------
    broker_sentinel_master: str | None = None
    """The master name the Sentinels of a ``sentinel://`` ``NOTIFIER_BROKER_URL`` watch
    (their ``sentinel monitor <name> ...``); required with such a URL."""
    redis_sentinel_master: str | None = None
    """The master name for a ``sentinel://`` ``NOTIFIER_REDIS_URL``; default:
    ``NOTIFIER_BROKER_SENTINEL_MASTER`` (the broker's Sentinels watching one master)."""
    sentinel_password: SecretStr | None = None
    """Password of the Sentinels themselves (their ``requirepass``), for the broker's
    and the state Redis's; unset when they have none. The master's password is in the
    URL."""

    # --- Retries and circuit breakers -----------------------------------------------
    retry_base: float = Field(2.0, gt=0)
    """Retries: the n-th attempt waits between half and all of ``base * factor**(n-1)``
    seconds (jitter), at most ``retry_cap``. A channel URL may override every
    ``retry_*`` setting for its channel (``?retry_max_attempts=3``)."""
    retry_factor: float = Field(2.0, ge=1)
    """Each retry waits this many times longer than the one before (see ``retry_base``)."""
    retry_cap: float = Field(600.0, gt=0)
    """Longest wait between two attempts, in seconds."""
    retry_max_attempts: int = Field(8, ge=1)
    """Attempts after which a delivery that keeps failing is dead (a dead letter)."""
    retry_countdown_max: float = Field(30.0, ge=0)
    """Waits up to this many seconds ride on a Celery countdown; longer ones are kept in
    Postgres (``next_attempt_at``) for the sweeper. Must stay below the visibility
    timeout, or Redis would hand the waiting task to a second worker."""
    breaker_failure_threshold: int = Field(5, ge=1)
    """Circuit breaker: this many provider failures within ``breaker_window`` seconds
    open a channel's circuit for ``breaker_open_seconds``; then one probe batch.
    A bad address does not count."""
    breaker_window: float = Field(60.0, gt=0)
    """Seconds over which a channel's provider failures are counted."""
    breaker_open_seconds: float = Field(30.0, gt=0)
    """Seconds a channel's circuit stays open (its deliveries rescheduled, no attempt
    counted) before one worker sends a probe batch, whose success closes it."""

    # --- Recipient endpoints --------------------------------------------------------
    endpoint_breaker_threshold: int = Field(5, ge=1)
    """Endpoints recipients control (a webhook host: scheme, host and port; a Slack hook)
    have circuits of their own: this many failures that may pass later (5xx,
    429, timeouts, refused connections) within ``endpoint_breaker_window`` seconds hold
    that endpoint's deliveries (rescheduled, no attempt counted) for
    ``endpoint_breaker_open_seconds``, then one delivery probes it. Neither the
    channel's circuit nor other recipients' deliveries are affected. The circuits'
    Redis keys expire after window + open seconds + ``sending_timeout`` without use
    (``docs/delivery-failures.md``)."""
    endpoint_breaker_window: float = Field(60.0, gt=0)
    """Seconds over which an endpoint's failures are counted."""
    endpoint_breaker_open_seconds: float = Field(60.0, gt=0)
    """Seconds an endpoint's deliveries are held before one delivery probes it."""

    # --- Status callbacks (``docs/callbacks.md``) ------------------------------------
    callback_sweep_interval: float = Field(1.0, gt=0)
    """Seconds between beat's callback sweeps, which publish the status callbacks the
    deliveries' status changes wrote (and find lost ones): at most this, plus the
    queue's wait, between a status and its POST. An idle sweep is one query on an
    empty partial index."""
    callback_timeout: float = Field(10.0, gt=0, le=300)
    """Seconds one callback POST may take (lookup, connect, TLS, request, answer)."""
    callback_max_attempts: int = Field(8, ge=1)
    """Attempts after which a callback that keeps failing (5xx, 429, timeouts) is parked
    (``dead``, counted in ``notifier_callbacks_total``); its waits are the delivery
    retries' (``NOTIFIER_RETRY_BASE``, ``_FACTOR``, ``_CAP``). A refusal (4xx, a
    forbidden address) parks it at once. Never affects the notification's status."""
    callback_batch_size: int = Field(100, ge=1, le=10_000)
    """Callbacks carried by one ``notifier.callbacks`` task (POSTed over the pool)."""

    # --- Rate limits and the sweeper ------------------------------------------------
    rate_limit_per_minute: int = Field(60, ge=0)
    """Deliveries per recipient per minute (0: no limit), a fixed window in Redis. A
    limited delivery is rescheduled to the window's reset, never dropped. Critical
    notifications count but are never held by a recipient's limit."""
    rate_limit_per_hour: int = Field(600, ge=0)
    """Deliveries per recipient per hour (0: no limit)."""
    rate_limit_per_day: int = Field(5000, ge=0)
    """Deliveries per recipient per day (0: no limit)."""
    rate_limit_global_per_minute: int = Field(0, ge=0)
    """Deliveries per minute over all recipients (0: no limit)."""
    sweep_interval: float = Field(5.0, gt=0)
    """Seconds between beat's delivery sweeps (lost tasks, due retries)."""
    queued_timeout: float = Field(300.0, gt=0)
    """A delivery queued this long past its due time without being started was lost by
    the broker and is published again (sending stays idempotent on its id)."""
    sending_timeout: float = Field(300.0, gt=0)
    """The fallback for claims whose holder cannot be seen: a delivery claimed without a
    claim lock (by a worker older than migration 0010, during an upgrade) this long ago
    and still not recorded is sent again. Every other claim is freed by its worker's
    death itself (the sweep resumes it within ``NOTIFIER_SWEEP_INTERVAL``) and is never
    taken from a live worker however slow. Must exceed the longest batch. Also how long
    a circuit's probe may take before another is let through."""

    # --- Health (``notifier health``) ------------------------------------------------
    heartbeat_interval: float = Field(5.0, gt=0)
    """Seconds between beat's heartbeats (``notifier.heartbeat``, on the critical
    delivery queue): the time beat sent the last one and the time a worker ran it are
    kept in Redis for the beat check."""
    health_beat_max_age: float = Field(30.0, gt=0)
    """The beat check fails when beat's last tick, or the last run of its heartbeat by a
    worker, is older than this (seconds). A heartbeat that waited longer expires. Must
    be above ``heartbeat_interval`` (checked at start)."""
    health_max_queue_depth: int = Field(10_000, ge=0)
    """The queues check fails when any one queue holds more messages than this."""
    health_max_pending_age: float = Field(120.0, gt=0)
    """The pending check fails when work that should be moving has waited longer than
    this (seconds): a delivery due and not sent, an aggregation window past its due
    time, a pending notification in no window. Notifications waiting in their window
    and deliveries held for quiet hours or a retry's backoff do not count. Keep it
    below ``queued_timeout``: republishing a lost task restarts its delivery's clock."""
    health_min_workers: int = Field(1, ge=0)
    """The workers check fails when fewer workers than this answer its ping."""
    health_ping_timeout: float = Field(1.0, gt=0)
    """Seconds the workers check collects answers to its ping (it always waits this long)."""
    health_timeout: float = Field(2.0, gt=0)
    """Seconds each check may wait to connect and for a query."""

    # --- Secrets --------------------------------------------------------------------
    log_max_line_bytes: int = Field(8192, ge=512)
    """Longest log line in bytes (text or JSON, tracebacks included); longer lines are
    cut and say so. Secrets are hidden before the cut (``notifier.masking``)."""
    webhook_secret_overlap: float = Field(86400.0, ge=0)
    """Seconds `notifier webhooks secret rotate` keeps signing with the previous secret
    too (``--overlap`` overrides it), so a receiver can switch without losing messages
    (``docs/secrets.md``)."""

    # --- Inbox for browsers (``docs/inbox.md``) -----------------------------------------
    inbox_listen_url: str | None = None
    """Postgres URL of the live inbox feed's ``LISTEN`` connection (one per API process);
    default: ``NOTIFIER_DATABASE_URL``. It must reach Postgres itself or a pooler in
    session mode: a pooler in transaction mode (PgBouncer's usual) drops ``LISTEN``."""
    inbox_feed_queue_size: int = Field(100, ge=1, le=10_000)
    """Messages waiting for one live inbox stream at most; a stream further behind is
    emptied and catches up from Postgres instead (memory stays bounded, nothing is lost)."""
    api_token_secret: SecretStr | None = None
    """Key that signs recipient tokens (``notifier.pipeline.recipient_tokens``): what a
    browser shows to read one recipient's inbox. At least 32 characters of randomness,
    e.g. ``python -c 'import secrets; print(secrets.token_urlsafe(32))'``; unset, no token
    can be minted or accepted. To rotate it: move it to
    ``NOTIFIER_API_TOKEN_PREVIOUS_SECRET``, set a new one, and drop the previous one once
    ``NOTIFIER_API_TOKEN_MAX_TTL`` has passed (``docs/inbox.md``)."""
    api_token_previous_secret: SecretStr | None = None
    """The key before ``NOTIFIER_API_TOKEN_SECRET``: tokens it signed are still accepted
    (never minted) until they expire, so a rotation logs no browser out."""
    api_token_ttl: float = Field(3600.0, gt=0)
    """Seconds a recipient token is valid when its minter asks for no other lifetime."""
    api_token_max_ttl: float = Field(86400.0, gt=0)
    """Longest lifetime a recipient token may be minted with (seconds)."""

    # --- HTTP API (``notifier api``, ``docs/api.md``) ---------------------------------
    api_address: str = "127.0.0.1"
    """The address ``notifier api`` listens on: loopback, unless a proxy or other hosts
    must reach it (``0.0.0.0`` in a container)."""
    api_port: int = Field(8000, ge=1, le=65535)
    """The port ``notifier api`` listens on."""
    api_workers: int = Field(1, ge=1, le=64)
    """API processes (uvicorn workers) sharing the port; each holds its own database
    pool (``database_pool_size``) and broker connections."""
    api_url: str | None = None
    """Where the API answers (e.g. ``http://127.0.0.1:8000``), for ``notifier health``'s
    api check; unset: the health check leaves the API out."""
    api_rate_limit_per_minute: int = Field(60_000, ge=0)
    """Requests one API key may make per minute (a fixed window in the state Redis,
    shared by every API process); a key's own limit (``notifier api-keys create
    --rate-limit``) overrides it; 0: unlimited. Past it: 429 with ``Retry-After``."""
    api_key_sync_interval: float = Field(0.05, ge=0, le=5)
    """Seconds an API process may answer a request from what it last read of the keys in
    the state Redis (their rate windows' counts, the keys' generation) instead of
    waiting for a read of its own: one script call per this interval carries a busy
    process's requests, not one per request (``docs/api.md``). The bounds it sets: a
    revoked key is refused by every process at most this long after the revoke, and a
    key's limit may be passed by what the other processes admit within it. 0: every
    request waits for a read begun after it arrived (exact, and a call per few requests)."""
    api_cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    """Origins whose browser pages may call the API (CORS), comma-separated, each
    ``scheme://host[:port]`` with no path: ``https://app.example.com,http://localhost:3000``;
    ``*`` (alone) allows any. Empty: no CORS headers, so only same-origin pages and
    backends call it. Credentials (cookies) are never allowed: tokens travel in the
    ``Authorization`` header or ``?token=`` (``docs/api.md``)."""
    api_shutdown_timeout: int = Field(5, ge=0, le=300)
    """Seconds open requests get to finish when ``notifier api`` stops; live inbox streams
    still open then are ended (browsers reconnect to another process with their
    ``Last-Event-ID`` and lose nothing)."""
    api_max_streams: int = Field(2000, ge=1, le=100_000)
    """Live inbox streams (``GET …/inbox/stream``) one API process serves at most; past
    it: 503 with ``Retry-After`` (a browser's ``EventSource`` retries by itself). Each
    holds a socket and a queue of ``NOTIFIER_INBOX_FEED_QUEUE_SIZE`` messages."""
    api_max_streams_per_recipient: int = Field(20, ge=1, le=10_000)
    """Live inbox streams of one recipient one API process serves at most (tabs and
    devices); past it: 429, so one leaked token cannot take every stream of a process."""
    api_stream_heartbeat: float = Field(15.0, ge=0.05, le=300)
    """Seconds a live inbox stream may stay silent: after that it sends a comment line,
    so proxies and load balancers do not close it as idle (theirs is often 60 s)."""
    api_stream_max_seconds: float = Field(3600.0, ge=1, le=86400)
    """Seconds a live inbox stream lasts at most; then it ends and the browser
    reconnects with its ``Last-Event-ID``, losing nothing: its credentials are checked
    again (an expired token no longer reads) and streams spread over the processes."""
    api_demo: bool = False
    """Serve the inbox demo page ``/inbox/demo`` (``docs/api.md``). For development only:
    it mints a recipient token for anyone who asks, so anyone reaching the API reads any
    inbox. Needs ``NOTIFIER_API_TOKEN_SECRET``; off, the page is 404."""

    # --- Receipts and suppressions (``docs/receipts.md``) ----------------------------
    events_public_url: str | None = None
    """The API's address as providers call it (``https://notifier.example.com``, no
    path), which differs from its own behind a proxy: Twilio signs the whole URL it
    calls, so ``X-Twilio-Signature`` is checked over this plus the request's path and
    query. Set, the SMS channel asks Twilio for a status callback on every message
    (``StatusCallback``: this, ``/v1/events/twilio`` and the delivery id); unset, it
    asks for none and ``POST /v1/events/twilio`` answers 404."""
    mailgun_webhook_signing_key: SecretStr | None = None
    """Mailgun's HTTP webhook signing key (its control panel, Webhooks): each event's
    ``signature`` is an HMAC-SHA256 of its timestamp and token with it. Unset:
    ``POST /v1/events/mailgun`` answers 404."""
    events_max_age: float = Field(300.0, gt=0, le=86400)
    """Seconds a signed provider event's timestamp may be off from now (older, or ahead)
    before it is refused as stale; its token is remembered as long (in the state
    Redis), so a replay within it is refused too."""
    suppression_soft_bounces: int = Field(3, ge=1, le=1000)
    """Soft bounces (temporary failures) of one address on one channel, each from a
    different delivery, within ``suppression_soft_bounce_window`` that suppress it (a
    hard bounce or a complaint suppresses at once)."""
    suppression_soft_bounce_window: float = Field(7.0, gt=0, le=365)
    """Days over which soft bounces count towards ``suppression_soft_bounces``."""

    # --- RabbitMQ broker (``notifier/broker_topology.py``) ---------------------------
    broker_queue_type: Literal["quorum", "classic"] = "quorum"
    """On RabbitMQ: ``quorum`` queues (replicated, on disk before a publish is confirmed,
    a delivery limit, countdowns through Celery's native delayed delivery on topic
    exchanges) or ``classic`` ones on direct exchanges, as before. A queue keeps the
    type it was declared with: switching an existing virtual host means draining and
    deleting our queues and exchanges first (``docs/operating.md``). Ignored on Redis."""
    broker_delivery_limit: int = Field(100, ge=1)
    """On RabbitMQ quorum queues: deliveries of one message (``x-delivery-limit``) after
    which RabbitMQ moves it to ``notifier.dead-lettered`` instead of handing it out
    again, so a message that kills its worker cannot loop. Well above
    ``message_max_failures``: ingest counts failures itself and dead-letters a message
    into Postgres long before this, but a batch returned while Postgres is away
    (every ~1.5 s, see ``ingest_commit_attempts``) also spends a delivery. Changing it
    means re-declaring the queues."""
    broker_confirm_publish: bool = True
    """On RabbitMQ: publisher confirms for every publish (``notify``, the producers,
    workers' delivery tasks): a publish returns once the broker has the message (on
    disk, for quorum queues), and raises if it refused or lost it. One round trip per
    publish."""
    broker_confirm_timeout: float = Field(10.0, gt=0)
    """Seconds a publish waits for RabbitMQ's confirm before it raises."""

    @model_validator(mode="after")
    def _beat_max_age_above_heartbeat_interval(self) -> Settings:
        if self.health_beat_max_age <= self.heartbeat_interval:
            raise ValueError(
                f"health_beat_max_age: must be above NOTIFIER_HEARTBEAT_INTERVAL"
                f" ({self.heartbeat_interval:g}), got {self.health_beat_max_age:g}"
            )
        return self

    @field_validator("inbox_listen_url")
    @classmethod
    def _listen_url_is_postgres(cls, url: str | None) -> str | None:
        return None if url is None else cls._database_url_is_postgres(url)

    @field_validator("events_public_url")
    @classmethod
    def _public_url_is_a_base(cls, url: str | None) -> str | None:
        if url is None or not url.strip():
            return None
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ValueError("expected the API's public base URL, https://host[:port][/path]")
        return url.strip().rstrip("/")

    @field_validator("api_token_secret", "api_token_previous_secret")
    @classmethod
    def _token_secret_is_long(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and len(secret.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (a random key, not a password)")
        return secret

    @model_validator(mode="after")
    def _token_ttl_within_max(self) -> Settings:
        if self.api_token_ttl > self.api_token_max_ttl:
            raise ValueError(
                f"api_token_ttl: at most NOTIFIER_API_TOKEN_MAX_TTL"
                f" ({self.api_token_max_ttl:g}), got {self.api_token_ttl:g}"
            )
        return self

    @model_validator(mode="after")
    def _demo_has_a_token_secret(self) -> Settings:
        if self.api_demo and self.api_token_secret is None:
            raise ValueError("api_demo: the demo page mints recipient tokens: set"
                             " NOTIFIER_API_TOKEN_SECRET too")
        return self

    @field_validator("database_url")
    @classmethod
    def _database_url_is_postgres(cls, url: str) -> str:
        scheme = _scheme_among(url, _DATABASE_SCHEMES, "a postgresql+psycopg://")
        # One driver everywhere: psycopg 3, whatever spelling the user chose.
        return "postgresql+psycopg" + url[len(scheme):]

    @field_validator("broker_url")
    @classmethod
    def _broker_url_is_supported(cls, url: str) -> str:
        if _scheme_among(url, _BROKER_SCHEMES, "a redis://, sentinel:// or amqp://") == "sentinel":
            parse_sentinel_url(url)
        return url

    @field_validator("apprise_allowed_schemes", mode="before")
    @classmethod
    def _schemes_from_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(s.strip().lower() for s in value.split(",") if s.strip())
        return value

    @field_validator("api_cors_origins", mode="before")
    @classmethod
    def _origins_from_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("api_cors_origins")
    @classmethod
    def _origins_are_origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        if "*" in origins and len(origins) > 1:
            raise ValueError("* allows every origin: give it alone or not at all")
        return tuple(origin if origin == "*" else _origin(origin) for origin in origins)

    @field_validator("api_url")
    @classmethod
    def _api_url_is_http(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {mask_secrets(url)!r}")
        return url

    @field_validator("redis_url")
    @classmethod
    def _redis_url_is_redis(cls, url: str | None) -> str | None:
        if url is None:
            return url
        scheme = _scheme_among(url, _REDIS_SCHEMES, "a redis://, rediss://, unix://,"
                               " redis+socket://, sentinel:// or redis+cluster://")
        if scheme == "sentinel":
            parse_sentinel_url(url)
        elif scheme.endswith("+cluster"):
            parse_cluster_url(url)
        return url

    @model_validator(mode="after")
    def _sentinels_have_a_master_name(self) -> Settings:
        if self.is_sentinel_broker and not self.broker_sentinel_master:
            raise ValueError("broker_sentinel_master: required with a sentinel://"
                             " NOTIFIER_BROKER_URL (the name the Sentinels monitor)")
        if (self.redis_url or "").startswith("sentinel:") and not self.state_sentinel_master:
            raise ValueError("redis_sentinel_master: required with a sentinel://"
                             " NOTIFIER_REDIS_URL (the name the Sentinels monitor)")
        return self

    @field_validator("channels")
    @classmethod
    def _channels_over_defaults(cls, channels: dict[str, str]) -> dict[str, str]:
        return {**DEFAULT_CHANNEL_URLS, **{k.lower(): v for k, v in channels.items()}}

    @model_validator(mode="after")
    def _retention_outlasts_what_refers_to_it(self) -> Settings:
        """A notification is kept while it has deliveries, a digest while it has members:
        a shorter setting would only be rescanned in vain by every purge batch."""
        chain = [("deliveries", self.retention_deliveries_days),
                 ("notifications", self.retention_notifications_days),
                 ("digests", self.retention_digests_days)]
        for (shorter, short_days), (longer, long_days) in pairwise(chain):
            if long_days and (short_days == 0 or long_days < short_days):
                raise ValueError(
                    f"retention_{longer}_days: must be 0 (keep) or at least"
                    f" NOTIFIER_RETENTION_{shorter.upper()}_DAYS"
                    f" ({'0, kept' if short_days == 0 else f'{short_days:g}'}), got {long_days:g}"
                )
        return self

    @model_validator(mode="after")
    def _unread_inbox_kept_longer_than_read(self) -> Settings:
        read, unread = self.retention_inbox_read_days, self.retention_inbox_unread_days
        if unread and (read == 0 or unread < read):
            raise ValueError(
                f"retention_inbox_unread_days: must be 0 (keep) or at least"
                f" NOTIFIER_RETENTION_INBOX_READ_DAYS ({read:g}), got {unread:g}"
            )
        return self

    @model_validator(mode="after")
    def _countdown_below_visibility(self) -> Settings:
        if self.retry_countdown_max >= self.visibility_timeout:
            raise ValueError(
                f"retry_countdown_max: must be below NOTIFIER_VISIBILITY_TIMEOUT"
                f" ({self.visibility_timeout}), got {self.retry_countdown_max}"
            )
        return self

    @property
    def state_redis_url(self) -> str:
        """The state Redis as redis-py takes it (the broker's, if that is Redis); a
        ``sentinel://`` or ``redis+cluster://`` URL is left for ``notifier.storage.state``."""
        if self.redis_url:
            return redis_client_url(self.redis_url)
        if self.is_redis_broker:
            return redis_client_url(self.broker_url)
        return "redis://127.0.0.1:6379/0"

    @property
    def state_sentinel_master(self) -> str | None:
        """The master name of a state Redis behind Sentinel."""
        return self.redis_sentinel_master or self.broker_sentinel_master

    @property
    def is_sentinel_broker(self) -> bool:
        return urlsplit(self.broker_url).scheme == "sentinel"

    @property
    def broker_sentinel_options(self) -> dict[str, object]:
        """Kombu's transport options for a broker behind Sentinel (none otherwise): every
        producer and consumer of the broker merges these into its own."""
        if not self.is_sentinel_broker:
            return {}
        options: dict[str, object] = {"master_name": self.broker_sentinel_master}
        if self.sentinel_password:
            options["sentinel_kwargs"] = {"password": self.sentinel_password.get_secret_value()}
        return options

    @property
    def prefetch_multiplier(self) -> int:
        return self.worker_prefetch_multiplier or 4 * self.ingest_batch_size

    @property
    def is_redis_broker(self) -> bool:
        scheme = urlsplit(self.broker_url).scheme
        return scheme.startswith("redis") or scheme == "sentinel"


_ORIGIN = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>\[[0-9a-f:.]+\]|[a-z0-9._~-]+)"
                     r"(?::(?P<port>[0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(origin: str) -> str:
    """An origin as a browser sends it (lowercase, no default port); ValueError naming it
    when it is not ``scheme://host[:port]``."""
    found = _ORIGIN.fullmatch(origin.lower())
    port = int(found["port"]) if found and found["port"] else None
    if found is None or (port is not None and not 1 <= port <= 65535):
        raise ValueError(f"{mask_secrets(origin)[:100]!r} is not an origin: expected"
                         " scheme://host[:port], no path (not even /), e.g."
                         " https://app.example.com")
    if port is None or _DEFAULT_PORTS.get(found["scheme"]) == port:
        return f"{found['scheme']}://{found['host']}"
    return f"{found['scheme']}://{found['host']}:{port}"


def _scheme_among(url: str, schemes: tuple[str, ...], expected: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in schemes:
        raise ValueError(f"expected {expected} URL, got scheme {scheme or 'none'!r}")
    return scheme


@dataclass(frozen=True)
class SentinelUrl:
    """A ``sentinel://`` URL, parsed: where the Sentinels listen, and the master's db and
    credentials (given in any part; kombu reads them from its first)."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class ClusterUrl:
    """A ``redis+cluster://`` URL, parsed: the nodes to start discovery from."""

    nodes: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Kombu's form, ``sentinel://[:password@]host:port[/db];sentinel://host:port...``;
    a ValueError says which part is wrong (credentials hidden)."""
    sentinels: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        if parts.scheme != "sentinel":
            raise ValueError(f"expected sentinel://host:port parts separated by ';',"
                             f" got {mask_url(part.strip())!r}")
        sentinels.append(_host_port(parts.netloc.rpartition("@")[2], SENTINEL_PORT, part))
        if parts.path.strip("/"):
            db = _database_number(parts.path, part)
        if parts.username or parts.password:
            username = unquote(parts.username) if parts.username else None
            password = unquote(parts.password) if parts.password else None
    return SentinelUrl(tuple(sentinels), db, username, password)


def parse_cluster_url(url: str) -> ClusterUrl:
    """``redis+cluster://[user:password@]host:port[,host:port...][/0]``."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = tuple(_host_port(node, 6379, url) for node in hosts.split(","))
    if parts.path.strip("/") and _database_number(parts.path, url) != 0:
        raise ValueError(f"a Redis Cluster has database 0 only, got {parts.path!r}")
    username, _, password = userinfo.partition(":")
    return ClusterUrl(nodes, parts.scheme.startswith("rediss"),
                      unquote(username) or None, unquote(password) or None)


def _host_port(netloc: str, default_port: int, url: str) -> tuple[str, int]:
    host, port = netloc, ""
    if netloc.count(":") == 1 or (netloc.startswith("[") and "]:" in netloc):
        host, _, port = netloc.rpartition(":")
    host = host.strip("[]")
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"expected host:port, got {netloc or 'no host'!r} in"
                         f" {mask_url(url.strip())!r}")
    return host, int(port) if port else default_port


def _database_number(path: str, url: str) -> int:
    db = path.strip("/")
    if not db.isdigit():
        raise ValueError(f"expected a database number after the host, got {db!r} in"
                         f" {mask_url(url.strip())!r}")
    return int(db)


def redis_client_url(url: str) -> str:
    """A Redis URL as kombu accepts it, in the form redis-py accepts.

    The one place that translates: kombu's ``redis+socket:///path?virtual_host=N`` (the
    embedded Redis of ``make run``) is redis-py's ``unix:///path?db=N``; credentials and
    other options are kept. ``redis://`` and ``rediss://`` pass unchanged.
    """
    parts = urlsplit(url)
    if parts.scheme != "redis+socket":
        return url
    options = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "virtual_host":
            name, value = "db", value.strip("/") or "0"
        options.append((name, value))
    query = urlencode(options)
    return f"unix://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")


def queue_name(priority: str) -> str:
    """The broker queue that carries notifications of ``priority``."""
    return f"notifier.{priority}"


def delivery_queue(channel: str, priority: str) -> str:
    """The queue of a delivery task: critical ones share a path no bulk traffic is on;
    the rest have a queue per channel, so one slow provider holds up only its own."""
    return "notifier.deliver.critical" if priority == "critical" else f"notifier.deliver.{channel}"


def mask_url(url: str) -> str:
    """The one masking function (``notifier.masking``), under the name URL printers
    import; kombu's ``sentinel://...;sentinel://...`` is masked part by part."""
    if url.startswith("sentinel:") and ";" in url:
        return ";".join(mask_secrets(part) for part in url.split(";"))
    return mask_secrets(url)


def metrics_directory(settings: Settings) -> str:
    """Where this host's processes keep their Prometheus values (multiprocess mode):
    ``NOTIFIER_METRICS_DIR``, else prometheus-client's own variable, else /tmp's. The
    workers and the API write there; ``notifier metrics`` adds them up."""
    return settings.metrics_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(
        tempfile.gettempdir(), f"notifier-metrics-{os.getuid()}"
    )


def load_settings() -> Settings:
    """Read the environment, turning a bad value into one line naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if error["loc"]:
            field = str(error["loc"][0])
        else:  # a check across fields names its field first: "field: problem"
            field, _, message = message.partition(": ")
        raise ConfigError(f"NOTIFIER_{field.upper()}: {message}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
