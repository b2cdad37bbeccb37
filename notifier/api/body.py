"""Reading a request body within the size caps, never buffering more than the cap.

The caps are the producer client's message bounds (``notifier/settings.py``):
``max_message_bytes`` of JSON, and at most ``max_message_notifications`` notifications
in one request. A ``Content-Length`` over the cap is refused before a byte is read; a
body without one (chunked) is counted as it arrives and refused as soon as it passes.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from notifier.api.errors import ApiError


async def read_json(request: Request, limit: int, *,
                    expected: str = "a notification or a list of them",
                    optional: bool = False) -> Any:
    """The body as JSON: 413 past ``limit`` bytes, 400 if it is not JSON. An empty body
    is None when ``optional``, else 400 saying what was ``expected``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit, at_least=True)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        if optional:
            return None
        raise ApiError(400, f"the body is empty: send {expected} as JSON")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "the body is not valid JSON",
                       [{"problem": str(exc)[:200]}]) from None


def _too_large(size: int, limit: int, at_least: bool = False) -> ApiError:
    return ApiError(413, f"the body is {'over ' if at_least else ''}{size} bytes, more than"
                         f" the limit of {limit} (NOTIFIER_MAX_MESSAGE_BYTES)",
                    [{"bytes": size, "limit": limit}])
