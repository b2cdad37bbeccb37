"""Circuit breakers and rate limits on every state Redis we accept: one server, a master
found through a Sentinel, and a three-master Redis Cluster (real ``redis-server``
processes, ``tests/redis_servers.py``). On the cluster every script call must touch keys
of one hash slot: a CROSSSLOT anywhere fails these tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from redis.cluster import RedisCluster, key_slot

from notifier.pipeline.breaker import CircuitBreaker, EndpointBreakers, EndpointTally
from notifier.pipeline.delivery import deliver_batch
from notifier.pipeline.ratelimit import RateLimiter, RateRequest
from notifier.settings import Settings, get_settings
from notifier.storage.state import StateRedis, connect
from tests.pipeline.test_delivery import _fresh_channels, make_deliveries, settings_for
from tests.redis_servers import MASTER_NAME, cluster_topology, sentinel_topology
from tests.workers import wait_for

__all__ = ["_fresh_channels"]  # the delivery tests' fixture: channels built per test


@pytest.fixture(scope="module")
def sentinel() -> Iterator[Any]:
    with sentinel_topology() as topology:
        yield topology


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with cluster_topology() as topology:
        yield topology


@pytest.fixture(params=["redis", "sentinel", "cluster"])
def state(request: pytest.FixtureRequest) -> Iterator[tuple[StateRedis, Settings]]:
    """A client of one topology, on empty keys, and the settings that name it."""
    settings = get_settings()
    if request.param == "sentinel":
        topology = request.getfixturevalue("sentinel")
        settings = settings.model_copy(update={"redis_url": topology.url,
                                               "redis_sentinel_master": MASTER_NAME})
        topology.servers.client(topology.master_port()).flushall()
    elif request.param == "cluster":
        topology = request.getfixturevalue("cluster")
        settings = settings.model_copy(update={"redis_url": topology.url})
        topology.flush()
    client = connect(settings)
    yield client, settings
    client.close()


def server_time(client: StateRedis) -> float:
    if isinstance(client, RedisCluster):
        seconds, micros = client.time(target_nodes=RedisCluster.RANDOM)
    else:
        seconds, micros = client.time()
    return seconds + micros / 1e6


def test_a_channel_circuit_opens_half_opens_by_server_time_and_closes_on_a_probe(state):
    client, _ = state
    breaker = CircuitBreaker(client, "email", threshold=2, window=60, open_seconds=0.5)
    assert breaker.record(failures=1, successes=0, probing=False) == "closed"
    before = server_time(client)
    assert breaker.record(failures=1, successes=3, probing=False) == "open"
    permit = breaker.acquire()
    assert permit.decision == "open"
    assert before + 0.5 <= permit.retry_at <= server_time(client) + 0.5
    wait_for(lambda: breaker.acquire().probing, 10, "the circuit to half-open")
    assert breaker.acquire().decision == "open"  # one probe at a time
    assert breaker.record(failures=0, successes=1, probing=True) == "closed"
    assert breaker.acquire().decision == "closed"
    assert breaker.describe()["times_opened"] == 1


def test_endpoint_circuits_of_many_hosts_go_in_one_call_each(state):
    """Forty endpoints (spread over the cluster's slots) acquired and recorded at once;
    only those that failed open, each on its own."""
    client, _ = state
    breakers = EndpointBreakers(client, "webhook", threshold=1, window=60, open_seconds=60,
                                probe_timeout=60)
    endpoints = [f"https://hook-{i}.example:443" for i in range(40)]
    assert len({key_slot(breakers.key(e).encode()) for e in endpoints}) > 30
    assert [p.decision for p in breakers.acquire(endpoints)] == ["closed"] * 40
    before = server_time(client)
    breakers.record({e: EndpointTally(failures=1 if i % 2 else 0, successes=1)
                     for i, e in enumerate(endpoints)})
    after = server_time(client)
    permits = breakers.acquire(endpoints)
    assert [p.decision for p in permits] == ["closed", "open"] * 20
    assert breakers.states(endpoints) == ["closed", "open"] * 20
    assert all(before + 60 <= p.retry_at <= after + 60 for p in permits if not p.allowed)


def test_rate_windows_hold_per_recipient_then_globally_and_give_back_what_they_refuse(state):
    """Per recipient 2 an hour, 5 a minute over all: of a, b and c's three each, the
    third of each waits for its recipient's window, and c's second for the global one;
    c's windows count what went, not what the global limit refused."""
    client, settings = state
    limiter = RateLimiter(client, settings.model_copy(update={
        "rate_limit_per_minute": 0, "rate_limit_per_hour": 2, "rate_limit_per_day": 100,
        "rate_limit_global_per_minute": 5,
    }))
    before = server_time(client)
    waits = limiter.take([RateRequest(r) for r in "aaabbbccc"])
    after = server_time(client)
    assert [bool(w) for w in waits] == [False, False, True, False, False, True, False, True, True]
    hour_ends = {(int(t // 3600) + 1) * 3600 for t in (before, after)}
    minute_ends = {(int(t // 60) + 1) * 60 for t in (before, after)}
    assert {waits[2], waits[5], waits[8]} <= hour_ends and waits[7] in minute_ends
    assert int(client.get("notifier.rate.{c}.hour") or 0) == 1
    assert int(client.get("notifier.rate.{c}.day") or 0) == 1
    assert limiter.take([RateRequest("d", critical=True)]) != [0.0]  # the global window is full


def test_critical_deliveries_count_but_are_never_held_by_their_recipient(state):
    client, settings = state
    limiter = RateLimiter(client, settings.model_copy(update={
        "rate_limit_per_minute": 0, "rate_limit_per_hour": 1, "rate_limit_per_day": 0,
        "rate_limit_global_per_minute": 0}))
    assert limiter.take([RateRequest("ops", critical=True)] * 3) == [0.0, 0.0, 0.0]
    assert int(client.get("notifier.rate.{ops}.hour") or 0) == 3
    assert limiter.take([RateRequest("ops")]) != [0.0]


def test_recipient_ids_with_braces_keep_their_windows_in_one_slot(state):
    client, settings = state
    limiter = RateLimiter(client, settings.model_copy(update={
        "rate_limit_per_minute": 0, "rate_limit_per_hour": 1, "rate_limit_per_day": 5}))
    for recipient in ("}x{", "{}", "a{b}c"):
        assert limiter.take([RateRequest(recipient), RateRequest(recipient)])[1] > 0
        slots = {key_slot(limit.key.encode()) for limit in limiter.limits_for(
            RateRequest(recipient))}
        assert len(slots) == 1


def test_a_batch_over_its_limits_is_held_on_every_topology(state, smtp_server):
    """``deliver_batch`` itself, with the topology's client: sent within the limit, the
    rest rescheduled, the failing provider's circuit opened."""
    client, settings = state
    settings = settings_for(smtp_server.url(), **{
        k: v for k, v in settings.model_dump().items() if k.startswith("redis")},
        rate_limit_per_minute=0, rate_limit_per_hour=2, breaker_failure_threshold=1)
    outcome = deliver_batch("email", make_deliveries(3, recipients=1, priority="high"),
                            settings, client)
    assert (outcome.sent, outcome.rescheduled) == (2, 1)
    smtp_server.fail_always(code=421, text="service not available")
    outcome = deliver_batch("email", make_deliveries(2, recipients=2, priority="high"),
                            settings, client)
    assert (outcome.retrying, outcome.rescheduled) == (1, 1)  # user-0 is still over its limit
    assert CircuitBreaker(client, "email", threshold=1, window=60,
                          open_seconds=30).state() == "open"


def test_health_pings_every_master_of_the_cluster(cluster):
    from tests.ops.test_cli import run

    result = run("health", "--check", "state", env={"NOTIFIER_REDIS_URL": cluster.url})
    masters = ", ".join(sorted(f"127.0.0.1:{port}" for port in cluster.ports))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(
        f"ok   state  {cluster.url}: cluster of 3 masters ({masters}), ")
