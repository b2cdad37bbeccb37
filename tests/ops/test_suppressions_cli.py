"""`notifier suppressions`: list with filters (and --json), add, remove; bad input is one
line and exit code 2, never a traceback."""

from __future__ import annotations

import json

from tests.ops.test_cli import run


def test_add_list_filter_and_remove() -> None:
    added = run("suppressions", "add", "email", " Grace@Example.COM ", "--reason", "asked us")
    assert added.returncode == 0 and added.stdout.strip() == (
        "suppressed grace@example.com on email")
    assert "was already suppressed" in run("suppressions", "add", "email",
                                           "grace@example.com").stdout
    assert run("suppressions", "add", "sms", "+1 (555) 000-1111").returncode == 0
    hook = "https://hooks.example.com/in?token=hunter22secret"
    assert run("suppressions", "add", "webhook", hook).returncode == 0

    listed = run("suppressions", "list")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 3
    assert "hunter22secret" not in listed.stdout  # URLs masked as recipients show masks them
    entries = json.loads(run("suppressions", "list", "--channel", "email", "--json").stdout)
    assert [(e["address"], e["reason"], e["source"]) for e in entries] == [
        ("grace@example.com", "asked us", "manual")]
    assert json.loads(run("suppressions", "list", "--address", "5550001111", "--json"
                          ).stdout)[0]["address"] == "+15550001111"
    assert run("suppressions", "list", "--source", "bounce").stdout.strip() == "no suppressions"

    assert run("suppressions", "remove", "sms", "+15550001111").returncode == 0
    gone = run("suppressions", "remove", "sms", "+15550001111")
    assert gone.returncode == 1 and gone.stderr.startswith("error: ")


def test_bad_input_is_one_line() -> None:
    for args in (("add", "email", "a\nb"), ("add", "email", "x" * 400),
                 ("add", "email", "ok@example.com", "--reason", ""),
                 ("add", "pigeon", "x"), ("list", "--limit", "0")):
        result = run("suppressions", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
