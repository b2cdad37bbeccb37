"""The settings object: defaults, and one-line errors that name the variable."""

from __future__ import annotations

import pytest

from notifier.settings import ConfigError, Settings, load_settings, mask_url


def test_defaults_point_at_localhost(monkeypatch):
    """With no environment, Postgres and Redis on localhost are used."""
    for name in ("NOTIFIER_DATABASE_URL", "NOTIFIER_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://postgres@127.0.0.1:5432/notifier"
    assert settings.broker_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("url", ["postgres://u@h/db", "postgresql://u@h/db"])
def test_database_url_spellings_use_psycopg(monkeypatch, url):
    """postgres:// and postgresql:// URLs are read as psycopg 3 URLs."""
    monkeypatch.setenv("NOTIFIER_DATABASE_URL", url)
    assert load_settings().database_url == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("NOTIFIER_BROKER_URL", "kafka://h",
         "NOTIFIER_BROKER_URL: expected a redis://, sentinel:// or amqp:// URL"),
    ("NOTIFIER_INGEST_BATCH_SIZE", "0", "NOTIFIER_INGEST_BATCH_SIZE: Input should be greater"),
    ("NOTIFIER_DATABASE_IDLE_TIMEOUT", "5s",
         "NOTIFIER_DATABASE_IDLE_TIMEOUT: Input should be a valid number"),
    ("NOTIFIER_DATABASE_LOCK_TIMEOUT", "-1",
         "NOTIFIER_DATABASE_LOCK_TIMEOUT: Input should be greater than or equal to 0"),
    ("NOTIFIER_DATABASE_IDLE_TIMEOUT", "86400",
         "NOTIFIER_DATABASE_IDLE_TIMEOUT: Input should be less than or equal to 3600"),
    ("NOTIFIER_DELIVERY_CLAIM_WAIT", "0", "NOTIFIER_DELIVERY_CLAIM_WAIT: Input should be greater"),
    ("NOTIFIER_DELIVERY_CLAIM_ATTEMPTS", "0",
         "NOTIFIER_DELIVERY_CLAIM_ATTEMPTS: Input should be greater"),
    ("NOTIFIER_API_DEMO", "true", "NOTIFIER_API_DEMO: the demo page mints recipient tokens"),
    ("NOTIFIER_API_STREAM_HEARTBEAT", "0",
         "NOTIFIER_API_STREAM_HEARTBEAT: Input should be greater than or equal to 0.05"),
    ("NOTIFIER_CRITICAL_LANES", "99",
         "NOTIFIER_CRITICAL_LANES: Input should be less than or equal to 8"),
    ("NOTIFIER_CRITICAL_LANES", "-1",
         "NOTIFIER_CRITICAL_LANES: Input should be greater than or equal to 0"),
])
def test_bad_values_name_the_variable(monkeypatch, variable, value, message):
    """A bad value raises ConfigError whose one line starts with the variable's name."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_passwords_are_masked():
    """URLs are only ever shown with the password replaced."""
    assert mask_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("postgresql+psycopg://u:pw@h/db") == "postgresql+psycopg://u:***@h/db"
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"
