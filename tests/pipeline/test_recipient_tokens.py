"""Recipient tokens (``notifier.pipeline.recipient_tokens``): minted for one recipient,
refused when altered, expired, for someone else, or signed by a key no longer in use."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from notifier.pipeline.recipient_tokens import MAX_TOKEN_LENGTH, TokenError, issue, mint, verify
from notifier.settings import ConfigError, Settings

KEY, NEW_KEY = "k" * 32 + "-first-key", "n" * 32 + "-second-key"
SETTINGS = Settings(api_token_secret=KEY)
NOW = 1_800_000_000.0
recipients = st.text(min_size=1, max_size=255).filter(str.strip)


def reason(token: object, **options: object) -> str:
    with pytest.raises(TokenError) as refused:
        verify(token, settings=options.pop("settings", SETTINGS), now=options.pop("now", NOW),
               **options)
    assert str(refused.value).startswith("token: ")
    return refused.value.reason


def test_a_token_names_its_recipient_until_it_expires():
    token = mint("ada", 60, settings=SETTINGS, now=NOW)
    assert verify(token, settings=SETTINGS, now=NOW + 59) == "ada"
    assert verify(token, recipient_id="ada", settings=SETTINGS, now=NOW) == "ada"
    assert reason(token, now=NOW + 60) == "expired"
    assert reason(token, recipient_id="bob") == "other recipient"


def test_issue_answers_the_expiry_the_token_holds():
    """What ``POST …/tokens`` tells its caller is exactly when the token stops working."""
    minted = issue("ada", 90.5, settings=SETTINGS, now=NOW)
    assert minted.expires == int(NOW + 90.5)
    assert verify(minted.token, settings=SETTINGS, now=minted.expires - 0.001) == "ada"
    assert reason(minted.token, now=minted.expires) == "expired"


def test_the_default_lifetime_and_its_bounds():
    """No ttl: NOTIFIER_API_TOKEN_TTL; above NOTIFIER_API_TOKEN_MAX_TTL or not a number of
    seconds above 0: ValueError naming ttl; a bad recipient id names recipient_id."""
    token = mint("ada", settings=SETTINGS, now=NOW)
    assert verify(token, settings=SETTINGS, now=NOW + SETTINGS.api_token_ttl - 1) == "ada"
    assert reason(token, now=NOW + SETTINGS.api_token_ttl) == "expired"
    for bad in (0, -1, SETTINGS.api_token_max_ttl + 1, "60", True, float("nan")):
        with pytest.raises(ValueError, match=r"^ttl: "):
            mint("ada", bad, settings=SETTINGS)
    for bad in ("", " ", "x" * 256):
        with pytest.raises(ValueError, match=r"^recipient_id: "):
            mint(bad, settings=SETTINGS)


def test_without_a_secret_nothing_is_minted_or_accepted():
    token = mint("ada", settings=SETTINGS, now=NOW)
    with pytest.raises(ConfigError, match=r"^NOTIFIER_API_TOKEN_SECRET: not set"):
        mint("ada", settings=Settings())
    assert reason(token, settings=Settings()) == "unknown key"


def test_a_rotated_key_keeps_its_tokens_valid_only_while_it_is_the_previous_one():
    """After a rotation tokens of the old key pass (the previous secret) and new tokens
    are signed by the new key; once the previous secret is dropped, old tokens fail."""
    old_token = mint("ada", settings=SETTINGS, now=NOW)
    rotated = Settings(api_token_secret=NEW_KEY, api_token_previous_secret=KEY)
    new_token = mint("ada", settings=rotated, now=NOW)
    assert old_token.split(".")[1] != new_token.split(".")[1]
    assert verify(old_token, settings=rotated, now=NOW) == "ada"
    assert verify(new_token, settings=rotated, now=NOW) == "ada"
    after = Settings(api_token_secret=NEW_KEY)
    assert reason(old_token, settings=after) == "unknown key"
    assert reason(new_token, settings=SETTINGS) == "unknown key"


def test_a_short_secret_is_refused_at_start_naming_the_variable(monkeypatch):
    from notifier.settings import load_settings

    monkeypatch.setenv("NOTIFIER_API_TOKEN_SECRET", "short")
    with pytest.raises(ConfigError, match=r"^NOTIFIER_API_TOKEN_SECRET: must be at least 32"):
        load_settings()


def test_a_key_of_another_service_with_the_same_key_id_shape_is_a_bad_signature():
    """A token whose key id is ours but whose signature was made with another key."""
    forged_parts = mint("ada", settings=Settings(api_token_secret=NEW_KEY), now=NOW).split(".")
    ours = mint("ada", settings=SETTINGS, now=NOW).split(".")
    forged = ".".join([ours[0], ours[1], forged_parts[2], forged_parts[3]])
    assert reason(forged) == "bad signature"


@given(recipients, st.data())
def test_any_single_character_changed_is_refused(recipient, data):
    """Every one-character change of a genuine token (any position, any replacement) is
    refused, whoever the recipient is; the genuine one round-trips."""
    token = mint(recipient, 600, settings=SETTINGS, now=NOW)
    assert len(token) <= MAX_TOKEN_LENGTH
    assert verify(token, recipient_id=recipient, settings=SETTINGS, now=NOW) == recipient
    index = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.characters().filter(lambda c: c != token[index]))
    altered = token[:index] + replacement + token[index + 1:]
    assert reason(altered) in {"malformed", "unknown key", "bad signature"}


@given(st.one_of(st.text(max_size=300), st.binary(max_size=100), st.integers(), st.none(),
                 st.lists(st.text(alphabet="abcXYZ09_-", max_size=20), min_size=4,
                          max_size=4).map(lambda p: "v1." + ".".join(p[1:]))))
def test_hostile_tokens_are_refused_with_a_reason_and_nothing_else(token):
    assert reason(token) in {"malformed", "unknown key"}


def test_an_oversized_token_is_refused_before_it_is_read():
    assert reason("v1." + "a" * MAX_TOKEN_LENGTH) == "malformed"
