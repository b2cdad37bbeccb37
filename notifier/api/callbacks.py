"""The API key's default ``callback_url``, given to the items of a request that name
none, before they are checked and published (docs/callbacks.md).

Applied to the request's items, not stored apart: the notification carries its URL from
then on, whichever key later reads or cancels it.
"""

from __future__ import annotations

from typing import Any

from notifier.storage.api_keys import KeyInfo


def with_key_callback(items: list[Any], key: KeyInfo) -> list[Any]:
    """``items`` with the key's ``callback_url`` where an item has none (absent or
    null); the same list when the key has no default (the usual case: no copy)."""
    url = key.callback_url
    if url is None:
        return items
    return [
        {**item, "callback_url": url}
        if isinstance(item, dict) and item.get("callback_url") is None else item
        for item in items
    ]
