"""Identifiers made by producers, before anything reaches the database.

UUIDv7 puts the creation time in the leading bits, so ids made by many producers
still sort by time and keep the primary-key index append-mostly.
"""

from __future__ import annotations

import os
import time
import uuid

#: The bits a version 7 UUID fixes: the version (7) and the RFC 4122 variant.
_VERSION_MASK = ~(0xF << 76) & ~(0x3 << 62)
_VERSION_7_VARIANT = (0x7 << 76) | (0x2 << 62)


def uuid7() -> uuid.UUID:
    """A version 7 UUID (RFC 9562): 48 bits of Unix milliseconds, then random bits."""
    millis = time.time_ns() // 1_000_000
    value = (millis & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    return uuid.UUID(int=(value & _VERSION_MASK) | _VERSION_7_VARIANT)


def uuid7_texts(count: int) -> list[str]:
    """``count`` version 7 UUIDs as text (``str(uuid7())``'s form), of the same
    millisecond, from ONE read of the OS's random source. Each read (``getrandom``)
    releases the GIL, and a thread that gives it up mid-list waits for it again behind
    the process's other busy threads (the API's event loop and publisher): a list's ids
    made one read each spent more wall time waiting than making ids."""
    millis = (time.time_ns() // 1_000_000) & ((1 << 48) - 1)
    random = os.urandom(10 * count)
    high = millis << 80
    texts: list[str] = []
    for start in range(0, 10 * count, 10):
        value = high | int.from_bytes(random[start:start + 10], "big")
        value = (value & _VERSION_MASK) | _VERSION_7_VARIANT
        hexed = f"{value:032x}"
        texts.append(f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}")
    return texts
