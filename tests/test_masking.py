"""The one masking function: total, idempotent, and no generated secret gets through."""

from __future__ import annotations

import json
import string

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from notifier.channels.http import mask_target
from notifier.logs import mask_urls
from notifier.masking import (
    MASK,
    SECRET_OPTIONS,
    WITHHELD,
    mask_address,
    mask_secrets,
    mask_structure,
)
from notifier.settings import mask_url

#: Characters a secret may hold where nothing delimits it but whitespace.
NOT_SPACE = st.characters(blacklist_categories=("Cs",)).filter(lambda c: not c.isspace())
URLISH = st.text(alphabet=string.ascii_letters + string.digits + ":/?#@&=[]%.'\"*-_+ \n",
                 max_size=80)
SCHEMES = st.sampled_from(["smtp", "https", "http", "redis", "postgresql+psycopg", "amqp",
                           "mailto", "json", "gotify", "x", "webhook"]) | st.from_regex(
    r"\A[a-z][a-z0-9+.\-]{0,10}\Z")
HOSTS = st.sampled_from(["h", "mail.example.com", "127.0.0.1", "[::1]", "[::1", "h:25",
                         "example.com:99999", ""])
#: Any text glued around what is tested: hostile surroundings, no separator.
AROUND = st.text(max_size=30) | URLISH


def secrets_of(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=8, max_size=60).filter(
        lambda s: s.strip("*") != "")


def hidden(secret: str, *surroundings: str) -> None:
    assume(all(secret not in part for part in surroundings))


# --- Total and idempotent -------------------------------------------------------------


@settings(max_examples=400)
@given(st.text() | URLISH | st.text(alphabet=string.printable))
@example("x://[")
@example("http://[::1")
@example("http://example.com:99999/")
@example("a://a://a://u:p@h")
@example("password=\"unclosed")
def test_any_text_never_raises_and_masking_twice_changes_nothing(text: str) -> None:
    once = mask_secrets(text)
    assert isinstance(once, str)
    assert mask_secrets(once) == once


@given(st.from_type(object) | st.integers() | st.binary() | st.lists(st.text()))
def test_any_value_is_masked_as_its_text(value: object) -> None:
    assert isinstance(mask_secrets(value), str)


def test_a_broken_str_does_not_break_masking() -> None:
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert mask_secrets(Broken()) == "<unprintable Broken>"


def test_pathological_inputs_are_masked_in_one_go() -> None:
    """Many nested URLs in one run, unclosed quotes, huge runs: linear work, no hang."""
    for text in ("a://" * 50_000, 'password="' * 20_000, "x" * 500_000 + "smtp://u:p@h",
                 "h://u:" + "@" * 100_000, "token=" + "a" * 400_000):
        masked = mask_secrets(text)
        assert mask_secrets(masked) == masked


# --- No secret through ----------------------------------------------------------------


@settings(max_examples=300)
@given(SCHEMES, st.from_regex(r"\A[A-Za-z0-9._-]{0,10}\Z"), secrets_of(NOT_SPACE), HOSTS,
       AROUND, AROUND)
@example("smtp", "mailer", "it's'a:p@ss/w#rd", "h", "", "")
@example("smtp", "u", "ab://c", "h", "x://a/", "")
def test_passwords_are_hidden_whatever_they_hold(
    scheme: str, user: str, secret: str, host: str, before: str, after: str
) -> None:
    url = f"{scheme}://{user}:{secret}@{host}/db?x=1"
    hidden(secret, before, after, f"{scheme}://{user}:", f"@{host}/db?x=1")
    assert secret not in mask_secrets(before + url + after)
    assert f"{user}:{MASK}@" in mask_secrets(f"{before} {url} {after}")


@settings(max_examples=300)
@given(st.sampled_from([*sorted(SECRET_OPTIONS), "client_secret", "X-Api-Key", "smtp_password",
                        "Signature", "TOKEN"]),
       secrets_of(NOT_SPACE.filter(lambda c: c != "&")), SCHEMES, AROUND, AROUND)
def test_secret_options_are_hidden_in_any_url(
    name: str, secret: str, scheme: str, before: str, after: str
) -> None:
    url = f"{scheme}://h.example/p?a=1&{name}={secret}&b=2"
    hidden(secret, before, after, f"{scheme}://h.example/p?a=1&{name}=&b=2")
    masked = mask_secrets(f"{before} {url} {after}")
    assert secret not in masked
    assert f"{name}={MASK}" in masked


@settings(max_examples=300)
@given(st.sampled_from(["password", "api_key", "client_secret", "access_token", "sig",
                        "Authorization", "webhook_secret"]),
       secrets_of(NOT_SPACE.filter(lambda c: c != "&")) | secrets_of(st.characters()),
       AROUND, AROUND)
def test_secret_fields_are_hidden_in_free_text_json_and_reprs(
    name: str, secret: str, before: str, after: str
) -> None:
    forms = {json.dumps(secret)[1:-1]: f"{{{json.dumps(name)}: {json.dumps(secret)}}}",
             repr(secret)[1:-1]: repr({name: secret})}
    if not any(c.isspace() or c == "&" for c in secret):
        forms[secret] = f"{name}={secret}"
    for shown, form in forms.items():
        hidden(shown, before, after)
        assert shown not in mask_secrets(f"{before} {form} {after}"), form


