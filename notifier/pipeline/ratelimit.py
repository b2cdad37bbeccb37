"""Rate limits per recipient (minute, hour, day) and for the whole system (minute).

Counters are fixed windows aligned to the Redis server's clock (``TIME`` inside the
scripts, never a worker's clock, so workers whose clocks disagree share one window).
Each counter is one key that expires when its window ends.

A delivery is checked and counted in two steps, each one Lua script call on keys of one
hash slot (so they run on a Redis Cluster too):

1. the recipient's windows (``notifier.rate.{<recipient>}.minute``, ``.hour``, ``.day``):
   either every window has room and all of them count the delivery, or none does and
   the caller learns when the fullest window resets;
2. the global window (``notifier.rate.{global}.minute``), for the batch's deliveries
   that passed step 1, at once: it grants what it has room for, and the recipients'
   counts of the deliveries it refuses are given back.

A limited delivery is rescheduled to its window's reset, never dropped. All of a batch's
calls of one step go in one pipeline; without a global limit there is no step 2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from notifier.settings import Settings
from notifier.storage.state import Script, ScriptCall, StateRedis, run_scripts
from notifier.storage.state_async import AsyncStateRedis, run_script

#: Window name -> length in seconds.
WINDOWS = {"minute": 60, "hour": 3600, "day": 86400}

#: Redis >= 5 replicates a script's effects, so reading ``TIME`` before writing is
#: allowed (``replicate_commands`` asks for that on older servers).
_CLOCK = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function window_end(length) return (math.floor(now / length) + 1) * length end
"""

#: KEYS: one recipient's windows; ARGV: limit, length per key. Returns '0' (counted) or
#: when the fullest window resets (nothing counted).
_TAKE = Script(_CLOCK + """
local blocked_until = 0
for i = 1, #KEYS do
  local limit, length = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  if limit > 0 and tonumber(redis.call('GET', KEYS[i]) or '0') >= limit then
    local reset = window_end(length)
    if reset > blocked_until then blocked_until = reset end
  end
end
if blocked_until > 0 then return tostring(blocked_until) end
for i = 1, #KEYS do
  if redis.call('INCR', KEYS[i]) == 1 then
    redis.call('PEXPIREAT', KEYS[i], window_end(tonumber(ARGV[2 * i])) * 1000)
  end
end
return '0'
""")

#: KEYS: the global window; ARGV: limit, length, deliveries wanting to go. Returns how
#: many may go (counted), and when the window resets.
_TAKE_SHARED = Script(_CLOCK + """
local limit, length, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local granted = math.max(0, math.min(wanted, limit - used))
if granted > 0 and redis.call('INCRBY', KEYS[1], granted) == granted then
  redis.call('PEXPIREAT', KEYS[1], window_end(length) * 1000)
end
return {granted, tostring(window_end(length))}
""")

#: KEYS: one recipient's windows counted by ``_TAKE``; gives that count back (a window
#: that ended meanwhile is left alone).
_GIVE_BACK = Script("""
for i = 1, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') > 0 then redis.call('DECR', KEYS[i]) end
end
return #KEYS
""")


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
    def __init__(self, client: StateRedis, settings: Settings) -> None:
        self.client = client
        self.recipient_limits = {
            "minute": settings.rate_limit_per_minute,
            "hour": settings.rate_limit_per_hour,
            "day": settings.rate_limit_per_day,
        }
        self.global_per_minute = settings.rate_limit_global_per_minute

    @property
    def enabled(self) -> bool:
        return any(self.recipient_limits.values()) or self.global_per_minute > 0

    def take(self, requests: Sequence[RateRequest]) -> list[float]:
        """Count each delivery; per request, 0.0 if it may go now, else when it may."""
        if not self.enabled:
            return [0.0] * len(requests)
        limits = [self.limits_for(request) for request in requests]
        calls: list[ScriptCall] = [
            (_TAKE, [limit.key for limit in own], [n for limit in own
                                                   for n in (limit.limit, limit.length)])
            for own in limits if own
        ]
        answers = iter(run_scripts(self.client, calls))
        waits = [float(next(answers)) if own else 0.0 for own in limits]
        if self.global_per_minute:
            self._take_shared(limits, waits)
        return waits

    def _take_shared(self, limits: list[list[Limit]], waits: list[float]) -> None:
        """Step 2: the global window for the requests that may go so far, in order; the
        refused ones are held to its reset and their recipients' counts given back."""
        going = [i for i, wait in enumerate(waits) if not wait]
        if not going:
            return
        [(granted, reset)] = run_scripts(self.client, [
            (_TAKE_SHARED, [self.global_key], [self.global_per_minute, 60, len(going)]),
        ])
        refused = going[int(granted):]
        for i in refused:
            waits[i] = float(reset)
        run_scripts(self.client, [
            (_GIVE_BACK, [limit.key for limit in limits[i]], []) for i in refused if limits[i]
        ])

    @property
    def global_key(self) -> str:
        return "notifier.rate.{global}.minute"

    def limits_for(self, request: RateRequest) -> list[Limit]:
        """The recipient's windows that are counted (all sharing the recipient's hash tag)."""
        return [
            Limit(f"notifier.rate.{{{hash_tag(request.recipient_id)}}}.{window}",
                  0 if request.critical else self.recipient_limits[window], length)
            for window, length in WINDOWS.items()
            if self.recipient_limits[window]
        ]


