"""A circuit breaker per channel, kept in Redis so every worker sees the same state.

When a provider is down, sending to it only burns attempts and holds worker processes
on timeouts. After ``threshold`` provider failures within ``window`` seconds the circuit
opens: deliveries of that channel are rescheduled (not failed, no attempt counted) until
``open_seconds`` pass. Then one worker at a time sends a probe; its success closes the
circuit, its failure opens it again. Every transition is one Lua script, so two workers
can never both believe they hold the probe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import redis

State = Literal["closed", "open", "half_open"]

_ACQUIRE = """
local key, now, probe_ms = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HGET', key, 'state') or 'closed'
if state == 'closed' then return {'closed', '0'} end
local open_until = tonumber(redis.call('HGET', key, 'open_until') or '0')
if state == 'open' and now < open_until then return {'open', tostring(open_until)} end
if redis.call('SET', key .. '.probe', '1', 'NX', 'PX', probe_ms) then
  redis.call('HSET', key, 'state', 'half_open')
  return {'probe', '0'}
end
return {'open', tostring(now + 1)}
"""

_RECORD = """
local key, now = KEYS[1], tonumber(ARGV[1])
local failures, successes = tonumber(ARGV[2]), tonumber(ARGV[3])
local threshold, window_ms, open_s = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local probing = ARGV[7] == '1'
local state = redis.call('HGET', key, 'state') or 'closed'
local function open()
  redis.call('HSET', key, 'state', 'open', 'open_until', tostring(now + open_s),
             'opened_at', tostring(now))
  redis.call('HINCRBY', key, 'times_opened', 1)
  redis.call('DEL', key .. '.failures', key .. '.probe')
  return 'open'
end
if probing then
  if failures > 0 then return open() end
  redis.call('HSET', key, 'state', 'closed')
  redis.call('DEL', key .. '.failures', key .. '.probe')
  return 'closed'
end
if failures > 0 and state == 'closed' then
  local count = redis.call('INCRBY', key .. '.failures', failures)
  if count == failures then redis.call('PEXPIRE', key .. '.failures', window_ms) end
  if count >= threshold then return open() end
end
return state
"""


@dataclass(frozen=True)
class Permit:
    """What a delivery batch may do now: send all, send one probe, or wait until ``retry_at``."""

    decision: Literal["closed", "probe", "open"]
    retry_at: float = 0.0

    @property
    def allowed(self) -> bool:
        return self.decision != "open"

    @property
    def probing(self) -> bool:
        return self.decision == "probe"


class CircuitBreaker:
    def __init__(
        self, client: redis.Redis, channel: str, *, threshold: int, window: float,
        open_seconds: float, probe_timeout: float = 60.0,
    ) -> None:
        self.client = client
        self.channel = channel
        self.key = f"notifier.breaker.{channel}"
        self.threshold = threshold
        self.window = window
        self.open_seconds = open_seconds
        #: How long a probe may run before another worker may probe instead.
        self.probe_timeout = probe_timeout

    def acquire(self, now: float | None = None) -> Permit:
        decision, retry_at = self.client.eval(
            _ACQUIRE, 1, self.key, now or time.time(), int(self.probe_timeout * 1000)
        )
        return Permit(_text(decision), float(retry_at))  # type: ignore[arg-type]

    def record(
        self, *, failures: int, successes: int, probing: bool, now: float | None = None
    ) -> State:
        """Count a batch's provider failures and successes; returns the new state."""
        if not probing and failures == 0:
            return self.state()
        state = self.client.eval(
            _RECORD, 1, self.key, now or time.time(), failures, successes, self.threshold,
            int(self.window * 1000), self.open_seconds, "1" if probing else "0",
        )
        return _text(state)  # type: ignore[return-value]

    def state(self) -> State:
        value = self.client.hget(self.key, "state")
        return _text(value) if value else "closed"  # type: ignore[return-value]

    def describe(self) -> dict[str, object]:
        """State, failures in the current window and when an open circuit half-opens."""
        fields = {_text(k): _text(v) for k, v in self.client.hgetall(self.key).items()}
        failures = self.client.get(f"{self.key}.failures")
        return {
            "state": fields.get("state", "closed"),
            "recent_failures": int(failures or 0),
            "open_until": float(fields["open_until"]) if "open_until" in fields else None,
            "times_opened": int(fields.get("times_opened", 0)),
        }

    def reset(self) -> None:
        self.client.delete(self.key, f"{self.key}.failures", f"{self.key}.probe")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