TOKEN = st.text(alphabet=string.ascii_letters + string.digits, min_size=24, max_size=24)
TELEGRAM = st.from_regex(r"\A[A-Za-z0-9_-]{35}\Z")
DIGITS = st.from_regex(r"\A[0-9]{6,10}\Z")


@settings(max_examples=200)
@given(TOKEN, TELEGRAM, DIGITS, st.from_regex(r"\A[A-Za-z0-9_-]{68}\Z"), AROUND, AROUND)
def test_tokens_in_paths_are_hidden(
    slack: str, telegram: str, bot: str, discord: str, before: str, after: str
) -> None:
    urls = [
        f"https://hooks.slack.com/services/T0{slack[:7]}/B0{slack[7:14]}/{slack}",
        f"tgram://{bot}:{telegram}/12345",
        f"https://api.telegram.org/bot{bot}:{telegram}/sendMessage",
        f"https://discord.com/api/webhooks/{bot}/{discord}",
        f"discord://{bot}/{discord}",
        f"https://example.webhook.office.com/webhookb2/{slack}@{slack}/IncomingWebhook/"
        f"{discord[:32]}/{slack}",
    ]
    for secret in (slack, telegram, discord):
        hidden(secret, before, after)
    text = before + " ".join(urls) + after
    masked = mask_secrets(text)
    for secret in (slack, telegram, discord, discord[:32]):
        assert secret not in masked


def test_what_masking_keeps() -> None:
    """Hosts, ports, database names and harmless options stay readable."""
    assert mask_secrets("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert (mask_secrets("postgresql+psycopg://postgres@127.0.0.1:5432/notifier_test_ab12cd34")
            == "postgresql+psycopg://postgres@127.0.0.1:5432/notifier_test_ab12cd34")
    assert (mask_secrets("smtp://mailer:it's'a@mail.example.com:587?from=a%40b.c&password=x")
            == "smtp://mailer:***@mail.example.com:587?from=a%40b.c&password=***")
    assert (mask_secrets("https://hooks.slack.com/services/T000/B000/XXXXSECRET")
            == "https://hooks.slack.com/services/T000/B000/***")
    assert mask_secrets("https://example.com/hooks/in") == "https://example.com/hooks/in"
    assert mask_secrets("tgram://123456789:AAHvzVBjhTQ5Vm3PcR6ZNQ7RdCk8sLc1234/99") == (
        "tgram://***/***")
    assert (mask_secrets("Authorization: Bearer abc.def-ghijkl and user@example.com")
            == "Authorization: *** and user@example.com")
    assert mask_secrets("whsec_3kq1p0Zx9nV7yY2bA4cD6eF8gH") == "whsec_***"
    assert mask_secrets("+49 170 1234567") == "+49 170 1234567"
    assert mask_secrets("auth= {'password': 'p'} auth=('u', 'pw')") == "auth= *** auth=***"
    assert mask_secrets("DETAIL:  Key (id)=(abc) already exists.") == (
        "DETAIL:  Key (id)=(abc) already exists.")


def test_every_masking_name_is_the_one_function() -> None:
    text = "a smtp://u:p'w@h x https://h/services/T/B/TOKENTOKEN?sig=1"
    expected = mask_secrets(text)
    assert "p'w" not in expected and "TOKENTOKEN" not in expected
    assert mask_url(text) == mask_urls(text) == mask_target(text) == expected


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
))
def test_structures_keep_their_shape(value: object) -> None:
    masked = mask_structure(value)
    assert json.dumps(masked, default=str)  # still a JSON value
    assert mask_structure(masked) == masked or masked != masked  # NaN is not equal to itself


def test_structures_hide_secret_fields_and_addresses() -> None:
    deep: list[object] = ["x"]
    for _ in range(100):
        deep = [deep]
    payload = {"recipient": {"id": "r", "email": "r@example.com", "addresses": {
        "webhook": "https://h/services/T/B/XXXXXXXXXXXX", "apprise": "mailto://u:pa'ss@h"}},
        "data": {"api_key": 12345, "password": "x", "nested": [{"token": "y"}]},
        "deep": deep}
    masked = mask_structure(payload)
    assert masked["recipient"]["email"] == "r@example.com"
    assert masked["recipient"]["addresses"] == {
        "webhook": "https://h/services/T/B/***", "apprise": "mailto://u:***@h"}
    assert masked["data"] == {"api_key": MASK, "password": MASK, "nested": [{"token": MASK}]}
    assert MASK in json.dumps(masked["deep"])


def test_an_address_is_masked_once_for_every_place_that_prints_it() -> None:
    assert mask_address("https://h/services/T/B/XXXXXXXXXXXX") == "https://h/services/T/B/***"
    assert mask_address("ops@example.com") == "ops@example.com"
    assert mask_address(None) == "None"
    assert mask_secrets(WITHHELD) == WITHHELD