def hash_tag(recipient_id: str) -> str:
    """The recipient's id as a Redis Cluster hash tag: itself, unless a brace in it (or
    none at all) would end the tag early; then a digest of it."""
    if recipient_id and "{" not in recipient_id and "}" not in recipient_id:
        return recipient_id
    return "#" + hashlib.sha256(recipient_id.encode("utf-8", "replace")).hexdigest()[:32]


#: KEYS: the keys' generation, then API keys' windows; ARGV: the windows' length, then
#: per window its limit (0: none), the requests already admitted (counted whatever the
#: limit: an API process let them through on what it last read) and the requests asking.
#: Returns the generation, then per window the requests granted of those asking (the
#: first ones: as many as the window has room for, all without a limit), the window's
#: count then and when it resets: the key checks of every request an API process has to
#: count or to decide, and its key cache's freshness, in one round trip. A generation
#: missing (never set, or lost with the server's data) is set from the server's clock,
#: so a value once seen never comes back.
_TAKE_KEYS = Script(_CLOCK + """
local generation = redis.call('GET', KEYS[1])
if not generation then
  generation = 't' .. clock[1] .. '.' .. clock[2]
  redis.call('SET', KEYS[1], generation, 'NX')
  generation = redis.call('GET', KEYS[1])
end
local length = tonumber(ARGV[1])
local answer = {generation}
for i = 2, #KEYS do
  local at = 3 * i - 4
  local limit, admitted, asking = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local granted, used = asking, 0
  if limit > 0 then
    used = tonumber(redis.call('GET', KEYS[i]) or '0') + admitted
    granted = math.min(asking, math.max(0, limit - used))
    if admitted + granted > 0 then
      used = redis.call('INCRBY', KEYS[i], admitted + granted)
      if used == admitted + granted then
        redis.call('PEXPIREAT', KEYS[i], window_end(length) * 1000)
      end
    end
  end
  answer[#answer + 1] = granted
  answer[#answer + 1] = used
  answer[#answer + 1] = tostring(window_end(length))
end
return answer
""")


@dataclass(frozen=True)
class KeyWindow:
    """An API key's window after :func:`take_key_windows_async`: requests granted of those
    asking, its count then, when it resets (epoch seconds)."""

    granted: int
    used: int
    reset: float


async def take_key_windows_async(
    client: AsyncStateRedis, generation_key: str,
    windows: Sequence[tuple[str, int, int, int]], length: int,
) -> tuple[str, list[KeyWindow]]:
    """API keys' requests, from the event loop, for each ``(window key, limit, admitted,
    asking)`` (limit 0: nothing counted): the ``admitted`` ones counted, then as many of
    the ``asking`` ones as its window of ``limit`` per ``length`` seconds has room for
    (the same as that many calls one by one: a refused request is not counted); and the
    keys' generation read; in one script call."""
    keys = [generation_key, *(window for window, _, _, _ in windows)]
    args: list[int] = [length]
    for _, limit, admitted, asking in windows:
        args += [limit, admitted, asking]
    generation, *rest = await run_script(client, _TAKE_KEYS, keys, args)
    return _text(generation), [KeyWindow(int(rest[i]), int(rest[i + 1]), float(rest[i + 2]))
                               for i in range(0, len(rest), 3)]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def take_window_async(
    client: AsyncStateRedis, key: str, limit: int, length: int,
) -> float:
    """Count one use of a fixed window of ``limit`` per ``length`` seconds kept at ``key``
    (the recipients' script, so the window is the Redis server's), from the event loop:
    0.0 if counted, else when the window resets (epoch seconds, nothing counted). The
    recipient tokens' limit."""
    return float(await run_script(client, _TAKE, [key], [limit, length]))
