"""The state Redis (breakers, rate limits) reached through any broker URL we accept."""

from __future__ import annotations

import pytest
import redis

from notifier.settings import Settings, redis_client_url


@pytest.mark.parametrize(("kombu_url", "expected"), [
    ("redis+socket:///tmp/r.sock", "unix:///tmp/r.sock"),
    ("redis+socket:///tmp/r.sock?virtual_host=3", "unix:///tmp/r.sock?db=3"),
    ("redis+socket:///tmp/r.sock?virtual_host=/2&health_check_interval=5",
     "unix:///tmp/r.sock?db=2&health_check_interval=5"),
    ("redis+socket://:s%40cret@/tmp/a%20b.sock", "unix://:s%40cret@/tmp/a%20b.sock"),
    ("redis://127.0.0.1:6379/4", "redis://127.0.0.1:6379/4"),
    ("rediss://:pw@cache.example:6380/1", "rediss://:pw@cache.example:6380/1"),
])
def test_kombu_redis_urls_become_redis_py_urls(kombu_url: str, expected: str) -> None:
    assert redis_client_url(kombu_url) == expected


def test_the_embedded_broker_url_gives_a_state_redis_client_on_its_socket() -> None:
    """The URL ``make run`` exports for its embedded Redis: db and password carried over."""
    settings = Settings(broker_url="redis+socket://:s%40cret@/tmp/a%20b.sock?virtual_host=3")
    options = redis.Redis.from_url(settings.state_redis_url).connection_pool.connection_kwargs
    assert (options["path"], options["db"], options["password"]) == ("/tmp/a b.sock", 3, "s@cret")


def test_an_explicit_state_redis_url_in_kombu_form_is_translated_too() -> None:
    settings = Settings(broker_url="amqp://127.0.0.1//", redis_url="redis+socket:///tmp/s.sock")
    assert settings.state_redis_url == "unix:///tmp/s.sock"
    assert Settings(broker_url="amqp://127.0.0.1//").state_redis_url == "redis://127.0.0.1:6379/0"


def test_a_state_redis_url_of_another_kind_stops_the_process_in_one_line(monkeypatch) -> None:
    from notifier.settings import ConfigError, load_settings

    monkeypatch.setenv("NOTIFIER_REDIS_URL", "http://cache.example/0")
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert str(error.value) == ("NOTIFIER_REDIS_URL: expected a redis://, rediss://, unix:// or"
                                " redis+socket:// URL, got scheme 'http'")
