"""Delivery channels.

Each channel will be a plugin module here behind one base class. The names are part of
the public contract already: a notification may ask for them, and ingest rejects a name
that no channel answers to.
"""

CHANNEL_NAMES: frozenset[str] = frozenset(
    {"email", "webhook", "inapp", "slack", "apprise", "sms", "console"}
)
