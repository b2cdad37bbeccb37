"""The accounting: what became of every accepted notification, read from Postgres and
from what the SMTP server received.

For each accepted id and each channel it should reach (its ``channels``):

* **sent** — a ``sent`` delivery of the notification on that channel, or a ``sent``
  delivery of a digest on that channel that lists it;
* **dead** — no sent one, but a ``dead`` delivery with its ``dead_letters`` row.

A notification is **delivered** when every channel is sent, **suppressed** when it is
stored as ``suppressed`` with a reason, **dead-lettered** when every channel is sent or
dead and one is dead, and **lost** otherwise (not stored at all, or a channel with
neither outcome once the pipeline has drained).

**Recorded twice** counts (notification, channel) pairs with more than one ``sent``
record (direct and digest together) or listed in more than one digest. **Sent twice to
the server** counts e-mails the SMTP server accepted more than once for one delivery
(the delivery id is in the ``Message-ID``): the design allows that after a crash, since
the resend carries the same idempotency key. **Sent, not received** counts deliveries
recorded as sent that the server (or the inbox) never got.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from chaos.traffic import DEAD, DELIVER, SUPPRESS, Accepted

_MESSAGE_ID = re.compile(r"<([0-9a-fA-F-]{36})@notifier>")


@dataclass
class Tally:
    accepted: int = 0
    delivered: int = 0
    suppressed: int = 0
    dead_lettered: int = 0
    lost: int = 0
    recorded_twice: int = 0
    sent_twice_to_server: int = 0
    sent_not_received: int = 0
    received_not_recorded_sent: int = 0
    #: Outcomes other than the plan's (e.g. dead-lettered though it should be delivered).
    unexpected: dict[str, int] = field(default_factory=dict)
    #: Where the lost ones are stuck: "not stored", "email: retrying", ...
    lost_reasons: dict[str, int] = field(default_factory=dict)
    #: The lost ones: id and when they were accepted (epoch seconds), the first 50.
    lost_sample: list[dict[str, Any]] = field(default_factory=list)
    lost_accepted_at: list[float] = field(default_factory=list)
    digests: int = 0
    emails_received: int = 0
    #: Delivery ids the SMTP server received more than once (the first 20).
    sent_twice_sample: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data.pop("lost_accepted_at")
        return data


def received_delivery_ids(message_ids: Iterable[str]) -> Counter[str]:
    """Delivery ids from the ``Message-ID`` headers the SMTP server received."""
    found: Counter[str] = Counter()
    for value in message_ids:
        match = _MESSAGE_ID.search(value or "")
        if match:
            found[match.group(1).lower()] += 1
    return found


def smtp_message_ids(smtp: Any) -> list[str]:
    return [str(message["Message-ID"]) for message in smtp.messages]


def tally(
    conn: psycopg.Connection[Any], accepted: Sequence[Accepted], smtp_ids: Iterable[str]
) -> Tally:
    """Account for every accepted notification (see the module's docstring)."""
    result = Tally(accepted=len(accepted))
    ids = [a.item.id for a in accepted]
    notifications = {
        str(row[0]): (row[1], row[2])
        for row in conn.execute(
            "SELECT id, status, status_reason FROM notifications WHERE id = ANY(%s::uuid[])",
            (ids,),
        )
    }
    deliveries = conn.execute(
        "SELECT id, notification_id, digest_id, channel, status FROM deliveries"
    ).fetchall()
    direct: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    of_digest: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    status_of: dict[str, tuple[str, str]] = {}
    for delivery_id, notification_id, digest_id, channel, status in deliveries:
        entry = (str(delivery_id), status)
        status_of[str(delivery_id)] = (channel, status)
        if notification_id is not None:
            direct[(str(notification_id), channel)].append(entry)
        else:
            of_digest[(str(digest_id), channel)].append(entry)
    members: dict[tuple[str, str], list[str]] = defaultdict(list)
    for digest_id, channel, member_ids in conn.execute(
        "SELECT id, channel, notification_ids FROM digests"
    ):
        result.digests += 1
        for member in member_ids:
            members[(str(member), channel)].append(str(digest_id))
    dead_lettered = {
        str(row[0]) for row in conn.execute(
            "SELECT delivery_id FROM dead_letters WHERE stage = 'deliver'"
            " AND delivery_id IS NOT NULL"
        )
    }
    inbox = {str(row[0]) for row in conn.execute("SELECT id FROM inbox_messages")}

    unexpected: Counter[str] = Counter()
    lost_reasons: Counter[str] = Counter()
    for item in accepted:
        outcome, why = _outcome(item, notifications, direct, of_digest, members,
                                dead_lettered, result)
        if outcome == "lost":
            result.lost += 1
            lost_reasons[why] += 1
            result.lost_accepted_at.append(item.at)
            if len(result.lost_sample) < 50:
                result.lost_sample.append({"id": item.item.id, "index": item.item.index,
                                           "accepted_at": item.at, "why": why})
        else:
            setattr(result, outcome, getattr(result, outcome) + 1)
        expected = {DELIVER: "delivered", SUPPRESS: "suppressed", DEAD: "dead_lettered"}
        if outcome != expected[item.item.expect]:
            unexpected[f"{expected[item.item.expect]} -> {outcome}"] += 1

    received = received_delivery_ids(smtp_ids)
    result.emails_received = sum(received.values())
    result.sent_twice_to_server = sum(count - 1 for count in received.values() if count > 1)
    result.sent_twice_sample = [d for d, count in received.items() if count > 1][:20]
    for delivery_id, (channel, status) in status_of.items():
        if status != "sent":
            continue
        if (channel == "email" and delivery_id not in received) or (
            channel == "inapp" and delivery_id not in inbox
        ):
            result.sent_not_received += 1
    result.received_not_recorded_sent = sum(
        1 for delivery_id in received if status_of.get(delivery_id, ("", ""))[1] != "sent"
    )
    result.unexpected = dict(unexpected)
    result.lost_reasons = dict(lost_reasons)
    return result


def _outcome(
    accepted: Accepted,
    notifications: dict[str, tuple[str, str | None]],
    direct: dict[tuple[str, str], list[tuple[str, str]]],
    of_digest: dict[tuple[str, str], list[tuple[str, str]]],
    members: dict[tuple[str, str], list[str]],
    dead_lettered: set[str],
    result: Tally,
) -> tuple[str, str]:
    """("delivered" | "suppressed" | "dead_lettered" | "lost", why if lost)."""
    item = accepted.item
    stored = notifications.get(item.id)
    if stored is None:
        return "lost", "not stored"
    status, reason = stored
    if status == "suppressed" and reason:
        return "suppressed", ""
    outcomes = []
    for channel in item.channels:
        digests = members.get((item.id, channel), [])
        records = direct.get((item.id, channel), []) + [
            entry for digest_id in digests for entry in of_digest.get((digest_id, channel), [])
        ]
        sent = [delivery_id for delivery_id, state in records if state == "sent"]
        if len(sent) > 1 or len(digests) > 1:
            result.recorded_twice += 1
        if sent:
            outcomes.append("sent")
        elif any(state == "dead" and d in dead_lettered for d, state in records):
            outcomes.append("dead")
        else:
            states = sorted({state for _, state in records}) or [f"notification {status}"]
            return "lost", f"{channel}: {'/'.join(states)}"
    return ("delivered" if all(o == "sent" for o in outcomes) else "dead_lettered"), ""


def unfinished(conn: psycopg.Connection[Any], ids: Sequence[str]) -> dict[str, int]:
    """What is still moving: accepted ids not stored, notifications waiting in a
    window, deliveries not yet sent or dead. All zero: the pipeline has drained."""
    row = conn.execute(
        """
        SELECT
          (SELECT count(*) FROM unnest(%s::uuid[]) AS a(id)
            WHERE NOT EXISTS (SELECT 1 FROM notifications n WHERE n.id = a.id)),
          (SELECT count(*) FROM notifications WHERE status = 'pending'),
          (SELECT count(*) FROM deliveries
            WHERE status IN ('pending', 'queued', 'sending', 'retrying', 'scheduled')),
          (SELECT count(*) FROM deliveries WHERE status = 'sent'),
          (SELECT count(*) FROM dead_letters)
        """,
        (list(ids),),
    ).fetchone()
    assert row is not None
    return {"not_stored": row[0], "waiting_in_window": row[1], "deliveries_unfinished": row[2],
            "deliveries_sent": row[3], "dead_letters": row[4]}
