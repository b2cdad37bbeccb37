"""The one interface every channel plugin implements.

A channel is configured by one URL (Apprise-style: the scheme picks the plugin, the
rest carries host, credentials and options), or by several (its providers, each an
instance of the plugin), sends a list of messages over one
connection, and says per message whether it was sent, may be retried, or failed for
good. Everything else (claiming deliveries, the circuit breaker, rate limits, retries,
dead letters) lives in ``notifier.pipeline.delivery`` and is the same for every channel.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from notifier.settings import mask_url


class DeliveryError(Exception):
    """Why one message was not sent. The message is one line, safe to show and store.

    Whose problem it is decides what happens to the delivery (``notifier.pipeline.delivery``):

    * the recipient's (``PermanentError``, ``AddressError``; a ``RetryableError`` from a
      recipient's own endpoint): that delivery alone fails or is retried;
    * the provider's (a ``RetryableError`` from our SMTP server or Twilio): retried, and
      counted towards the channel's circuit breaker;
    * ours (``ConfigurationError``): held, never dead-lettered, until the operator acts.
    """

    #: Counts towards the channel's circuit breaker (the provider, not the address, failed).
    provider_failure: bool = True


class RetryableError(DeliveryError):
    """A failure that may pass on a later attempt: timeouts, connection errors, SMTP 4xx,
    HTTP 5xx and 429."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: Seconds the provider asked us to wait (HTTP ``Retry-After``), if it said.
        self.retry_after = retry_after


class PermanentError(DeliveryError):
    """A failure no retry can fix: SMTP 5xx, HTTP 4xx, a message the provider refuses."""

    provider_failure = False


class AddressError(PermanentError):
    """The recipient's address is unusable on this channel (malformed, not encodable, or
    needing an extension the server lacks): that delivery is dead, nothing else is."""


class ConfigurationError(DeliveryError):
    """Our own configuration is wrong: a channel URL that does not parse, a channel that is
    not configured, credentials or a sender the provider refuses.

    Raised by a channel's constructor, the URL is refused when a process starts (see
    ``notifier.channels.check_channel_urls``). Found while sending, it is never the
    recipient's fault: the delivery is held (no attempt counted, so a fix lets it go out)
    and counts towards the channel's circuit; it is logged as an error and never
    dead-lettered.
    """

    provider_failure = True


@dataclass(frozen=True)
class OutgoingMessage:
    """One delivery's content, as the channel sends it.

    ``delivery_id`` doubles as the idempotency key the channel passes on (webhook
    ``Idempotency-Key``, e-mail ``Message-ID``) so a resent message can be recognised.
    """

    delivery_id: uuid.UUID
    recipient_id: str
    #: The recipient's address on this channel (e-mail, webhook URL, phone, ...).
    address: str | None
    type: str
    priority: str
    title: str
    body: str
    data: dict[str, Any] = field(default_factory=dict)
    #: HTML body when the content has one (digests rendered from templates).
    html: str | None = None
    recipient_name: str | None = None
    notification_id: uuid.UUID | None = None
    digest_id: uuid.UUID | None = None

    @property
    def idempotency_key(self) -> str:
        return str(self.delivery_id)


@dataclass(frozen=True)
class SendResult:
    """The outcome of one message: ``error`` is None when it was sent."""

    delivery_id: uuid.UUID
    error: DeliveryError | None = None

    @property
    def sent(self) -> bool:
        return self.error is None


#: URL options a channel may use to override its retry policy
#: (``notifier.pipeline.retry.RetryPolicy``): providers differ in how long they need.
RETRY_OPTIONS = ("retry_base", "retry_factor", "retry_cap", "retry_max_attempts")


def retry_overrides(options: Mapping[str, str]) -> dict[str, float]:
    """The ``retry_*`` options a channel URL sets, as numbers. Checked when the channel is
    built, so a typo stops the start naming the option instead of failing a retry later."""
    values: dict[str, float] = {}
    for option in RETRY_OPTIONS:
        raw = options.get(option)
        if raw is None:
            continue
        try:
            values[option] = float(raw)
        except ValueError:
            raise ValueError(f"option {option}: expected a number, got {raw!r}") from None
        if values[option] <= 0:
            raise ValueError(f"option {option}: must be above 0, got {raw!r}")
    return values


class Channel:
    """Base class of the channel plugins; subclasses register themselves by ``name``.

    One instance lives per worker process and channel and may keep a connection (an
    SMTP session, an HTTP pool) open across batches; ``close`` releases it.
    """

    #: The channel's name in notifications and preferences ("email", "webhook", ...).
    name: ClassVar[str]
    #: URL schemes that configure this channel.
    schemes: ClassVar[tuple[str, ...]]
    #: The recipient column or ``addresses`` key that holds the address; None: none needed.
    address_field: ClassVar[str | None] = None
    #: Whether every message goes to the provider's server (our SMTP relay, Twilio) or,
    #: False, to an endpoint each recipient controls (a webhook or Slack URL): then a
    #: failing endpoint is that recipient's problem, not the channel's (``endpoint``).
    target_is_provider: ClassVar[bool] = True
    #: Whether the channel's variable may list several providers, in order of
    #: preference, to fail over between (``notifier.channels.get_providers``): where every
    #: message goes to one provider's server that another can stand in for.
    has_providers: ClassVar[bool] = False

    registry: ClassVar[dict[str, type[Channel]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            Channel.registry[cls.name] = cls

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in self.schemes:
            raise ConfigurationError(
                f"{self.name}: expected a {' or '.join(s + '://' for s in self.schemes)}"
                f" URL, got {mask_url(url)!r}"
            )
        self.url = url
        self.parts = parts
        self.options = {key: values[-1] for key, values in parse_qs(parts.query).items()}

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> Iterator[SendResult]:
        """Send the messages over one connection, yielding each result as soon as it is
        known, so the caller records a sent message before the next one leaves.

        Results come one per message, in the order of ``messages``: when the generator
        raises instead, the caller blames the first message not yet answered, fails it
        alone, closes the channel (``close``) and sends the rest in a new call.
        """
        raise NotImplementedError

    def endpoint(self, message: OutgoingMessage) -> str | None:
        """The recipient-controlled endpoint the message goes to (``https://host:443``),
        whose failures back off on a circuit of its own; None where every message goes to
        the provider (``target_is_provider``), whose failures are the channel's.

        Never raises: a target too malformed to name is refused by ``send_batch``.
        """
        if self.target_is_provider:
            return None
        return endpoint_of(message.address)

    def close(self) -> None:
        """Release any connection kept between batches."""

    def option(self, key: str, default: str) -> str:
        return self.options.get(key, default)

    def flag(self, key: str, default: bool) -> bool:
        value = self.options.get(key)
        if value is None:
            return default
        if value.lower() in ("1", "yes", "true", "on"):
            return True
        if value.lower() in ("0", "no", "false", "off"):
            return False
        raise ConfigurationError(f"{self.name}: option {key}: expected yes or no, got {value!r}")

    def number(self, key: str, default: float) -> float:
        value = self.options.get(key)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise ConfigurationError(
                f"{self.name}: option {key}: expected a number, got {value!r}"
            ) from None

    @property
    def masked_url(self) -> str:
        """The URL as it may be logged: no password, no secret options."""
        return mask_url(self.url)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.masked_url}>"


def endpoint_of(url: str | None) -> str | None:
    """``scheme://host:port`` of an http(s) URL, lower case with the default port filled
    in; None for anything else (never raises, whatever the input)."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in ("http", "https") or not host:
        return None
    port = port or (443 if scheme == "https" else 80)
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}"
