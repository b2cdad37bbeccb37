"""Delivery channels: one plugin module per channel, behind ``base.Channel``.

A channel is configured by the URL in ``NOTIFIER_CHANNELS__<NAME>``; one instance per
worker process keeps its connection between batches. The names are part of the public
contract: a notification or a recipient's preferences may ask for them, and ingest
rejects a name that no channel answers to.
"""

from __future__ import annotations

import importlib
import os

from notifier.channels.base import Channel, ConfigurationError
from notifier.settings import Settings, get_settings

#: Plugin modules, imported on first use; each registers the channel it defines.
PLUGIN_MODULES = ("email", "webhook", "inapp", "slack", "apprise", "sms", "console")

CHANNEL_NAMES: frozenset[str] = frozenset(PLUGIN_MODULES)

_instances: dict[tuple[int, str], Channel] = {}


def channel_class(name: str) -> type[Channel]:
    if name not in CHANNEL_NAMES:
        raise ConfigurationError(f"unknown channel {name!r}")
    importlib.import_module(f"notifier.channels.{name}")
    return Channel.registry[name]


def get_channel(name: str, settings: Settings | None = None) -> Channel:
    """This process's instance of the channel, built from its URL on first use.

    Instances are per process: a connection opened before a fork must never be shared
    by two pool processes.
    """
    key = (os.getpid(), name)
    if key not in _instances:
        url = (settings or get_settings()).channels.get(name)
        if not url:
            raise ConfigurationError(
                f"{name}: not configured; set NOTIFIER_CHANNELS__{name.upper()} to its URL"
            )
        _instances[key] = channel_class(name)(url)
    return _instances[key]


def close_channels() -> None:
    """Close this process's channel connections (worker shutdown, tests)."""
    pid = os.getpid()
    for key in [key for key in _instances if key[0] == pid]:
        _instances.pop(key).close()
