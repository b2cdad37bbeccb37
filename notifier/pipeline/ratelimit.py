"""Rate limits per recipient (minute, hour, day) and for the whole system (minute).

Counters are fixed windows aligned to the clock, in Redis, checked and counted by one
Lua script per delivery: either every window has room and all of them count the
delivery, or none does and the caller learns when the fullest window resets. A limited
delivery is rescheduled to that moment, never dropped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from notifier.settings import Settings

#: Window name -> length in seconds.
WINDOWS = {"minute": 60, "hour": 3600, "day": 86400}

_TAKE = """
local now = tonumber(ARGV[1])
local n = #KEYS
local blocked_until = 0
for i = 1, n do
  local limit, length = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  if limit > 0 and tonumber(redis.call('GET', KEYS[i]) or '0') >= limit then
    local reset = (math.floor(now / length) + 1) * length
    if reset > blocked_until then blocked_until = reset end
  end
end
if blocked_until > 0 then return tostring(blocked_until) end
for i = 1, n do
  local length = tonumber(ARGV[2 * i + 1])
  if redis.call('INCR', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], length + 1) end
end
return '0'
"""


@dataclass(frozen=True)
class Limit:
    key: str
    limit: int  # 0: counted, never enforced
    length: int


@dataclass(frozen=True)
class RateRequest:
    recipient_id: str
    #: Critical deliveries count against the recipient but are never held by it.
    critical: bool = False


class RateLimiter:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.recipient_limits = {
            "minute": settings.rate_limit_per_minute,
            "hour": settings.rate_limit_per_hour,
            "day": settings.rate_limit_per_day,
        }
        self.global_per_minute = settings.rate_limit_global_per_minute
        self._script = client.register_script(_TAKE)

    @property
    def enabled(self) -> bool:
        return any(self.recipient_limits.values()) or self.global_per_minute > 0

    def take(self, requests: Sequence[RateRequest], now: float | None = None) -> list[float]:
        """Count each delivery; per request, 0.0 if it may go now, else when it may."""
        if not self.enabled:
            return [0.0] * len(requests)
        now = now or time.time()
        pipeline = self.client.pipeline(transaction=False)
        for request in requests:
            limits = self.limits_for(request, now)
            args: list[float] = [now]
            for limit in limits:
                args += [limit.limit, limit.length]
            self._script(keys=[limit.key for limit in limits], args=args, client=pipeline)
        return [float(result) for result in pipeline.execute()]

    def limits_for(self, request: RateRequest, now: float) -> list[Limit]:
        limits = [
            Limit(
                f"notifier.rate.{request.recipient_id}.{window}.{int(now // length)}",
                0 if request.critical else self.recipient_limits[window], length,
            )
            for window, length in WINDOWS.items()
            if self.recipient_limits[window]
        ]
        if self.global_per_minute:
            limits.append(
                Limit(f"notifier.rate.global.minute.{int(now // 60)}", self.global_per_minute, 60)
            )
        return limits
