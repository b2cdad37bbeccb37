"""`notifier dead-letters purge|list` filters and confirmation, and `notifier inbox`."""

from __future__ import annotations

import json
import uuid

from notifier.storage.db import session_scope
from tests.ops.test_cli import run
from tests.workers import count_rows


def add_dead_letters(*rows: tuple[str, str | None]) -> None:
    """Dead letters of (stage, channel), as the pipeline writes them."""
    with session_scope() as session:
        for stage, channel in rows:
            session.connection().exec_driver_sql(
                "INSERT INTO dead_letters (dedup_key, stage, reason, channel, type, payload)"
                " VALUES (%s, %s, 'broken', %s, 'alert', '{}')",
                (uuid.uuid4().hex, stage, channel),
            )


def test_purge_asks_first_and_keeps_everything_when_refused():
    add_dead_letters(("deliver", "email"), ("ingest", None))
    result = run("dead-letters", "purge", stdin="n\n")
    assert result.returncode == 1 and "delete 2 dead letters for good?" in result.stdout
    assert count_rows("SELECT count(*) FROM dead_letters") == 2


def test_purge_with_yes_deletes_only_what_the_filters_match():
    add_dead_letters(("deliver", "email"), ("deliver", "webhook"), ("ingest", None))
    result = run("dead-letters", "purge", "--stage", "deliver", "--channel", "email", "--yes")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "purged 1 dead letters"
    listing = run("dead-letters", "list", "--json")
    assert sorted(row["stage"] for row in json.loads(listing.stdout)) == ["deliver", "ingest"]


def test_replay_with_nothing_matching_says_so():
    result = run("dead-letters", "replay", "--channel", "sms", "--yes")
    assert result.returncode == 0 and "no dead letters to replay" in result.stdout


def test_replay_refuses_a_dead_letter_that_kept_only_a_prefix():
    """Replaying a cut payload would send a fragment: the command names it and sends nothing."""
    with session_scope() as session:
        session.connection().exec_driver_sql(
            "INSERT INTO dead_letters (dedup_key, stage, reason, type, payload, payload_bytes,"
            " payload_truncated) VALUES ('cut', 'ingest', 'too big', 'alert',"
            " '\"{\\\"recip\"', 50000000, true)"
        )
    result = run("dead-letters", "replay", "--yes")
    assert result.returncode == 0, result.stderr
    assert "not replayed: only a prefix of its 50000000-byte payload was kept" in result.stderr
    assert "1 refused" in result.stdout
    assert count_rows("SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL") == 1


def test_inbox_lists_unread_and_marks_read():
    from notifier.channels.base import OutgoingMessage
    from notifier.channels.inapp import InAppChannel

    messages = [
        OutgoingMessage(uuid.uuid4(), "user-1", None, "alert", "high", f"Title {i}", "body")
        for i in range(3)
    ]
    assert all(result.sent for result in InAppChannel("inapp://").send_batch(messages))
    listing = run("inbox", "list", "user-1", "--json")
    assert len(json.loads(listing.stdout)) == 3
    first = str(messages[0].delivery_id)
    assert run("inbox", "read", "user-1", first).stdout.strip() == "marked 1 messages read"
    assert "Title 0" not in run("inbox", "list", "user-1").stdout
    assert "Title 0" in run("inbox", "list", "user-1", "--all").stdout
    assert run("inbox", "read", "user-2", "--all").stdout.strip() == "marked 0 messages read"
    assert run("inbox", "read", "user-1", "--all").stdout.strip() == "marked 2 messages read"
    refused = run("inbox", "read", "user-1", "not-a-uuid")
    assert refused.returncode == 2 and "message id: not a UUID" in refused.stderr


