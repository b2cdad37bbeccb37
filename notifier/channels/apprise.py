"""Apprise: one channel for the many services the ``apprise`` library speaks.

Channel URL: ``apprise://?allow_private=no``. The target is the recipient's
``addresses["apprise"]``, one Apprise URL (``json://host/path``, ``mailto://...``,
``tgram://bot_token/chat_id``); its secrets are shown only as Apprise's privacy form.

Options: ``allow_private`` (yes/no, default ``NOTIFIER_ALLOW_PRIVATE_TARGETS``) and
``timeout`` (seconds one send may take in all, default 10).

Every send runs inside ``egress.guarded_egress``: each host the plugin looks up (the
recipient's own ``gotify://`` server, the ``smtp=`` of a ``mailto://``) is checked, all
of its addresses, and every connection must go to a checked address; redirects are
not followed; the send is cut off after ``timeout`` seconds in all, and at most
``NOTIFIER_HTTP_MAX_RESPONSE_BYTES`` of an answer is read. That holds for the plugins
that connect through requests or smtplib in the calling thread, which is nearly all of
them. The others (desktop and OS notifiers, syslog, MQTT, XMPP, IRC, ...:
``unguarded_schemes``) open connections the guard cannot see, and are refused unless
``NOTIFIER_APPRISE_ALLOWED_SCHEMES`` lists them; a listed one runs without the guard.

Limits, accepted with the convenience:

* Apprise has no idempotency key: a retry after a send that did arrive repeats it.
* ``notify`` answers only True or False, so a failure the guard did not cause is
  retryable (a bad token is retried until the attempts run out) and the error cannot
  say why; Apprise's log (logger ``apprise``) has the reason.
* A send cut off by the deadline may have arrived (it is retried, like a timeout).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import apprise  # the library: absolute imports, this module is notifier.channels.apprise

from notifier.channels.base import (
    AddressError,
    Channel,
    ConfigurationError,
    DeliveryError,
    OutgoingMessage,
    PermanentError,
    RetryableError,
    SendResult,
)
from notifier.channels.egress import HostUnreachable, guarded_egress
from notifier.channels.http import copy_error, mask_target
from notifier.settings import get_settings

#: Modules through which a plugin's connections are resolved by ``socket.getaddrinfo``
#: in the calling thread, where ``guarded_egress`` sees them.
GUARDED_CLIENT_MODULES = ("requests", "smtplib")


class AppriseChannel(Channel):
    """Send each message through the Apprise plugin its recipient's URL names."""

    name = "apprise"
    schemes = ("apprise",)
    address_field = "apprise"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.allow_private = self.flag("allow_private", get_settings().allow_private_targets)
        self.timeout = self.number("timeout", 10.0)
        if self.timeout <= 0:
            raise ConfigurationError("apprise: option timeout: must be above 0")
        unknown = get_settings().apprise_allowed_schemes - known_schemes()
        if unknown:
            raise ConfigurationError(
                f"NOTIFIER_APPRISE_ALLOWED_SCHEMES: not an Apprise scheme:"
                f" {', '.join(sorted(unknown))}"
            )
        # Sequential sends: a plugin run in a pool thread would escape the guard, which
        # watches the calling thread only.
        self._asset = apprise.AppriseAsset(async_mode=False)

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> Iterator[SendResult]:
        """One ``notify`` per message; the Apprise object is made once per address, and
        an address that ran out of time is not tried again in the batch."""
        targets: dict[str, _Target | DeliveryError] = {}
        for message in messages:
            address = message.address or ""
            try:
                if address not in targets:
                    targets[address] = self._target(message)
                target = targets[address]
                if isinstance(target, DeliveryError):
                    error: DeliveryError | None = copy_error(target)
                else:
                    error = self._notify(target, message)
                    if isinstance(error, HostUnreachable):
                        targets[address] = RetryableError(f"not tried: {error}")
            except Exception as exc:  # one recipient's problem is its own
                error = RetryableError(f"apprise: unexpected {type(exc).__name__} while sending")
            if error is not None:
                error.provider_failure = False  # the recipient's service, not the channel
            yield SendResult(message.delivery_id, error)

    def _target(self, message: OutgoingMessage) -> _Target | DeliveryError:
        """An Apprise object for the message's address, or why there can be none."""
        address = message.address
        if not address:
            return AddressError(
                f"apprise: recipient {message.recipient_id} has no Apprise URL"
            )
        target = apprise.Apprise(asset=self._asset)
        if not target.add(address) or len(target) != 1:
            return AddressError(
                f"apprise: the {_scheme(address)}:// address of recipient"
                f" {message.recipient_id} is not one URL Apprise knows"
            )
        [server] = list(target)
        schemes = unguarded_plugins().get(type(server))
        if schemes and not schemes & get_settings().apprise_allowed_schemes:
            scheme = _scheme(address) if _scheme(address) in schemes else min(schemes)
            return PermanentError(
                f"apprise: the {scheme}:// plugin connects where the egress guard cannot"
                f" check it; add {scheme} to NOTIFIER_APPRISE_ALLOWED_SCHEMES to allow it"
            )
        return _Target(target, guarded=not schemes)

    def _notify(self, target: _Target, message: OutgoingMessage) -> DeliveryError | None:
        body = message.body or message.title
        if not target.guarded:  # listed by the operator: runs as Apprise runs it
            sent = target.apprise.notify(title=message.title, body=body)
            return None if sent else RetryableError(
                f"apprise: sending to {self._shown(target.apprise)} failed"
            )
        limit = get_settings().http_max_response_bytes
        with guarded_egress(self.allow_private, self.timeout, limit) as guard:
            sent = target.apprise.notify(title=message.title, body=body)
        shown = self._shown(target.apprise)
        if guard.refused is not None:
            return guard.refused.named("apprise")
        if guard.redirect is not None:
            return PermanentError(
                f"apprise: {shown} answered with a redirect, which is not followed"
            )
        if guard.expired:
            return HostUnreachable(f"apprise: no answer from {shown} within {self.timeout:g}s")
        if sent:
            return None
        return RetryableError(f"apprise: sending to {shown} failed")

    @staticmethod
    def _shown(target: apprise.Apprise) -> str:
        return "; ".join(mask_target(server.url(privacy=True)).partition("?")[0]
                         for server in target)


