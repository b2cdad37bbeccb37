"""The key checks of the requests waiting at once, in one Redis script call per process.

Every request runs the keys' script (:func:`notifier.pipeline.ratelimit.take_key_windows_async`):
its key's rate window counted, the keys' generation read (``notifier.api.keys``). One
call per request was the API's largest cost after HTTP itself: a tenth of a single
send's CPU in redis-py, and as much again in the socket's system calls. So requests do
not call it themselves: each hands its check to this event loop's :class:`KeyWindows`,
which runs one call for every check waiting, then answers each, as
``notifier.api.publisher`` publishes the single sends waiting at once.

Nothing is lost by it, neither the limit nor revocation:

* each request is counted in the state Redis before it is answered, and the script
  grants a window's requests in order as far as the limit allows, exactly as calls one by
  one would: the limit holds across every process, without any slack;
* each request's generation is read by a call that starts after the request reached
  this process, so a revocation done before the request was sent is seen by it.

No timer: a check made while no call is in flight starts one as soon as the requests
already ready on the event loop have run (and have handed their checks too); checks made
while a call is in flight go in the next one. A failed call fails exactly the requests
it carried (the API's 503).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from notifier.pipeline.ratelimit import take_key_windows_async
from notifier.storage.api_keys import GENERATION_KEY, rate_window_key
from notifier.storage.state_async import async_state_redis

#: Length of an API key's rate window, seconds.
WINDOW_SECONDS = 60


@dataclass(frozen=True)
class _Check:
    window: str
    limit: int
    answer: asyncio.Future[tuple[float, str]]


class KeyWindows:
    """One event loop's key checks: one script call at a time, carrying all that wait."""

    def __init__(self) -> None:
        self._waiting: list[_Check] = []
        self._draining: asyncio.Task[None] | None = None

    async def take(self, key_id: int, limit: int) -> tuple[float, str]:
        """Count a request of key ``key_id`` in its window of ``limit`` a minute (0:
        none): 0.0, or when the window resets (nothing counted); and the generation."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[tuple[float, str]] = loop.create_future()
        self._waiting.append(_Check(rate_window_key(key_id), limit, answer))
        if self._draining is None:
            self._draining = loop.create_task(self._drain())
        return await answer

    async def _drain(self) -> None:
        try:
            while self._waiting:
                taken, self._waiting = self._waiting, []
                try:
                    await _settle(taken)
                except BaseException as exc:
                    for check in taken:
                        if not check.answer.done():
                            check.answer.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
        finally:
            self._draining = None


async def _settle(taken: list[_Check]) -> None:
    """One script call for ``taken``, grouped by window; each check answered."""
    by_window: dict[str, list[_Check]] = {}
    for check in taken:
        by_window.setdefault(check.window, []).append(check)
    windows = [(window, checks[0].limit, len(checks)) for window, checks in by_window.items()]
    generation, granted = await take_key_windows_async(
        async_state_redis(), GENERATION_KEY, windows, WINDOW_SECONDS)
    for checks, (count, reset) in zip(by_window.values(), granted, strict=True):
        for index, check in enumerate(checks):
            if not check.answer.done():  # the client went away
                check.answer.set_result((0.0 if index < count else reset, generation))


_loops: dict[tuple[int, int], KeyWindows] = {}


def key_windows() -> KeyWindows:
    """This process's and this event loop's (as its Redis client is)."""
    where = (os.getpid(), id(asyncio.get_running_loop()))
    if where not in _loops:
        _loops[where] = KeyWindows()
    return _loops[where]
