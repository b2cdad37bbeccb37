"""The Redis that holds shared delivery state: circuit breakers and rate-limit counters."""

from __future__ import annotations

import os

import redis

from notifier.settings import get_settings

_clients: dict[int, redis.Redis] = {}


def state_redis() -> redis.Redis:
    """This process's client (a connection pool must not cross a fork)."""
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(
            get_settings().state_redis_url, socket_timeout=5, socket_connect_timeout=5,
            health_check_interval=30,
        )
    return _clients[pid]