@dataclass(frozen=True)
class _Target:
    """A recipient's Apprise object, and whether its plugin runs inside the guard."""

    apprise: apprise.Apprise
    guarded: bool


@cache
def unguarded_plugins() -> dict[type, frozenset[str]]:
    """The Apprise plugins whose connections the guard cannot see, with their schemes:
    those whose module (or a base class's) imports neither requests nor smtplib. Worked
    out from the installed Apprise, so a plugin added by an upgrade is refused until
    someone looks, rather than let through."""
    apprise.Apprise().add("json://localhost")  # makes Apprise load its plugins
    manager = apprise.apprise.N_MGR
    unguarded: dict[type, set[str]] = {}
    for schema in manager.schemas():
        plugin = manager[schema]
        modules = [sys.modules.get(cls.__module__) for cls in plugin.__mro__
                   if cls.__module__.startswith("apprise.plugins")]
        guarded = any(
            module is not None and any(name in vars(module) for name in GUARDED_CLIENT_MODULES)
            for module in modules
        )
        if not guarded:
            unguarded.setdefault(plugin, set()).add(schema.lower())
    return {plugin: frozenset(schemes) for plugin, schemes in unguarded.items()}


@cache
def known_schemes() -> frozenset[str]:
    """Every scheme the installed Apprise has a plugin for."""
    apprise.Apprise().add("json://localhost")  # makes Apprise load its plugins
    return frozenset(schema.lower() for schema in apprise.apprise.N_MGR.schemas())


def unguarded_schemes() -> frozenset[str]:
    """Every scheme of ``unguarded_plugins`` (for the docs and the tests)."""
    return frozenset().union(*unguarded_plugins().values())


def _scheme(address: str) -> str:
    return address.partition("://")[0].lower() if "://" in address else "?"
