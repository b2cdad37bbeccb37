"""The one settings object, read from ``NOTIFIER_*`` environment variables.

Every tunable of the pipeline lives here, documented beside its definition, so that
operators find them in one place and modules never grow constants of their own.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PRIORITIES: tuple[str, ...] = ("critical", "high", "normal", "low")
"""Priorities from most to least urgent; each has its own queue ``notifier.<priority>``."""

_DATABASE_SCHEMES = ("postgresql", "postgresql+psycopg", "postgres")
_BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "amqp", "amqps", "pyamqp")


class ConfigError(Exception):
    """A setting is wrong or what it points at does not answer.

    The message is one line that names the variable, ready to show to a person.
    """


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NOTIFIER_", extra="ignore")

    #: SQLAlchemy URL of the Postgres database (driver psycopg 3).
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/notifier"
    #: Celery broker URL (Redis or RabbitMQ).
    broker_url: str = "redis://127.0.0.1:6379/0"
    #: Seconds before Redis hands an unacknowledged message to another worker. This is
    #: how long recovery from a killed worker takes; it must exceed the longest batch.
    visibility_timeout: int = Field(300, ge=1)
    #: Seconds between the broker's scans for messages whose visibility timeout passed.
    unacked_restore_interval: int = Field(10, ge=1)
    #: Seconds an idempotency key is remembered; a repeat within it is dropped.
    dedup_window: int = Field(86400, ge=0)
    #: Most notifications written to Postgres in one ingest transaction.
    ingest_batch_size: int = Field(500, ge=1)
    #: Seconds a partial ingest batch waits for more messages before it is written.
    ingest_flush_interval: float = Field(0.05, gt=0)
    #: Messages a worker process may hold unacknowledged; ingest batches form from them.
    #: ``None``: four batches' worth, so that the batches in flight and those waiting
    #: never reach the limit and a critical message can always be fetched.
    worker_prefetch_multiplier: int | None = Field(None, ge=1)
    #: Notifications per broker message in ``notify_many`` and the buffered producer.
    client_chunk_size: int = Field(500, ge=1)
    #: Seconds the buffered producer holds a partial message before publishing it.
    buffer_max_delay: float = Field(0.05, gt=0)
    #: Channels used when neither the notification nor the recipient names any.
    default_channels: list[str] = ["inapp"]
    #: Attempts (with backoff) to commit an ingest batch before its messages go back
    #: to the queue, e.g. while Postgres restarts.
    ingest_commit_attempts: int = Field(3, ge=1)
    #: Largest accepted ``data`` object, in bytes of JSON.
    max_data_bytes: int = Field(65536, ge=1)
    #: Seconds between beat's retention runs (expired idempotency keys).
    retention_interval: float = Field(3600, gt=0)
    #: Logging level of the worker and the CLI.
    log_level: str = "INFO"

    @field_validator("database_url")
    @classmethod
    def _database_url_is_postgres(cls, url: str) -> str:
        scheme = _scheme_among(url, _DATABASE_SCHEMES, "a postgresql+psycopg://")
        # One driver everywhere: psycopg 3, whatever spelling the user chose.
        return "postgresql+psycopg" + url[len(scheme):]

    @field_validator("broker_url")
    @classmethod
    def _broker_url_is_supported(cls, url: str) -> str:
        _scheme_among(url, _BROKER_SCHEMES, "a redis:// or amqp://")
        return url

    @property
    def prefetch_multiplier(self) -> int:
        return self.worker_prefetch_multiplier or 4 * self.ingest_batch_size

    @property
    def is_redis_broker(self) -> bool:
        return urlsplit(self.broker_url).scheme.startswith("redis")


def _scheme_among(url: str, schemes: tuple[str, ...], expected: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in schemes:
        raise ValueError(f"expected {expected} URL, got scheme {scheme or 'none'!r}")
    return scheme


def queue_name(priority: str) -> str:
    """The broker queue that carries notifications of ``priority``."""
    return f"notifier.{priority}"


def mask_url(url: str) -> str:
    """The URL with its password replaced, the only form of a URL we ever print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def load_settings() -> Settings:
    """Read the environment, turning a bad value into one line naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "?"
        message = error["msg"].removeprefix("Value error, ")
        raise ConfigError(f"NOTIFIER_{field.upper()}: {message}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
