"""Apprise: one channel for the many services the ``apprise`` library speaks.

Channel URL: ``apprise://?allow_private=no``. The target is the recipient's
``addresses["apprise"]``, one Apprise URL (``json://host/path``, ``mailto://...``,
``tgram://bot_token/chat_id``); its secrets are shown only as Apprise's privacy form.

Every send runs inside ``egress.guarded_resolution``: each host the plugin looks up
(the recipient's own ``gotify://`` server, the ``smtp=`` of a ``mailto://``, a redirect's
target) is checked, all of its addresses, and the connection goes to a checked one;
redirects are not followed. That holds for the plugins that connect through requests
or smtplib in the calling thread, which is nearly all of them. The others (desktop and
OS notifiers, syslog, MQTT, XMPP, IRC, ...: ``unguarded_schemes``) open connections
the guard cannot see, and are refused unless ``NOTIFIER_APPRISE_ALLOWED_SCHEMES``
lists them.

Limits, accepted with the convenience:

* Apprise has no idempotency key: a retry after a send that did arrive repeats it.
* ``notify`` answers only True or False, so a failure the guard did not cause is
  retryable (a bad token is retried until the attempts run out) and the error cannot
  say why; Apprise's log (logger ``apprise``) has the reason.
* Apprise's own timeouts apply (per connect and per read, 4 s each by default), and
  requests reads a whole answer: the HTTP channels' deadline and response cap do not.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from functools import cache

import apprise  # the library: absolute imports, this module is notifier.channels.apprise

from notifier.channels.base import (
    Channel,
    ConfigurationError,
    DeliveryError,
    OutgoingMessage,
    PermanentError,
    RetryableError,
    SendResult,
)
from notifier.channels.egress import guarded_resolution
from notifier.channels.http import mask_target
from notifier.settings import get_settings

#: Modules through which a plugin's connections are resolved by ``socket.getaddrinfo``
#: in the calling thread, where ``guarded_resolution`` sees them.
GUARDED_CLIENT_MODULES = ("requests", "smtplib")


class AppriseChannel(Channel):
    """Send each message through the Apprise plugin its recipient's URL names."""

    name = "apprise"
    schemes = ("apprise",)
    address_field = "apprise"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.allow_private = self.flag("allow_private", get_settings().allow_private_targets)
        # Sequential sends: a plugin run in a pool thread would escape the guard, which
        # watches the calling thread only.
        self._asset = apprise.AppriseAsset(async_mode=False)

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> Iterator[SendResult]:
        """One ``notify`` per message; the Apprise object is made once per address."""
        targets: dict[str, apprise.Apprise | DeliveryError] = {}
        for message in messages:
            address = message.address or ""
            try:
                if address not in targets:
                    targets[address] = self._target(message)
                target = targets[address]
                error = (
                    target if isinstance(target, DeliveryError)
                    else self._notify(target, message)
                )
            except Exception as exc:  # one recipient's problem is its own
                error = RetryableError(f"apprise: unexpected {type(exc).__name__} while sending")
            if error is not None:
                error.provider_failure = False  # the recipient's service, not the channel
            yield SendResult(message.delivery_id, error)

    def _target(self, message: OutgoingMessage) -> apprise.Apprise | DeliveryError:
        """An Apprise object for the message's address, or why there can be none."""
        address = message.address
        if not address:
            return ConfigurationError(
                f"apprise: recipient {message.recipient_id} has no Apprise URL"
            )
        target = apprise.Apprise(asset=self._asset)
        if not target.add(address) or len(target) != 1:
            return ConfigurationError(
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
        return target

    def _notify(self, target: apprise.Apprise, message: OutgoingMessage) -> DeliveryError | None:
        body = message.body or message.title
        with guarded_resolution(self.allow_private) as guard:
            sent = target.notify(title=message.title, body=body)
        if guard.refused is not None:
            return guard.refused.named("apprise")
        if guard.redirect is not None:
            return PermanentError(
                f"apprise: {self._shown(target)} answered with a redirect, which is not followed"
            )
        if sent:
            return None
        return RetryableError(f"apprise: sending to {self._shown(target)} failed")

    @staticmethod
    def _shown(target: apprise.Apprise) -> str:
        return "; ".join(mask_target(server.url(privacy=True)).partition("?")[0]
                         for server in target)


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


def unguarded_schemes() -> frozenset[str]:
    """Every scheme of ``unguarded_plugins`` (for the docs and the tests)."""
    return frozenset().union(*unguarded_plugins().values())


def _scheme(address: str) -> str:
    return address.partition("://")[0].lower() if "://" in address else "?"
