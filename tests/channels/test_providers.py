"""A channel's providers: one URL, or a JSON list of them in order of preference.

Each URL is checked as a lone one is; a mistake is one line naming the variable and the
URL's index, never quoting a password; the names the providers get (metrics, status,
``deliveries.provider``) carry their place and host, nothing secret.
"""

from __future__ import annotations

import json

import pytest

from notifier.channels import (
    MAX_PROVIDERS,
    build_providers,
    channel_urls,
    close_channels,
    get_providers,
    provider_name,
)
from notifier.channels.email import EmailChannel
from notifier.settings import ConfigError, Settings, get_settings

PRIMARY = "smtps://user:s3cret@smtp.primary.example?from=notifier%40example.com"
BACKUP = "smtp://backup.example:2525?from=notifier%40example.com"


@pytest.fixture(autouse=True)
def _fresh_channels():
    close_channels()
    yield
    close_channels()


def settings_with(**channels: str) -> Settings:
    return get_settings().model_copy(update={"channels": {**get_settings().channels, **channels}})


def test_a_single_url_is_one_provider_as_before():
    [provider] = build_providers("email", PRIMARY, get_settings())
    assert (provider.index, provider.name) == (0, "0:smtp.primary.example")
    assert isinstance(provider.channel, EmailChannel)
    assert provider.channel.url == PRIMARY


def test_a_json_list_is_the_providers_in_order_named_without_secrets():
    providers = get_providers("email", settings_with(email=json.dumps([PRIMARY, BACKUP])))
    assert [p.name for p in providers] == ["0:smtp.primary.example", "1:backup.example:2525"]
    assert [p.channel.host for p in providers] == ["smtp.primary.example", "backup.example"]
    assert all("s3cret" not in p.name and "user" not in p.name for p in providers)


def test_the_list_is_read_from_the_environment_as_operators_write_it(monkeypatch):
    monkeypatch.setenv("NOTIFIER_CHANNELS__EMAIL", f' [ "{PRIMARY}",\n "{BACKUP}" ] ')
    assert channel_urls("email", Settings().channels["email"]) == [PRIMARY, BACKUP]


@pytest.mark.parametrize(("value", "expected"), [
    ('["smtp://a?from=x%40y.z", ', "NOTIFIER_CHANNELS__EMAIL: expected one URL or a JSON list"),
    ('[null]', "NOTIFIER_CHANNELS__EMAIL: expected one URL or a JSON list"),
    ('["smtp://a?from=x%40y.z", 3]', "NOTIFIER_CHANNELS__EMAIL: expected one URL or a JSON list"),
    ('["smtp://a?from=x%40y.z", " "]', "NOTIFIER_CHANNELS__EMAIL: expected one URL or a JSON list"),
    ("[]", "NOTIFIER_CHANNELS__EMAIL: lists 0 URLs; expected 1 to 5"),
    (json.dumps([BACKUP] * (MAX_PROVIDERS + 1)), "NOTIFIER_CHANNELS__EMAIL: lists 6 URLs;"),
])
def test_a_malformed_list_is_one_line_naming_the_variable(value, expected):
    with pytest.raises(ConfigError) as error:
        build_providers("email", value, get_settings())
    assert str(error.value).startswith(expected)
    assert "\n" not in str(error.value)


def test_a_bad_url_in_the_list_is_named_by_its_index_and_its_password_never_shown():
    bad = "smtps://user:s3cret@smtp.primary.example?from=nobody"
    with pytest.raises(ConfigError) as error:
        build_providers("email", json.dumps([BACKUP, bad]), get_settings())
    assert str(error.value) == (
        "NOTIFIER_CHANNELS__EMAIL[1]: option from: not a single e-mail address: 'nobody'")
    with pytest.raises(ConfigError) as error:
        build_providers("email", json.dumps([BACKUP, "http://user:s3cret@h/"]), get_settings())
    assert str(error.value).startswith("NOTIFIER_CHANNELS__EMAIL[1]: expected a smtp://")
    assert "s3cret" not in str(error.value)


@pytest.mark.parametrize("channel", ["webhook", "slack", "inapp"])
def test_channels_without_a_provider_of_their_own_take_one_url(channel):
    url = f"{channel}://"
    with pytest.raises(ConfigError, match=f"NOTIFIER_CHANNELS__{channel.upper()}: lists 2 URLs"):
        build_providers(channel, json.dumps([url, url]), get_settings())
    assert len(build_providers(channel, json.dumps([url]), get_settings())) == 1


def test_provider_names_are_bounded_and_plain_whatever_the_url():
    assert provider_name(2, "twilio://AC1:tok@?from=%2B1555") == "2:twilio"
    assert provider_name(0, "smtp://[::1]:25?from=a%40b.c") == "0:::1:25"
    assert provider_name(1, "smtp://h:99999999") == "1:invalid"
    assert provider_name(0, "smtp://" + "é" * 300) == "0:" + "_" * 98
    assert len(provider_name(0, "smtp://" + "a" * 300)) == 100
    assert provider_name(0, "smtp://h%7Bx%7D.example") == "0:h_7bx_7d.example"
