"""Delivery channels: one plugin module per channel, behind ``base.Channel``.

A channel is configured by the URL in ``NOTIFIER_CHANNELS__<NAME>``, or by a JSON list
of URLs in order of preference (``'["smtps://primary…", "smtp://backup…"]'``): its
*providers*, which ``notifier.pipeline.delivery`` fails over between. One instance per
provider and worker process keeps its connection between batches. The names are part
of the public contract: a notification or a recipient's preferences may ask for them,
and ingest rejects a name that no channel answers to.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from notifier.channels.base import Channel, ConfigurationError, retry_overrides
from notifier.settings import CHANNEL_NAMES as CHANNEL_NAMES
from notifier.settings import ConfigError, Settings, get_settings, mask_url

# Each channel's plugin module (``notifier.channels.<name>``) is imported on first use
# and registers the channel it defines. The names live in settings, below the schemas
# that check them and the queues named after them.

#: Most providers one channel's variable may list: each costs a connect timeout when
#: it is down and its circuit still closed, so a long list only makes attempts slower.
MAX_PROVIDERS = 5
#: Longest provider name (``1:smtp.example.com:587``): a metric label and a column.
MAX_PROVIDER_NAME = 100
_NOT_IN_NAME = re.compile(r"[^a-z0-9.\-_\[\]:]")


@dataclass(frozen=True)
class Provider:
    """One of a channel's providers: its place in the order of preference (0 is the
    preferred one), a stable name that carries no secret, and its channel instance."""

    index: int
    #: ``<index>:<host>[:<port>]``: what metrics, ``notifier status`` and the delivery
    #: row (``deliveries.provider``) call it.
    name: str
    channel: Channel


_instances: dict[tuple[int, str], list[Provider]] = {}


def channel_class(name: str) -> type[Channel]:
    if name not in CHANNEL_NAMES:
        raise ConfigurationError(f"unknown channel {name!r}")
    importlib.import_module(f"notifier.channels.{name}")
    return Channel.registry[name]


def get_channel(name: str, settings: Settings | None = None) -> Channel:
    """This process's instance of the channel's preferred provider (see ``get_providers``)."""
    return get_providers(name, settings)[0].channel


def get_providers(name: str, settings: Settings | None = None) -> list[Provider]:
    """This process's providers of the channel, in order of preference, built from its
    variable on first use.

    Instances are per process: a connection opened before a fork must never be shared
    by two pool processes. Any failure to build them is a ``ConfigurationError`` whose
    one line names the variable to fix.
    """
    key = (os.getpid(), name)
    if key not in _instances:
        settings = settings or get_settings()
        value = settings.channels.get(name)
        if not value:
            raise ConfigurationError(
                f"{variable(name)}: not set; the {name} channel is not configured"
            )
        try:
            _instances[key] = build_providers(name, value, settings)
        except ConfigError as exc:
            raise ConfigurationError(str(exc)) from None
    return _instances[key]


def variable(name: str) -> str:
    """The environment variable that configures a channel."""
    return f"NOTIFIER_CHANNELS__{name.upper()}"


def channel_urls(name: str, value: str) -> list[str]:
    """The URLs a channel's variable holds, most preferred first: the value itself, or
    the URLs of a JSON list (a value starting with ``[``) of 1 to ``MAX_PROVIDERS``
    non-empty strings. ``ConfigError`` naming the variable otherwise (never quoting the
    value: it holds passwords)."""
    if not value.lstrip().startswith("["):
        return [value]
    try:
        urls = json.loads(value)
    except ValueError:
        urls = None
    if not isinstance(urls, list) or not all(isinstance(u, str) and u.strip() for u in urls):
        raise ConfigError(f"{variable(name)}: expected one URL or a JSON list of URLs"
                          ' (["smtps://primary…", "smtp://backup…"])')
    if not 1 <= len(urls) <= MAX_PROVIDERS:
        raise ConfigError(f"{variable(name)}: lists {len(urls)} URLs; expected 1 to"
                          f" {MAX_PROVIDERS} (providers in order of preference)")
    return urls


def provider_name(index: int, url: str) -> str:
    """``<index>:<host>[:<port>]`` from a provider's URL, or ``<index>:<scheme>`` where it
    names no host: never the credentials, whatever the URL holds."""
    try:
        parts = urlsplit(url.strip())
        host, port = parts.hostname or parts.scheme.lower(), parts.port
    except ValueError:
        host, port = "invalid", None
    host = _NOT_IN_NAME.sub("_", host.lower())
    name = f"{index}:{host}" + (f":{port}" if port else "")
    return name[:MAX_PROVIDER_NAME]


def provider_names(name: str, settings: Settings) -> list[str]:
    """The names of the channel's providers as its variable lists them, nothing built
    (``notifier status``); none if it is not set or does not parse."""
    value = settings.channels.get(name)
    if not value:
        return []
    try:
        return [provider_name(i, url) for i, url in enumerate(channel_urls(name, value))]
    except ConfigError:
        return []


def build_providers(name: str, value: str, settings: Settings) -> list[Provider]:
    """Every provider the channel's variable lists, without connecting anywhere;
    ``ConfigError`` naming the variable (and, in a list, the URL's index) when anything
    is wrong."""
    urls = channel_urls(name, value)
    if len(urls) == 1:
        return [Provider(0, provider_name(0, urls[0]), build_channel(name, urls[0], settings))]
    providers = [
        Provider(i, provider_name(i, url),
                 build_channel(name, url, settings, label=f"{variable(name)}[{i}]"))
        for i, url in enumerate(urls)
    ]
    if not providers[0].channel.has_providers:
        raise ConfigError(
            f"{variable(name)}: lists {len(urls)} URLs, but the {name} channel has no"
            " provider to fail over between (it sends to each recipient's own target);"
            " give one URL"
        )
    return providers


def build_channel(name: str, url: str, settings: Settings, *, label: str | None = None) -> Channel:
    """A channel instance from one URL, without connecting anywhere, its retry options
    checked too; ``ConfigError`` naming ``label`` (the variable, by default) when anything
    is wrong."""
    label = label or variable(name)
    if name not in CHANNEL_NAMES:
        raise ConfigError(
            f"{label}: no such channel; known: {', '.join(sorted(CHANNEL_NAMES))}"
        )
    try:
        channel = channel_class(name)(url)
        retry_overrides(channel.options)
    except Exception as exc:  # any class: an operator's typo must be one line, not a trace
        reason = " ".join(str(exc).split()) or type(exc).__name__
        reason = _without_secrets(reason.removeprefix(f"{name}: "), url)
        raise ConfigError(f"{label}: {reason}") from None
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
    """Build every configured channel's providers once (nothing connects), so that a bad
    URL stops a worker, beat or command at start instead of failing deliveries later."""
    for name, value in sorted(settings.channels.items()):
        if value:
            build_providers(name, value, settings)


def close_channels() -> None:
    """Close this process's channel connections (worker shutdown, tests)."""
    pid = os.getpid()
    for key in [key for key in _instances if key[0] == pid]:
        for provider in _instances.pop(key):
            provider.channel.close()
