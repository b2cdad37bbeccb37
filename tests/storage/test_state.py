"""The state Redis (breakers, rate limits) reached through any broker URL we accept."""

from __future__ import annotations

import pytest
import redis

from notifier.settings import SentinelUrl, Settings, parse_sentinel_url, redis_client_url


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
    assert str(error.value) == ("NOTIFIER_REDIS_URL: expected a redis://, rediss://, unix://,"
                                " redis+socket://, sentinel:// or redis+cluster:// URL,"
                                " got scheme 'http'")


@pytest.mark.parametrize(("env", "line"), [
    ({"NOTIFIER_BROKER_URL": "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379"},
     "NOTIFIER_BROKER_SENTINEL_MASTER: required with a sentinel:// NOTIFIER_BROKER_URL"
     " (the name the Sentinels monitor)"),
    ({"NOTIFIER_BROKER_URL": "sentinel://:pw@10.0.0.1:26379;redis://:pw@10.0.0.2",
      "NOTIFIER_BROKER_SENTINEL_MASTER": "main"},
     "NOTIFIER_BROKER_URL: expected sentinel://host:port parts separated by ';',"
     " got 'redis://:***@10.0.0.2'"),
    ({"NOTIFIER_BROKER_URL": "sentinel://10.0.0.1:2637x", "NOTIFIER_BROKER_SENTINEL_MASTER": "m"},
     "NOTIFIER_BROKER_URL: expected host:port, got '10.0.0.1:2637x' in"
     " 'sentinel://10.0.0.1:2637x'"),
    ({"NOTIFIER_REDIS_URL": "sentinel://10.0.0.1:26379/state"},
     "NOTIFIER_REDIS_URL: expected a database number after the host, got 'state' in"
     " 'sentinel://10.0.0.1:26379/state'"),
    ({"NOTIFIER_REDIS_URL": "sentinel://10.0.0.1:26379/1"},
     "NOTIFIER_REDIS_SENTINEL_MASTER: required with a sentinel:// NOTIFIER_REDIS_URL"
     " (the name the Sentinels monitor)"),
    ({"NOTIFIER_REDIS_URL": "redis+cluster://10.0.0.1:7000,10.0.0.2:7000/3"},
     "NOTIFIER_REDIS_URL: a Redis Cluster has database 0 only, got '/3'"),
    ({"NOTIFIER_REDIS_URL": "redis+cluster://:pw@10.0.0.1:7000,:7001"},
     "NOTIFIER_REDIS_URL: expected host:port, got ':7001' in"
     " 'redis+cluster://:***@10.0.0.1:7000,:7001'"),
])
def test_each_sentinel_or_cluster_mistake_is_one_line_naming_its_variable(
    monkeypatch, env: dict[str, str], line: str,
) -> None:
    from notifier.settings import ConfigError, load_settings

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert str(error.value) == line


def test_a_sentinel_broker_gives_kombu_its_master_and_the_state_redis_its_sentinels() -> None:
    """The broker's Sentinels serve the state Redis too, unless it has a URL of its own;
    the Sentinels' password goes to them alone, the master's in the URL."""
    settings = Settings(broker_url="sentinel://:pw@10.0.0.1:26379/2;sentinel://10.0.0.2",
                        broker_sentinel_master="main", sentinel_password="s3")
    assert settings.broker_sentinel_options == {"master_name": "main",
                                                "sentinel_kwargs": {"password": "s3"}}
    assert settings.state_redis_url == settings.broker_url
    assert settings.state_sentinel_master == "main"
    assert parse_sentinel_url(settings.state_redis_url) == SentinelUrl(
        (("10.0.0.1", 26379), ("10.0.0.2", 26379)), db=2, password="pw")
    own = Settings(broker_url=settings.broker_url, broker_sentinel_master="main",
                   redis_url="sentinel://10.0.0.3:26380/1", redis_sentinel_master="state")
    assert (own.state_redis_url, own.state_sentinel_master) == (
        "sentinel://10.0.0.3:26380/1", "state")
    assert Settings(broker_url="redis://127.0.0.1:6379/0").broker_sentinel_options == {}
