"""A small Server-Sent Events client for the tests: the frames as a browser parses them
(``event``, ``id``, ``data``, ``retry``, comments), read from a real HTTP response."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

#: Generous bound for one frame to arrive (correctness only; times are printed).
WAIT = 15.0


@dataclass
class Frame:
    """One block up to a blank line. ``kind`` is the event type, ``comment`` for a
    comment-only block, ``retry`` for a block with only ``retry:``."""

    kind: str
    id: str | None = None
    data: str = ""
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


class EventStream:
    """The frames of one open stream, in order."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines: AsyncIterator[str] = response.aiter_lines()

    async def next(self, timeout: float = WAIT) -> Frame:
        """The next frame; TimeoutError if none comes, EOFError once the stream ended."""
        return await asyncio.wait_for(self._read(), timeout)

    async def next_event(self, kind: str, timeout: float = WAIT) -> Frame:
        """The next frame of this kind, heartbeats and ``retry`` skipped."""
        while True:
            frame = await self.next(timeout)
            if frame.kind == kind:
                return frame
            assert frame.kind in ("comment", "retry"), frame

    async def _read(self) -> Frame:
        fields: dict[str, list[str]] = {}
        async for line in self._lines:
            if line == "":
                if fields:
                    return _frame(fields)
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name or "comment", []).append(value.removeprefix(" "))
        raise EOFError("the stream ended")


def _frame(fields: dict[str, list[str]]) -> Frame:
    if "event" in fields or "data" in fields:
        return Frame(fields.get("event", ["message"])[-1], fields.get("id", [None])[-1],
                     "\n".join(fields.get("data", [])),
                     int(fields["retry"][-1]) if "retry" in fields else None)
    if "retry" in fields:
        return Frame("retry", retry=int(fields["retry"][-1]))
    return Frame("comment", data="\n".join(fields.get("comment", [])))
