"""The Redis that holds shared delivery state: circuit breakers and rate-limit counters.

Reached one of three ways, by ``NOTIFIER_REDIS_URL`` (or the broker's URL):

* a plain URL (``redis://``, ``rediss://``, ``unix://``): one server;
* ``sentinel://``: the master that the Sentinels name now. redis-py asks them again
  after a connection error, so after a failover the next command reaches the promoted
  replica (its commands retried with backoff meanwhile);
* ``redis+cluster://``: a Redis Cluster. Every script touches keys of one hash slot
  (``{...}`` hash tags in the key names), so no call is refused with CROSSSLOT.

The scripts run by SHA (``run_scripts``), pipelined: a batch's script calls cost one
round trip per server, and a server that does not know a script yet (restarted, just
promoted, another cluster node) gets it loaded and the calls run again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError
from redis.sentinel import Sentinel, SentinelConnectionPool

from notifier.settings import Settings, get_settings, parse_cluster_url, parse_sentinel_url

#: A client of the state Redis: one server (maybe found through Sentinel) or a cluster.
StateRedis: TypeAlias = "redis.Redis | RedisCluster"

_clients: dict[int, StateRedis] = {}


def state_redis() -> StateRedis:
    """This process's client (a connection pool must not cross a fork)."""
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = connect(get_settings())
    return _clients[pid]


def server_seconds(client: StateRedis) -> float:
    """The state Redis's clock (``TIME``), in epoch seconds: the clock of the breakers'
    and rate limits' times, turned into a wait by subtracting it."""
    if isinstance(client, RedisCluster):
        seconds, micros = client.time(target_nodes=RedisCluster.RANDOM)
    else:
        seconds, micros = client.time()
    return float(seconds) + float(micros) / 1e6


@dataclass(frozen=True)
class ClientClasses:
    """redis-py's client classes of one flavour: blocking (here) or ``redis.asyncio``
    (``notifier.storage.state_async``); :func:`connect_with` builds either the same way."""

    redis: Any
    sentinel: Any
    cluster: Any
    node: Any


BLOCKING = ClientClasses(redis.Redis, Sentinel, RedisCluster, ClusterNode)


def connect(settings: Settings, *, timeout: float = 5.0) -> StateRedis:
    """A client of the state Redis that ``settings`` name, however it is reached."""
    client: StateRedis = connect_with(BLOCKING, settings, timeout)
    return client


def connect_with(classes: ClientClasses, settings: Settings, timeout: float) -> Any:
    """A client of ``classes``' flavour for the state Redis of ``settings``: a plain URL,
    the master the Sentinels name, or a cluster."""
    url = settings.state_redis_url
    scheme = urlsplit(url).scheme
    timeouts: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if scheme == "sentinel":
        found = parse_sentinel_url(url)
        sentinel_options: dict[str, Any] = dict(timeouts)
        if settings.sentinel_password:
            sentinel_options["password"] = settings.sentinel_password.get_secret_value()
        sentinel = classes.sentinel(list(found.sentinels), sentinel_kwargs=sentinel_options,
                                    **timeouts)
        assert settings.state_sentinel_master  # the settings refuse a sentinel:// without
        return sentinel.master_for(
            settings.state_sentinel_master, db=found.db, username=found.username,
            password=found.password, health_check_interval=30,
        )
    if scheme.endswith("+cluster"):
        cluster = parse_cluster_url(url)
        return classes.cluster(
            startup_nodes=[classes.node(host, port) for host, port in cluster.nodes],
            ssl=cluster.tls, username=cluster.username, password=cluster.password,
            **timeouts,
        )
    return classes.redis.from_url(url, health_check_interval=30, **timeouts)


def describe(client: StateRedis) -> str | None:
    """Where the client's commands go now, when the URL does not say: the master the
    Sentinels name, or every cluster master (None for one server)."""
    if isinstance(client, RedisCluster):
        masters = sorted(node.name for node in client.get_primaries())
        return f"cluster of {len(masters)} masters ({', '.join(masters)})"
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):  # ask the Sentinels who it is now
        host, port = pool.get_master_address()
        return f"master {pool.service_name} at {host}:{port}"
    return None


@dataclass(frozen=True)
class Script:
    """A Lua script, run by its SHA."""

    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())


#: One script call: the script, its keys (all in one hash slot), its arguments.
ScriptCall: TypeAlias = "tuple[Script, Sequence[str], Sequence[str | int | float]]"


def run_scripts(client: StateRedis, calls: Sequence[ScriptCall]) -> list[Any]:
    """Each call's answer, in order: every call pipelined (one round trip per server),
    none in a transaction. A call refused with NOSCRIPT did not run: its script is
    loaded (on every cluster master) and it runs once more. Any other error is raised
    after the pipeline ran."""
    if not calls:
        return []
    results = _pipelined(client, calls)
    missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:
        for script in {calls[i][0] for i in missing}:
            client.script_load(script.text)
        for i, result in zip(missing, _pipelined(client, [calls[i] for i in missing]),
                             strict=True):
            results[i] = result
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def _pipelined(client: StateRedis, calls: Sequence[ScriptCall]) -> list[Any]:
    pipeline = client.pipeline(transaction=False)
    for script, keys, args in calls:
        pipeline.evalsha(script.sha, len(keys), *keys, *args)
    return list(pipeline.execute(raise_on_error=False))
