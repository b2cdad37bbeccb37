"""Delivery channels: one plugin module per channel, behind ``base.Channel``.

A channel is configured by the URL in ``NOTIFIER_CHANNELS__<NAME>``; one instance per
worker process keeps its connection between batches. The names are part of the public
contract: a notification or a recipient's preferences may ask for them, and ingest
rejects a name that no channel answers to.
"""

from __future__ import annotations

import importlib
import os
from urllib.parse import urlsplit

from notifier.channels.base import Channel, ConfigurationError, retry_overrides
from notifier.settings import CHANNEL_NAMES as CHANNEL_NAMES
from notifier.settings import ConfigError, Settings, get_settings, mask_url

# Each channel's plugin module (``notifier.channels.<name>``) is imported on first use
# and registers the channel it defines. The names live in settings, below the schemas
# that check them and the queues named after them.

_instances: dict[tuple[int, str], Channel] = {}


def channel_class(name: str) -> type[Channel]:
    if name not in CHANNEL_NAMES:
        raise ConfigurationError(f"unknown channel {name!r}")
    importlib.import_module(f"notifier.channels.{name}")
    return Channel.registry[name]


def get_channel(name: str, settings: Settings | None = None) -> Channel:
    """This process's instance of the channel, built from its URL on first use.

    Instances are per process: a connection opened before a fork must never be shared
    by two pool processes. Any failure to build one is a ``ConfigurationError`` whose
    one line names the variable to fix.
    """
    key = (os.getpid(), name)
    if key not in _instances:
        settings = settings or get_settings()
        url = settings.channels.get(name)
        if not url:
            raise ConfigurationError(
                f"{variable(name)}: not set; the {name} channel is not configured"
            )
        try:
            _instances[key] = build_channel(name, url, settings)
        except ConfigError as exc:
            raise ConfigurationError(str(exc)) from None
    return _instances[key]


def variable(name: str) -> str:
    """The environment variable that configures a channel."""
    return f"NOTIFIER_CHANNELS__{name.upper()}"


def build_channel(name: str, url: str, settings: Settings) -> Channel:
    """A channel instance from its URL, without connecting anywhere, its retry options
    checked too; ``ConfigError`` naming the variable when anything is wrong."""
    if name not in CHANNEL_NAMES:
        raise ConfigError(
            f"{variable(name)}: no such channel; known: {', '.join(sorted(CHANNEL_NAMES))}"
        )
    try:
        channel = channel_class(name)(url)
        retry_overrides(channel.options)
    except Exception as exc:  # any class: an operator's typo must be one line, not a trace
        reason = " ".join(str(exc).split()) or type(exc).__name__
        reason = _without_secrets(reason.removeprefix(f"{name}: "), url)
        raise ConfigError(f"{variable(name)}: {reason}") from None
    return channel


def _without_secrets(text: str, url: str) -> str:
    """An error quoting the URL (a library's, not ours) shows it masked, and never the
    password anywhere."""
    try:
        text = text.replace(url, mask_url(url))
        password = urlsplit(url).password
    except ValueError:  # a URL too broken to parse has no password we could find
        return text.replace(url, "<the URL>")
    return text.replace(password, "***") if password else text


def check_channel_urls(settings: Settings) -> None:
    """Build every configured channel once (nothing connects), so that a bad URL stops a
    worker, beat or command at start instead of failing deliveries later."""
    for name, url in sorted(settings.channels.items()):
        if url:
            build_channel(name, url, settings)


def close_channels() -> None:
    """Close this process's channel connections (worker shutdown, tests)."""
    pid = os.getpid()
    for key in [key for key in _instances if key[0] == pid]:
        _instances.pop(key).close()
