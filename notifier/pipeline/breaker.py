"""A circuit breaker per channel, kept in Redis so every worker sees the same state.

When a provider is down, sending to it only burns attempts and holds worker processes
on timeouts. After ``threshold`` provider failures within ``window`` seconds the circuit
opens: deliveries of that channel are rescheduled (not failed, no attempt counted) until
``open_seconds`` pass. Then one worker at a time sends a probe; its success closes the
circuit, its failure opens it again. Every transition is one Lua script, so two workers
can never both believe they hold the probe.

Times are the Redis server's (``TIME`` inside the scripts), never a worker's clock: two
hosts whose clocks disagree still agree on when a circuit half-opens.

``EndpointBreakers`` applies the same transitions to the endpoints recipients control
(webhook and Slack hosts), so that one recipient's dead server backs off on its own
schedule without holding the channel for everybody else.

Each circuit's keys share a hash tag (``notifier.breaker.{email}``,
``notifier.breaker.{email}.failures``, ...) and each script call touches one circuit, so
the breakers run on a Redis Cluster too (``notifier.storage.state``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from notifier.storage.state import Script, StateRedis, run_scripts

State = Literal["closed", "open", "half_open"]

#: The transitions, as Lua functions of one circuit's key. ``now`` is the server's clock
#: (Redis >= 5 replicates a script's effects, so reading ``TIME`` before writing is
#: allowed; ``replicate_commands`` asks for that on older servers). ``ttl_ms`` above 0
#: makes the circuit's keys expire (endpoint circuits: one per recipient host, so Redis
#: must not keep them forever); a channel's circuit keeps its hash (0).
_FUNCTIONS = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000

local function acquire(key, probe_ms, ttl_ms)
  local state = redis.call('HGET', key, 'state') or 'closed'
  if state == 'closed' then return {'closed', '0'} end
  local open_until = tonumber(redis.call('HGET', key, 'open_until') or '0')
  if state == 'open' and now < open_until then
    return {'open', string.format('%.6f', open_until)}
  end
  if redis.call('SET', key .. '.probe', '1', 'NX', 'PX', probe_ms) then
    redis.call('HSET', key, 'state', 'half_open')
    if ttl_ms > 0 then redis.call('PEXPIRE', key, ttl_ms) end
    return {'probe', '0'}
  end
  return {'open', string.format('%.6f', now + 1)}
end

local function record(key, failures, successes, threshold, window_ms, open_s, probing, ttl_ms)
  local state = redis.call('HGET', key, 'state') or 'closed'
  local function open()
    redis.call('HSET', key, 'state', 'open', 'open_until', string.format('%.6f', now + open_s),
               'opened_at', string.format('%.6f', now))
    redis.call('HINCRBY', key, 'times_opened', 1)
    redis.call('DEL', key .. '.failures', key .. '.probe')
    if ttl_ms > 0 then redis.call('PEXPIRE', key, ttl_ms) end
    return 'open'
  end
  if probing then
    if failures > 0 then return open() end
    redis.call('HSET', key, 'state', 'closed')
    redis.call('DEL', key .. '.failures', key .. '.probe')
    if ttl_ms > 0 then redis.call('PEXPIRE', key, ttl_ms) end
    return 'closed'
  end
  if failures > 0 and state == 'closed' then
    local count = redis.call('INCRBY', key .. '.failures', failures)
    if count == failures then redis.call('PEXPIRE', key .. '.failures', window_ms) end
    if count >= threshold then return open() end
  end
  return state
end
"""

#: KEYS: the circuit; ARGV: probe_ms, ttl_ms. Returns decision, retry_at.
_ACQUIRE = Script(_FUNCTIONS + """
return acquire(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
""")

