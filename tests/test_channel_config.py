"""Configuration errors stop the process, not the notifications (issue 10, finding 5).

Every channel URL is checked when a worker, beat or ``notifier`` command starts; the
built-in defaults pass; and a mistake only found while sending (a refused SMTP login)
holds deliveries instead of dead-lettering them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from notifier.channels import check_channel_urls, close_channels
from notifier.channels.email import EmailChannel
from notifier.pipeline.delivery import circuit_breaker, deliver_batch
from notifier.settings import DEFAULT_CHANNEL_URLS, ConfigError, Settings, get_settings
from notifier.storage.state import state_redis
from tests.http_server import http_server_fixture  # noqa: F401
from tests.pipeline.test_delivery_isolation import make_due, rows, seed
from tests.smtp_server import SmtpServer
from tests.workers import ROOT, count_rows

BAD_EMAIL = "smtp://h?from=x"
BAD_EMAIL_LINE = "error: NOTIFIER_CHANNELS__EMAIL: option from: not a single e-mail address: 'x'"
CELERY = str(Path(sys.executable).with_name("celery"))
NOTIFIER = str(Path(sys.executable).with_name("notifier"))


@pytest.fixture(autouse=True)
def _fresh_channels():
    close_channels()
    yield
    close_channels()


def settings_with(**overrides: Any) -> Settings:
    channels = {**get_settings().channels, **overrides.pop("channels", {})}
    return get_settings().model_copy(update={"channels": channels, **overrides})


# --- The start-up check ----------------------------------------------------------------


def test_the_built_in_defaults_pass_the_start_up_check():
    check_channel_urls(Settings(channels={}))
    assert EmailChannel(DEFAULT_CHANNEL_URLS["email"]).sender.addr_spec


def test_a_bad_channel_url_is_one_line_naming_the_variable():
    with pytest.raises(ConfigError) as error:
        check_channel_urls(settings_with(channels={"email": BAD_EMAIL}))
    assert f"error: {error.value}" == BAD_EMAIL_LINE


@pytest.mark.parametrize(("name", "url", "expected"), [
    ("sms", "twilio://only-a-sid@api.twilio.com", "NOTIFIER_CHANNELS__SMS: expected twilio://"),
    ("webhook", "webhook://?timeout=0", "NOTIFIER_CHANNELS__WEBHOOK: option timeout:"),
    ("email", "smtp://h:99999?from=a%40b.example", "NOTIFIER_CHANNELS__EMAIL: option port:"),
    ("email", "http://h?from=a%40b.example", "NOTIFIER_CHANNELS__EMAIL: expected a smtp://"),
    ("pager", "pager://", "NOTIFIER_CHANNELS__PAGER: no such channel"),
    ("email", "smtp://u:hunter2@[::1?from=a%40b.example", "NOTIFIER_CHANNELS__EMAIL: Invalid"),
    ("email", "smtp://u:hunter2@h:99999?from=a%40b.example", "NOTIFIER_CHANNELS__EMAIL: option"),
])
def test_every_configured_channel_is_checked(name, url, expected):
    with pytest.raises(ConfigError) as error:
        check_channel_urls(settings_with(channels={name: url}))
    assert str(error.value).startswith(expected)
    assert "\n" not in str(error.value) and "hunter2" not in str(error.value)


def _run(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "NOTIFIER_CHANNELS__EMAIL": BAD_EMAIL},
    )


@pytest.mark.parametrize("program", ["worker", "beat", "status"])
def test_worker_beat_and_commands_stop_at_start_with_one_line(program, tmp_path):
    command = {
        "worker": [CELERY, "-A", "notifier", "worker", "--pool", "solo"],
        "beat": [CELERY, "-A", "notifier", "beat", "-s", str(tmp_path / "schedule")],
        "status": [NOTIFIER, "status"],
    }[program]
    result = _run(command, tmp_path)
    assert result.returncode != 0
    assert BAD_EMAIL_LINE in result.stderr.splitlines()
    assert "Traceback" not in result.stderr


def test_notifier_status_runs_on_the_defaults():
    result = subprocess.run([NOTIFIER, "status"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=os.environ.copy())
    assert result.returncode == 0, result.stderr


# --- Our configuration never dead-letters ----------------------------------------------


def test_the_default_sender_is_accepted_by_the_channel(smtp_server):
    default = EmailChannel(DEFAULT_CHANNEL_URLS["email"])
    url = smtp_server.url(**{"from": default.sender.addr_spec})
    [delivery_id] = seed("email", [{"email": "user@example.com"}])
    outcome = deliver_batch("email", [delivery_id], settings_with(channels={"email": url}),
                            state_redis())
    assert outcome.sent == 1
    assert smtp_server.envelopes[0][0] == default.sender.addr_spec


def test_a_refused_smtp_login_holds_deliveries_and_never_dead_letters():
    with SmtpServer(tls=True, auth=("notifier", "right")) as server:
        url = server.url().replace("notifier:right@", "notifier:wrong@")
        ids = seed("email", [{"email": f"user{i}@example.com"} for i in range(3)])
        settings = settings_with(channels={"email": url}, retry_max_attempts=2,
                                 breaker_failure_threshold=100)
        for _ in range(4):  # past retry_max_attempts: still nothing dead
            outcome = deliver_batch("email", ids, settings, state_redis())
            assert outcome.dead == 0 and outcome.sent == 0
            make_due(ids)
        assert count_rows("SELECT count(*) FROM dead_letters") == 0
        assert all(row["attempts"] == 0 for row in rows(ids))
        assert all("refused the login" in row["last_error"] for row in rows(ids))

        close_channels()  # the operator fixes the password
        outcome = deliver_batch("email", ids, settings_with(channels={"email": server.url()}),
                                state_redis())
        assert outcome.sent == 3


def test_a_refused_login_counts_towards_the_channel_circuit():
    with SmtpServer(tls=True, auth=("notifier", "right")) as server:
        url = server.url().replace("notifier:right@", "notifier:wrong@")
        settings = settings_with(channels={"email": url}, breaker_failure_threshold=3)
        ids = seed("email", [{"email": f"user{i}@example.com"} for i in range(3)])
        deliver_batch("email", ids, settings, state_redis())
        assert circuit_breaker(state_redis(), "email", settings).state() == "open"


@pytest.mark.parametrize(("channel", "url"), [
    ("sms", None),  # not configured at all
    ("email", BAD_EMAIL),  # a bad URL that got past the start-up check
])
def test_a_channel_that_cannot_be_built_holds_its_deliveries(channel, url):
    channels = {channel: url} if url else {}
    settings = settings_with(channels=channels)
    if url is None:
        settings.channels.pop(channel, None)
    recipient = {"email": "user@example.com", "phone": "+15550001111"}
    ids = seed(channel, [recipient])
    outcome = deliver_batch(channel, ids, settings, state_redis())
    assert outcome.dead == 0 and outcome.rescheduled == 1
    [row] = rows(ids)
    assert row["status"] in ("retrying", "queued") and row["attempts"] == 0
    assert f"NOTIFIER_CHANNELS__{channel.upper()}" in row["last_error"]
    assert count_rows("SELECT count(*) FROM dead_letters") == 0


def test_twilio_refusing_our_credentials_holds_deliveries(http_server):
    http_server.respond_always(401, '{"code": 20003, "message": "Authenticate"}')
    url = f"twilio://AC123:wrong@127.0.0.1:{http_server.port}?from=%2B15550001111&https=no"
    settings = settings_with(channels={"sms": url}, retry_max_attempts=1)
    ids = seed("sms", [{"phone": "+15550002222"}])
    for _ in range(2):
        outcome = deliver_batch("sms", ids, settings, state_redis())
        assert (outcome.dead, outcome.rescheduled) == (0, 1)
        make_due(ids)
    [row] = rows(ids)
    assert row["attempts"] == 0 and "refused the credentials" in row["last_error"]
    assert count_rows("SELECT count(*) FROM dead_letters") == 0
