"""The tables: Postgres is the source of truth for every notification.

The schema itself is owned by the Alembic migrations in ``migrations/``; these models
mirror it for queries and must change together with a new migration.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

Timestamp = Annotated[datetime, mapped_column(DateTime(timezone=True))]
CreatedAt = Annotated[
    datetime, mapped_column(DateTime(timezone=True), server_default=func.now())
]
JsonObject = Annotated[dict[str, Any], mapped_column(JSONB, server_default=text("'{}'"))]


class NotificationStatus(enum.StrEnum):
    PENDING = "pending"  # stored, waiting for its aggregation window
    DISPATCHED = "dispatched"  # has its delivery rows (critical ones at ingest)
    DIGESTED = "digested"  # folded into a digest
    DELIVERED = "delivered"
    SUPPRESSED = "suppressed"  # opted out / below minimum priority, with a reason
    CANCELLED = "cancelled"
    FAILED = "failed"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # written, its task not yet published (an outbox row)
    QUEUED = "queued"  # task published
    SENDING = "sending"
    SENT = "sent"
    RETRYING = "retrying"
    SCHEDULED = "scheduled"  # held until quiet hours end or the notification's send_at
    DEAD = "dead"  # parked in dead_letters
    CANCELLED = "cancelled"
    # What the provider said after it accepted the message (receipts, docs/receipts.md):
    # a receipt only moves a sent delivery forward (``notifier.pipeline.receipts``).
    DELIVERED = "delivered"  # the recipient's server or handset took it
    BOUNCED = "bounced"  # the address refused it for good (a hard bounce)
    COMPLAINED = "complained"  # the recipient marked it as spam
    UNDELIVERABLE = "undeliverable"  # the provider gave up on it (its "failed")
    #: Not attempted: the address is on the suppression list (``last_error`` says why).
    SUPPRESSED = "suppressed"


#: Delivery statuses that have not gone out yet and that no worker holds: a claim takes
#: them, cancel may too, and the partial index of due work (``ix_deliveries_due``) covers
#: exactly these.
UNSENT_DELIVERY_STATUSES: tuple[str, ...] = tuple(status.value for status in (
    DeliveryStatus.PENDING, DeliveryStatus.QUEUED, DeliveryStatus.RETRYING,
    DeliveryStatus.SCHEDULED,
))
#: Unsent, or in a worker's hands: a delivery not yet at its end (sent, dead, cancelled).
UNFINISHED_DELIVERY_STATUSES: tuple[str, ...] = (
    *UNSENT_DELIVERY_STATUSES, DeliveryStatus.SENDING.value,
)
#: The provider accepted it: ``sent``, and whatever its receipts said after.
SENT_DELIVERY_STATUSES: tuple[str, ...] = tuple(status.value for status in (
    DeliveryStatus.SENT, DeliveryStatus.DELIVERED, DeliveryStatus.BOUNCED,
    DeliveryStatus.COMPLAINED, DeliveryStatus.UNDELIVERABLE,
))
#: At its end: nothing will send it again by itself (retention may purge it).
FINISHED_DELIVERY_STATUSES: tuple[str, ...] = (
    *SENT_DELIVERY_STATUSES, DeliveryStatus.DEAD.value, DeliveryStatus.CANCELLED.value,
    DeliveryStatus.SUPPRESSED.value,
)


def sql_list(values: Iterable[str]) -> str:
    """``'a', 'b'``: the inside of an SQL ``IN (...)`` for our own constants (statuses),
    written into the statement so that Postgres matches it to a partial index as it
    would the literal text. Never for values from outside."""
    return ", ".join(f"'{value}'" for value in values)


class Stage(enum.StrEnum):
    INGEST = "ingest"
    AGGREGATE = "aggregate"
    DELIVER = "deliver"


def _values(enum_cls: type[enum.StrEnum]) -> str:
    return sql_list(member.value for member in enum_cls)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Recipient(Base):
    __tablename__ = "recipients"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(320))
    phone: Mapped[str | None] = mapped_column(String(32))
    timezone: Mapped[str] = mapped_column(String(64), server_default="UTC")
    locale: Mapped[str | None] = mapped_column(String(16))
    #: Channel name -> address (webhook URL, Slack URL, Apprise URL, ...).
    addresses: Mapped[JsonObject]
    #: channels, opted_out, min_priority, quiet_hours, digest_mode, digest_time.
    preferences: Mapped[JsonObject]
    created_at: Mapped[CreatedAt]
    updated_at: Mapped[CreatedAt]


class Notification(Base):
    __tablename__ = "notifications"
    __table_args__ = (
        CheckConstraint("priority IN ('critical', 'high', 'normal', 'low')", name="priority"),
        CheckConstraint(f"status IN ({_values(NotificationStatus)})", name="status"),
        # The flush and the status command look for waiting notifications by age.
        Index(
            "ix_notifications_pending", "created_at",
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_notifications_recipient_id_created_at", "recipient_id", "created_at"),
        Index("ix_notifications_created_at", "created_at"),  # `notifier stats`
        Index("ix_notifications_window_id", "window_id",
              postgresql_where=text("status = 'pending'")),
        Index(
            "ix_notifications_idempotency_key", "idempotency_key",
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        # Retention: a digest goes once no notification points at it (and its FK check).
        Index("ix_notifications_digest_id", "digest_id",
              postgresql_where=text("digest_id IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    #: A recipient's id, with no foreign key: ingest writes the recipient in the same
    #: transaction, and a trigger refuses deleting a recipient that still has
    #: notifications (migration 0015 says why: the key's check per row was the write's
    #: largest cost).
    recipient_id: Mapped[str] = mapped_column(String(255), nullable=False)
    type: Mapped[str] = mapped_column(String(64), nullable=False)
    priority: Mapped[str] = mapped_column(String(8), nullable=False)
    channels: Mapped[list[str] | None] = mapped_column(ARRAY(String(32)))
    title: Mapped[str] = mapped_column(Text, nullable=False)
    body: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    data: Mapped[JsonObject]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    send_at: Mapped[Timestamp | None]
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    status_reason: Mapped[str | None] = mapped_column(Text)
    digest_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("digests.id")
    )
    #: The aggregation window it waits in (status pending).
    window_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    #: When the producer handed it over, if the producer said (latency figures).
    enqueued_at: Mapped[Timestamp | None]
    #: When the ingest transaction wrote it (clock time, not transaction start).
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("clock_timestamp()")
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("clock_timestamp()")
    )
    #: Where each terminal status of its deliveries is POSTed (migration 0016,
    #: ``notifier.pipeline.callbacks``); None: nowhere.
    callback_url: Mapped[str | None] = mapped_column(Text)


class Digest(Base):
    __tablename__ = "digests"
    __table_args__ = (
        Index("ix_digests_recipient_id_created_at", "recipient_id", "created_at"),
        Index("ix_digests_created_at", "created_at"),  # retention
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    recipient_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("recipients.id"), nullable=False
    )
    type: Mapped[str] = mapped_column(String(64), nullable=False)
    channel: Mapped[str] = mapped_column(String(32), nullable=False)
    digest_key: Mapped[str | None] = mapped_column(String(255))
    title: Mapped[str] = mapped_column(Text, nullable=False)
    body: Mapped[str] = mapped_column(Text, nullable=False)
    html: Mapped[str | None] = mapped_column(Text)
    #: Every member's id, title, body and data: a digest holds all of them, no cap.
    items: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'"))
    item_count: Mapped[int] = mapped_column(Integer, nullable=False)
    notification_ids: Mapped[list[uuid.UUID]] = mapped_column(
        ARRAY(UUID(as_uuid=True)), nullable=False
    )
    window_start: Mapped[Timestamp]
    window_end: Mapped[Timestamp]
    created_at: Mapped[CreatedAt]


class AggregationWindow(Base):
    """An open group of notifications waiting to become one digest.

    Groups are (recipient, type, digest key); the digest key comes from a data field the
    type's rule names ("" when none). A window is ``closed`` once it holds its rule's
    maximum count (or found past its due time by ingest): it is then due, and new items
    open the next window. At most one window per group is not closed.
    """

    __tablename__ = "aggregation_windows"
    __table_args__ = (
        Index("ix_aggregation_windows_due_at", "due_at"),
        # One open window per group: concurrent batches meet here (migration 0008).
        Index("uq_aggregation_windows_open", "recipient_id", "type", "digest_key",
              unique=True, postgresql_where=text("NOT closed")),
        # The table is made with fillfactor 50 (migration 0008): upserts stay HOT.
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    recipient_id: Mapped[str] = mapped_column(String(255), nullable=False)
    type: Mapped[str] = mapped_column(String(64), nullable=False)
    digest_key: Mapped[str] = mapped_column(String(255), nullable=False, server_default="")
    mode: Mapped[str] = mapped_column(String(16), nullable=False)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    #: A sliding window never extends past this.
    latest_due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    item_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    max_count: Mapped[int] = mapped_column(Integer, nullable=False)
    closed: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))


class PreferencesGeneration(Base):
    """One row: bumped by triggers (migration 0009) in the transaction of any change to
    a recipient's preferences, time zone or name, so a worker's cached copy of them
    (``notifier.pipeline.routing.RecipientStates``) knows when to read them again."""

    __tablename__ = "preferences_generation"
    __table_args__ = (CheckConstraint("id", name="one_row"),)

    id: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default=text("true"))
    generation: Mapped[int] = mapped_column(BigInteger, nullable=False)


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        CheckConstraint(f"status IN ({_values(DeliveryStatus)})", name="status"),
        CheckConstraint(
            "(notification_id IS NOT NULL) <> (digest_id IS NOT NULL)", name="one_source"
        ),
        # At most one delivery per (notification, channel) and per (digest, channel).
        Index("uq_deliveries_notification_id_channel", "notification_id", "channel",
              unique=True, postgresql_where=text("notification_id IS NOT NULL")),
        Index("uq_deliveries_digest_id_channel", "digest_id", "channel",
              unique=True, postgresql_where=text("digest_id IS NOT NULL")),
        # The sweeper looks for work that is due: unsent rows by next attempt.
        Index("ix_deliveries_due", "next_attempt_at",
              postgresql_where=text(f"status IN ({sql_list(UNSENT_DELIVERY_STATUSES)})")),
        # `notifier stats`: what changed in a window, by status.
        Index("ix_deliveries_status_updated_at", "status", "updated_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    notification_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("notifications.id")
    )
    digest_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("digests.id")
    )
    recipient_id: Mapped[str] = mapped_column(String(255), nullable=False)
    channel: Mapped[str] = mapped_column(String(32), nullable=False)
    priority: Mapped[str] = mapped_column(String(8), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    #: While ``sending``: the key of the advisory lock its claimant holds (migration 0010).
    claim_key: Mapped[int | None] = mapped_column(BigInteger)
    #: Once sent: the channel's provider that sent it, ``<index>:<host>[:<port>]``
    #: (``notifier.channels.provider_name``; migration 0013).
    provider: Mapped[str | None] = mapped_column(String(100))
    queued_at: Mapped[Timestamp | None]
    sent_at: Mapped[Timestamp | None]
    #: When the provider's last receipt says its event happened (migration 0014).
    provider_status_at: Mapped[Timestamp | None]
    #: The provider's reason, as it said it (a bounce's SMTP answer), cut to 500.
    provider_detail: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[CreatedAt]
    updated_at: Mapped[CreatedAt]
    #: Its notification has a ``callback_url``: the trigger ``callback_event`` (migration
    #: 0016) writes a ``callbacks`` row when it reaches a finished status. Read by the
    #: trigger's ``WHEN`` alone, so other deliveries cost nothing.
    callback: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))


#: What a status callback is doing: waiting to be published (``pending``, written by the
#: trigger), published, being POSTed, waiting for its next attempt, done, or given up.
CALLBACK_STATES: tuple[str, ...] = ("pending", "queued", "sending", "retrying", "sent", "dead")
#: Callback states still moving: the sweeper's and the due index's.
UNFINISHED_CALLBACK_STATES: tuple[str, ...] = ("pending", "queued", "sending", "retrying")


class Callback(Base):
    """One status of one delivery, to POST to its notification's ``callback_url``
    (``notifier.pipeline.callbacks``): written by the trigger ``callback_event`` in the
    transaction that set the status, at most once per (delivery, status)."""

    __tablename__ = "callbacks"
    __table_args__ = (
        CheckConstraint(f"state IN ({sql_list(CALLBACK_STATES)})", name="state"),
        Index("uq_callbacks_delivery_id_status_notification_id", "delivery_id", "status",
              "notification_id", unique=True),
        Index("ix_callbacks_due", "next_attempt_at",
              postgresql_where=text(f"state IN ({sql_list(UNFINISHED_CALLBACK_STATES)})")),
        Index("ix_callbacks_updated_at", "updated_at"),  # retention
    )

    #: The event's id: the receiver's key to drop a repeat (``Idempotency-Key``).
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    notification_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    channel: Mapped[str] = mapped_column(String(32), nullable=False)
    #: The delivery's status this event reports.
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    #: The provider's detail or our last error, as the delivery had it (500 characters).
    detail: Mapped[str | None] = mapped_column(String(500))
    url: Mapped[str] = mapped_column(Text, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    occurred_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("clock_timestamp()")
    )
    sent_at: Mapped[Timestamp | None]
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class CallbackSecret(Base):
    """The signing secret of one callback receiver, by origin (``scheme://host:port``):
    ``notifier.storage.callback_secrets``."""

    __tablename__ = "callback_secrets"

    origin: Mapped[str] = mapped_column(String(300), primary_key=True)
    secret: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[CreatedAt]


class Suppression(Base):
    """An address a channel no longer sends to (``notifier.pipeline.suppressions``):
    a hard bounce, a complaint, too many soft bounces, or an operator said so."""

    __tablename__ = "suppressions"
    __table_args__ = (
        Index("uq_suppressions_channel_address", "channel", "address", unique=True),
        Index("ix_suppressions_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(32), nullable=False)
    #: Normalized (``suppressions.normalize``): what a delivery's address is matched as.
    address: Mapped[str] = mapped_column(String(320), nullable=False)
    reason: Mapped[str] = mapped_column(String(500), nullable=False)
    #: What put it there: ``bounce``, ``complaint``, ``soft-bounces``, ``manual``.
    source: Mapped[str] = mapped_column(String(32), nullable=False)
    #: The delivery whose receipt did it (None when added by hand).
    delivery_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    created_at: Mapped[CreatedAt]


class SoftBounce(Base):
    """One soft bounce per delivery, kept for ``suppression_soft_bounce_window``: enough
    of them for one address within the window suppress it. Keyed by delivery, so a
    replayed or retried event counts once."""

    __tablename__ = "soft_bounces"
    __table_args__ = (
        Index("ix_soft_bounces_channel_address_at", "channel", "address", "at"),
        Index("ix_soft_bounces_at", "at"),
    )

    delivery_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), nullable=False)
    address: Mapped[str] = mapped_column(String(320), nullable=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    __table_args__ = (
        Index("ix_dead_letters_stage_created_at", "stage", "created_at"),
        Index("ix_dead_letters_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    #: Makes a redelivered message's rejection a no-op instead of a second row.
    dedup_key: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    stage: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    error_class: Mapped[str | None] = mapped_column(String(128))
    channel: Mapped[str | None] = mapped_column(String(32))
    type: Mapped[str | None] = mapped_column(String(64))
    notification_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    delivery_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    #: The original message (ingest) or the delivery's content (deliver); at most
    #: ``dead_letter_payload_bytes`` of its JSON (then a JSON string of that prefix).
    payload: Mapped[Any] = mapped_column(JSONB, nullable=False)
    #: Size in bytes and SHA-256 of the original payload's JSON (NULL: not recorded).
    payload_bytes: Mapped[int | None] = mapped_column(BigInteger)
    payload_sha256: Mapped[str | None] = mapped_column(String(64))
    #: ``payload`` holds only a prefix of the original: it cannot be replayed.
    payload_truncated: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default="false"
    )
    replayed_at: Mapped[Timestamp | None]
    created_at: Mapped[CreatedAt]


class IdempotencyKey(Base):
    """Keys seen within the dedup window, the first notification's id, and repeats."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_expires_at", "expires_at"),)

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    notification_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    duplicates: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    created_at: Mapped[CreatedAt]


class InboxMessage(Base):
    """What the in-app channel delivered: a recipient's inbox.

    A message's state is its most advanced stamp (``notifier.pipeline.inbox``): unread,
    seen, read, archived; reading also stamps ``seen_at`` and archiving ``read_at``."""

    __tablename__ = "inbox_messages"
    __table_args__ = (
        Index("ix_inbox_messages_recipient_id_created_at", "recipient_id", "created_at"),
        Index(
            "ix_inbox_messages_unread", "recipient_id", "created_at",
            postgresql_where=text("read_at IS NULL"),
        ),
        # The default page, all but archived (migration 0011).
        Index(
            "ix_inbox_messages_unarchived", "recipient_id", "created_at",
            postgresql_where=text("archived_at IS NULL"),
        ),
        # Retention: read messages by when they were read.
        Index("ix_inbox_messages_read_at", "read_at", postgresql_where=text("read_at IS NOT NULL")),
    )

    #: The delivery's id: writing the same delivery twice is a no-op.
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    recipient_id: Mapped[str] = mapped_column(String(255), nullable=False)
    notification_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    digest_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    type: Mapped[str] = mapped_column(String(64), nullable=False)
    priority: Mapped[str] = mapped_column(String(8), nullable=False)
    title: Mapped[str] = mapped_column(Text, nullable=False)
    body: Mapped[str] = mapped_column(Text, nullable=False)
    data: Mapped[JsonObject]
    seen_at: Mapped[Timestamp | None]
    read_at: Mapped[Timestamp | None]
    archived_at: Mapped[Timestamp | None]
    created_at: Mapped[CreatedAt]


class WebhookSecret(Base):
    """A webhook receiver's own signing secret (``notifier.storage.webhook_secrets``).

    ``previous_secret`` still signs requests, beside ``secret``, until
    ``previous_valid_until``: the overlap in which the receiver switches.
    """

    __tablename__ = "webhook_secrets"

    recipient_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("recipients.id", ondelete="CASCADE"), primary_key=True
    )
    secret: Mapped[str] = mapped_column(Text, nullable=False)
    previous_secret: Mapped[str | None] = mapped_column(Text)
    previous_valid_until: Mapped[Timestamp | None]
    created_at: Mapped[CreatedAt]
    rotated_at: Mapped[Timestamp | None]


class ApiKey(Base):
    """A key of the HTTP API (``notifier.storage.api_keys``): only its SHA-256 is kept."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_prefix", "prefix"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    #: The key's first characters, not secret: finds the row, tells keys apart.
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String(16)), nullable=False)
    #: Requests per minute; None: ``NOTIFIER_API_RATE_LIMIT_PER_MINUTE``.
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    #: The ``callback_url`` the HTTP API gives a notification of this key that names
    #: none (migration 0016).
    callback_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[CreatedAt]
    revoked_at: Mapped[Timestamp | None]
    #: Written at most once a minute per key (``api_keys.touch``).
    last_used_at: Mapped[Timestamp | None]