#: KEYS: the circuit; ARGV: failures, successes, threshold, window_ms, open_s, probing
#: (1 or 0), ttl_ms. Returns the new state.
_RECORD = Script(_FUNCTIONS + """
return record(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
              tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6] == '1', tonumber(ARGV[7]))
""")


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
        self, client: StateRedis, channel: str, *, threshold: int, window: float,
        open_seconds: float, probe_timeout: float = 60.0,
    ) -> None:
        self.client = client
        self.channel = channel
        #: The circuit's hash; its failure counter and probe lock are this plus a suffix,
        #: in the same hash slot.
        self.key = f"notifier.breaker.{{{channel}}}"
        self.threshold = threshold
        self.window = window
        self.open_seconds = open_seconds
        #: How long a probe may run before another worker may probe instead.
        self.probe_timeout = probe_timeout

    def acquire(self) -> Permit:
        [(decision, retry_at)] = run_scripts(self.client, [
            (_ACQUIRE, [self.key], [int(self.probe_timeout * 1000), 0]),
        ])
        return Permit(_text(decision), float(retry_at))  # type: ignore[arg-type]

    def record(self, *, failures: int, successes: int, probing: bool) -> State:
        """Count a batch's provider failures and successes; returns the new state."""
        if not probing and failures == 0:
            return self.state()
        [state] = run_scripts(self.client, [
            (_RECORD, [self.key], [failures, successes, self.threshold,
                                   int(self.window * 1000), self.open_seconds,
                                   "1" if probing else "0", 0]),
        ])
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


@dataclass
class EndpointTally:
    """What one batch saw of one endpoint."""

    failures: int = 0
    successes: int = 0
    probing: bool = False


class EndpointBreakers:
    """Circuits of the recipient-controlled endpoints of one channel (a webhook host, a
    Slack host), keyed by ``scheme://host:port``: the same transitions as a channel's
    circuit, a script call per endpoint, all of a batch's in one pipeline, with keys that
    expire.

    An endpoint's failures never touch the channel's circuit, and its open circuit holds
    only the deliveries bound for it.
    """

    def __init__(
        self, client: StateRedis, channel: str, *, threshold: int, window: float,
        open_seconds: float, probe_timeout: float,
    ) -> None:
        self.client = client
        self.channel = channel
        self.threshold = threshold
        self.window = window
        self.open_seconds = open_seconds
        self.probe_timeout = probe_timeout
        #: An idle circuit is forgotten after this long (closed is the default state).
        self.ttl_ms = int((window + open_seconds + probe_timeout) * 1000)

    def key(self, endpoint: str) -> str:
        """A bounded key whatever the host's length: a digest of the endpoint, as the
        hash tag of the circuit's keys."""
        digest = hashlib.sha256(endpoint.encode("utf-8", "replace")).hexdigest()[:32]
        return f"notifier.endpoint.{{{self.channel}.{digest}}}"

    def acquire(self, endpoints: Sequence[str]) -> list[Permit]:
        """A permit per endpoint, in order."""
        answers = run_scripts(self.client, [
            (_ACQUIRE, [self.key(e)], [int(self.probe_timeout * 1000), self.ttl_ms])
            for e in endpoints
        ])
        return [
            Permit(_text(decision), float(retry_at))  # type: ignore[arg-type]
            for decision, retry_at in answers
        ]

    def record(self, tallies: dict[str, EndpointTally]) -> None:
        """Count a batch's outcomes per endpoint; one pipeline, and none when there is
        nothing a circuit would change on (no failure, no probe)."""
        run_scripts(self.client, [
            (_RECORD, [self.key(endpoint)], [
                tally.failures, tally.successes, self.threshold, int(self.window * 1000),
                self.open_seconds, "1" if tally.probing else "0", self.ttl_ms,
            ])
            for endpoint, tally in tallies.items() if tally.failures or tally.probing
        ])

    def states(self, endpoints: Sequence[str]) -> list[State]:
        """Each endpoint's state (closed when its circuit was never opened or expired)."""
        values = [self.client.hget(self.key(e), "state") for e in endpoints]
        return [_text(v) if v else "closed" for v in values]  # type: ignore[misc]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
