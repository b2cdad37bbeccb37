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

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import NoScriptError

from notifier.settings import Settings, get_settings
from notifier.storage.state import ClientClasses, Script, connect_with

AsyncStateRedis: TypeAlias = "Redis | RedisCluster"

ASYNCIO = ClientClasses(Redis, Sentinel, RedisCluster, ClusterNode)

_clients: dict[tuple[int, int], AsyncStateRedis] = {}


def async_state_redis() -> AsyncStateRedis:
    """This process's and this event loop's client."""
    where = (os.getpid(), id(asyncio.get_running_loop()))
    if where not in _clients:
        _clients[where] = connect_async(get_settings())
    return _clients[where]


def connect_async(settings: Settings, *, timeout: float = 5.0) -> AsyncStateRedis:
    """An asyncio client of the state Redis ``settings`` name, however it is reached
    (built as :func:`notifier.storage.state.connect` builds its blocking one)."""
    client: AsyncStateRedis = connect_with(ASYNCIO, settings, timeout)
    return client


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
