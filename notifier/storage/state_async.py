"""The state Redis from an event loop: the HTTP API's per-request script without a
thread hop.

The same server, Sentinel master or cluster as :func:`notifier.storage.state.connect`
reaches (one URL, ``NOTIFIER_REDIS_URL``), through ``redis.asyncio``. A request of the
API runs one script on it (the key's rate window and the keys' generation); doing that
from the event loop, instead of handing a blocking call to the thread pool and back,
saved about a tenth of a request's CPU (``docs/api.md``). A client belongs to one
process and one event loop, so there is one per (process, loop).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import NoScriptError

from notifier.settings import Settings, get_settings, parse_cluster_url, parse_sentinel_url
from notifier.storage.state import Script

AsyncStateRedis: TypeAlias = "Redis | RedisCluster"

_clients: dict[tuple[int, int], AsyncStateRedis] = {}


def async_state_redis() -> AsyncStateRedis:
    """This process's and this event loop's client."""
    where = (os.getpid(), id(asyncio.get_running_loop()))
    if where not in _clients:
        _clients[where] = connect_async(get_settings())
    return _clients[where]


def connect_async(settings: Settings, *, timeout: float = 5.0) -> AsyncStateRedis:
    """An asyncio client of the state Redis ``settings`` name, however it is reached."""
    url = settings.state_redis_url
    scheme = urlsplit(url).scheme
    timeouts: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if scheme == "sentinel":
        found = parse_sentinel_url(url)
        sentinel_options: dict[str, Any] = dict(timeouts)
        if settings.sentinel_password:
            sentinel_options["password"] = settings.sentinel_password.get_secret_value()
        sentinel = Sentinel(list(found.sentinels), sentinel_kwargs=sentinel_options, **timeouts)
        assert settings.state_sentinel_master  # the settings refuse a sentinel:// without
        client: Redis = sentinel.master_for(
            settings.state_sentinel_master, db=found.db, username=found.username,
            password=found.password, health_check_interval=30,
        )
        return client
    if scheme.endswith("+cluster"):
        cluster = parse_cluster_url(url)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in cluster.nodes],
            ssl=cluster.tls, username=cluster.username, password=cluster.password,
            **timeouts,
        )
    return Redis.from_url(url, health_check_interval=30, **timeouts)


async def run_script(
    client: AsyncStateRedis, script: Script, keys: Sequence[str],
    args: Sequence[str | int | float],
) -> Any:
    """The script's answer, by its SHA; loaded first if the server does not know it."""
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        await client.script_load(script.text)
        return await client.evalsha(script.sha, len(keys), *keys, *args)