def test_inbox_states_counts_and_pages():
    """`inbox seen|archive|counts` move messages forward and count them; `list` marks
    each line with its state and pages with --cursor; a bad cursor is one usage line."""
    from notifier.channels.base import OutgoingMessage
    from notifier.channels.inapp import InAppChannel

    messages = [
        OutgoingMessage(uuid.uuid4(), "user-3", None, "alert", "high", f"Title {i}", "body")
        for i in range(3)
    ]
    assert all(result.sent for result in InAppChannel("inapp://").send_batch(messages))
    first, second = str(messages[0].delivery_id), str(messages[1].delivery_id)
    assert run("inbox", "seen", "user-3", first).stdout.strip() == "marked 1 messages seen"
    assert run("inbox", "archive", "user-3", second).stdout.strip() == (
        "marked 1 messages archived")
    assert run("inbox", "seen", "user-3", second).stdout.strip() == "marked 0 messages seen"
    assert json.loads(run("inbox", "counts", "user-3", "--json").stdout) == {
        "unread": 1, "seen": 1, "read": 0, "archived": 1}
    assert run("inbox", "counts", "user-3").stdout.strip() == (
        "unread 1  seen 1  read 0  archived 1")
    listing = run("inbox", "list", "user-3", "--all", "--archived", "--limit", "2").stdout
    lines = listing.splitlines()
    assert len(lines) == 3 and lines[-1].startswith("next: --cursor ")
    rest = run("inbox", "list", "user-3", "--all", "--archived", "--cursor",
               lines[-1].split()[-1]).stdout.splitlines()
    assert len(rest) == 1
    assert {line[0] for line in lines[:2] + rest} == {"*", "+", "a"}
    refused = run("inbox", "list", "user-3", "--cursor", "garbage")
    assert refused.returncode == 2 and "cursor: not a cursor" in refused.stderr


def test_sending_the_same_inbox_delivery_twice_keeps_one_message():
    from notifier.channels.base import OutgoingMessage
    from notifier.channels.inapp import InAppChannel
    from notifier.records import inbox

    message = OutgoingMessage(uuid.uuid4(), "user-1", None, "alert", "high", "Once", "")
    for _ in range(2):
        list(InAppChannel("inapp://").send_batch([message]))
    assert [m["title"] for m in inbox("user-1")] == ["Once"]


def test_dead_letters_print_addresses_as_recipients_show_does():
    """`dead-letters list|show` print a rejected message's recipient addresses masked
    exactly as `recipients show` prints the same addresses, and reasons masked too."""
    token, password = "T0kenInThePathAbcdef123", "it's@secret"
    addresses = {"webhook": f"https://hooks.example.com/services/T000/B000/{token}",
                 "apprise": f"mailto://ops:{password}@mail.example.com"}
    payload = {"recipient": {"id": "dl-1", "email": "dl-1@example.com", "addresses": addresses},
               "type": "alert", "title": "t", "data": {"api_key": "k-123"}}
    with session_scope() as session:
        session.connection().exec_driver_sql(
            "INSERT INTO dead_letters (dedup_key, stage, reason, type, payload)"
            " VALUES ('k', 'ingest', %s, 'alert', %s)",
            (f"cannot reach {addresses['apprise']}", json.dumps(payload)),
        )
    assert run("recipients", "set", "dl-1", "--email", "dl-1@example.com",
               *(f"--address={c}={a}" for c, a in addresses.items())).returncode == 0
    [row] = json.loads(run("dead-letters", "list", "--json").stdout)
    shown = json.loads(run("dead-letters", "show", str(row["id"])).stdout)
    recipient = json.loads(run("recipients", "show", "dl-1", "--json").stdout)
    listing = run("dead-letters", "list").stdout
    for output in (json.dumps(row), json.dumps(shown), json.dumps(recipient), listing):
        assert token not in output and password not in output and "k-123" not in output
    assert shown == row
    assert shown["payload"]["recipient"]["addresses"] == recipient["addresses"] == {
        "webhook": "https://hooks.example.com/services/T000/B000/***",
        "apprise": "mailto://ops:***@mail.example.com"}
    assert shown["payload"]["recipient"]["email"] == recipient["email"] == "dl-1@example.com"
    assert shown["reason"] == "cannot reach mailto://ops:***@mail.example.com"
    assert shown["payload"]["data"] == {"api_key": "***"}
