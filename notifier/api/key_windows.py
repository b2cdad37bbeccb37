"""API keys' rate windows and the keys' generation, read from the state Redis once per
short interval per process, not once per request.

Every request needs two facts from the state Redis (``notifier.api.keys``): whether its
key's window of the minute has room (the count is shared by every API process) and the
keys' *generation* (bumped by a revoke, it keeps the key cache honest). One script call
per request was the API's largest cost after HTTP itself: in redis-py and in the
socket's system calls, about a fifth of a single send's CPU. So each process keeps what
its last call read (:class:`KeyWindows`, one per event loop) and answers from it while
that read is fresh, counting what it lets through; the next call adds those counts in
Redis and reads the windows and the generation again.

Fresh means: the last call began at most ``NOTIFIER_API_KEY_SYNC_INTERVAL`` seconds
(``interval``) before the request arrived, and the key's window has not ended since.
Otherwise the request waits for a call begun after it arrived, with the other requests
waiting then (one call carries them all, and grants a window's requests in order as far
as the limit allows, as calls one by one would). While requests keep coming, a call
starts in the background once the last read is half an interval old, so a busy process's
requests never wait for Redis. The bounds (``docs/api.md``):

* a revoke is seen by every process's answers at most ``interval`` after it: a request
  that arrives later is answered from a read begun after the revoke;
* a key's limit is never passed by one process (its own counts, those in flight too,
  and the requests still waiting for a call's answer are added to the last count
  read); a process takes its counts to Redis within
  about ``interval`` of letting the requests through (a timer, should all go quiet), so
  between processes the limit is passed by at most what the others let through in
  the last two intervals.

``interval`` 0 makes every request wait for a read begun after it arrived: exact, and
still one call for all the requests waiting at once. A failed call fails the requests
waiting for it (the API's 503); the counts it carried are kept for the next one.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from notifier.pipeline.ratelimit import take_key_windows_async
from notifier.settings import get_settings
from notifier.storage.api_keys import GENERATION_KEY, rate_window_key
from notifier.storage.state_async import async_state_redis

#: Length of an API key's rate window, seconds.
WINDOW_SECONDS = 60


@dataclass(frozen=True)
class _Waiting:
    window: str
    limit: int
    answer: asyncio.Future[tuple[float, str]]


@dataclass
class _Window:
    """A key's window as this process knows it."""

    limit: int
    #: Its count in Redis at the last read.
    used: int = 0
    #: Requests let through here since, not counted in Redis yet.
    admitted: int = 0
    #: Of those, the ones the call in flight is counting.
    sending: int = 0
    #: When it ends (epoch seconds, the Redis server's clock).
    reset: float = 0.0


class KeyWindows:
    """One event loop's view of the keys' windows and generation (see the module)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._windows: dict[str, _Window] = {}
        self._waiting: list[_Waiting] = []
        #: Per window: requests waiting for a call or asking in the one in flight. Their
        #: answers are not known yet, so one answered here meanwhile counts them as let
        #: through: else the call could grant them the room it just gave away.
        self._pending: dict[str, int] = {}
        self._generation = ""
        #: When the last call that answered began (``time.monotonic``).
        self._read_at = -float("inf")
        self._calling: asyncio.Task[None] | None = None
        #: Set while counts let through wait for a call to take them to Redis.
        self._flush: asyncio.TimerHandle | None = None

    async def take(self, key_id: int, limit: int) -> tuple[float, str]:
        """Count a request of key ``key_id`` in its window of ``limit`` a minute (0:
        none): 0.0, or when the window resets (nothing counted); and the generation."""
        name = rate_window_key(key_id)
        age = time.monotonic() - self._read_at
        known = self._windows.get(name)
        if (age <= self.interval and known is not None and known.limit == limit
                and time.time() < known.reset):
            if self._calling is None and age > self.interval / 2:
                self._call()  # refreshed before it goes stale, nobody waiting for it
            taken = known.used + known.sending + known.admitted + self._pending.get(name, 0)
            if limit and taken >= limit:
                return known.reset, self._generation
            if limit:
                known.admitted += 1
                if self._flush is None:  # in Redis within an interval, even if all goes quiet
                    self._flush = asyncio.get_running_loop().call_later(
                        self.interval, self._flushed)
            return 0.0, self._generation
        answer: asyncio.Future[tuple[float, str]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(name, limit, answer))
        self._pending[name] = self._pending.get(name, 0) + 1
        if self._calling is None:
            self._call()
        return await answer

    def _answered(self, requests: list[_Waiting]) -> None:
        """They have their answers (or their call failed): no longer pending."""
        for request in requests:
            left = self._pending.get(request.window, 0) - 1
            if left > 0:
                self._pending[request.window] = left
            else:
                self._pending.pop(request.window, None)

    def _flushed(self) -> None:
        self._flush = None
        if not any(window.admitted for window in self._windows.values()):
            return
        if self._calling is None:
            self._call()
        else:  # the call in flight may have begun before them: look again soon
            self._flush = asyncio.get_running_loop().call_later(
                self.interval / 2, self._flushed)

    def _call(self) -> None:
        """A call, once the requests already ready on the event loop have run (and have
        joined it)."""
        self._calling = asyncio.get_running_loop().create_task(self._calls())

    async def _calls(self) -> None:
        """Calls while requests wait: a request that came during one waits for the next
        (the one in flight began before it arrived)."""
        try:
            await self._read()
            while self._waiting:
                await self._read()
        finally:
            self._calling = None

    async def _read(self) -> None:
        waiting, self._waiting = self._waiting, []
        asking: dict[str, list[_Waiting]] = {}
        for request in waiting:
            asking.setdefault(request.window, []).append(request)
        counted = {name: window.admitted for name, window in self._windows.items()
                   if window.admitted}
        for name, count in counted.items():
            window = self._windows[name]
            window.admitted, window.sending = 0, count
        limits = {name: self._windows[name].limit for name in counted}
        limits.update({name: requests[-1].limit for name, requests in asking.items()})
        began = time.monotonic()
        try:
            generation, read = await take_key_windows_async(
                async_state_redis(), GENERATION_KEY,
                [(name, limit, counted.get(name, 0), len(asking.get(name, ())))
                 for name, limit in limits.items()], WINDOW_SECONDS)
        except BaseException as exc:
            for name, count in counted.items():  # counted by the next call instead
                window = self._windows[name]
                window.admitted, window.sending = window.admitted + count, 0
            self._answered(waiting)
            for request in waiting:
                if not request.answer.done():
                    request.answer.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._generation, self._read_at = generation, began
        self._answered(waiting)
        for (name, limit), found in zip(limits.items(), read, strict=True):
            window = self._windows.setdefault(name, _Window(limit))
            window.limit, window.used, window.reset = limit, found.used, found.reset
            window.sending = 0  # in ``used`` now
            for index, request in enumerate(asking.get(name, ())):
                if not request.answer.done():  # the client went away
                    request.answer.set_result(
                        (0.0 if index < found.granted else found.reset, generation))
        now = time.time()
        for name in [name for name, window in self._windows.items()
                     if window.reset <= now and not window.admitted]:
            del self._windows[name]  # ended: a key seen again is read afresh


_loops: dict[tuple[int, int], KeyWindows] = {}


def key_windows() -> KeyWindows:
    """This process's and this event loop's (as its Redis client is)."""
    where = (os.getpid(), id(asyncio.get_running_loop()))
    if where not in _loops:
        _loops[where] = KeyWindows(get_settings().api_key_sync_interval)
    return _loops[where]
