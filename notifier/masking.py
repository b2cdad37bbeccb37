"""The one way secrets are hidden from what we print: log lines, error messages, CLI
output and dead letters all go through ``mask_secrets``.

It takes any text (a URL, a log line with several URLs in it, a traceback, a JSON
document) and returns it with these replaced by ``***``:

* the password of any ``scheme://user:password@host`` (everything between the user's
  ``:`` and the last ``@`` before the next whitespace, so a password holding ``'``,
  ``@``, ``/`` or ``://`` is hidden whole);
* the value of any option or field named like a secret (``SECRET_OPTIONS``, and names
  ending in ``token``, ``secret``, ``password``, ``_key``, ``signature`` ...): in a query
  string (``?token=...``), as ``name=value`` or ``name: value`` in free text, or quoted
  (``"password": "..."``, ``'api_key': '...'``);
* tokens carried in URL paths: in web URLs (http, https, and Apprise's json/xml/form)
  the last of three or more path segments (Slack's ``/services/T/B/XXXX``, Discord's
  ``/api/webhooks/ID/TOKEN``) and any segment, query or fragment value of 20 characters
  or more (Teams); in other URLs (Apprise schemes such as ``discord://``, ``gotify://``)
  every path segment of 8 characters or more and the last one, and a user name or a
  dotless host of 20 characters or more;
* tokens recognisable anywhere: Telegram bot tokens (``123456:ABC...``), Slack tokens
  (``xoxb-...``), our webhook secrets (``whsec_...``) and API keys (``nk_...``), JSON
  web tokens, ``Bearer`` and ``Basic`` credentials.

Database, broker and SMTP URLs keep their paths (a database name, a Redis db number):
only their passwords and secret options are hidden.

The function is total and idempotent: it never raises (on a failure of its own it
returns a fixed placeholder, never the input), and masking masked text changes nothing.
It works on plain string operations and regular expressions with bounded repetition:
no URL parser that could refuse a malformed URL (``x://[``, ``http://[::1``, a port out
of range), and no pattern that backtracks without bound.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

#: Query options and fields whose values are secrets, whatever their case.
SECRET_OPTIONS: frozenset[str] = frozenset({
    "password", "pass", "passwd", "pwd", "secret", "token", "key", "auth", "authorization",
    "auth_token", "api_key", "apikey", "access_token", "refresh_token", "id_token",
    "client_secret", "sig", "signature", "webhook_secret", "private_key", "credential",
    "credentials", "session", "sessionid", "cookie", "x-amz-signature", "x-goog-signature",
    "x-amz-credential", "x-amz-security-token",
})
#: A name ending in one of these is secret too (``smtp_password``, ``x-api-key``).
SECRET_SUFFIXES: tuple[str, ...] = (
    "token", "secret", "password", "passwd", "apikey", "api_key", "api-key", "_key", "-key",
    "signature", "credentials",
)
#: Path segments and option values this long or longer look like tokens.
SECRET_LOOKING_LENGTH = 20
#: In URLs of other schemes (Apprise's), path segments this long or longer are hidden.
OTHER_SEGMENT_LENGTH = 8

#: Schemes whose path is a database name, a db number or a socket path: never a secret.
INFRASTRUCTURE_SCHEMES = frozenset({
    "postgresql", "postgres", "redis", "rediss", "amqp", "amqps", "pyamqp", "mysql",
    "sqlite", "smtp", "smtps", "unix", "file", "sentinel", "redis+socket", "redis+cluster",
    "rediss+cluster",
})
#: Schemes of web URLs: tokens in their paths follow the web hooks' conventions.
WEB_SCHEMES = frozenset({
    "http", "https", "ws", "wss", "json", "jsons", "xml", "xmls", "form", "forms",
})

#: What is returned if masking itself fails: never the input.
WITHHELD = "[text withheld: it could not be masked]"
#: Passes at most; every pass that changes the text hides more, so it settles quickly.
_MAX_PASSES = 10

#: A scheme: its last 32 characters at most, so text glued in front cannot hide a URL.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]{0,31})://")
_WHITESPACE = re.compile(r"\s")
_USERINFO_END = re.compile(r"[:/?#@]")
_AUTHORITY_END = re.compile(r"[/?#]")
_QUERY_START = re.compile(r"[?#]")
#: How far after ``scheme://`` the ``@`` ending a password is looked for.
MAX_USERINFO = 4096
_NAME = (
    r"(?:[A-Za-z0-9_.\-]{0,64}(?:token|secret|password|passwd|apikey|api_key|api-key|_key"
    r"|-key|signature|credentials)|pass|pwd|key|auth|authorization|sig|credential|session"
    r"|sessionid|cookie|x-amz-credential)"
)
_KEY_VALUE = re.compile(
    r"(?<![A-Za-z0-9_.\-])(?<!://)(?P<q>[\"']?)(?P<name>" + _NAME + r")(?P=q)(?![A-Za-z0-9_.\-])"
    r"(?P<sep>[ \t]*[=:][ \t]*)"
    r"(?P<value>(?:Bearer|Basic|Token|Digest)[ \t]+[^\s&]*"
    r"|\"(?:[^\"\\\n]|\\.){0,4096}\"(?=[\s,;&)}\]]|$)"
    r"|'(?:[^'\\\n]|\\.){0,4096}'(?=[\s,;&)}\]]|$)"
    r"|\([^()\n]{0,4096}\)|\{[^{}\n]{0,4096}\}|\[[^\[\]\n]{0,4096}\]"  # a whole structure
    r"|[^\s&]*)",
    re.IGNORECASE,
)
_TOKENS = (
    # Telegram bot tokens: 123456789:AAH... (also as /bot123456789:AAH... in API paths).
    (re.compile(r"(?<![0-9])((?:bot)?[0-9]{5,12}:)[A-Za-z0-9_\-]{20,}"), r"\1" + MASK),
    # Slack tokens.
    (re.compile(r"\b(xox[abposre]-)[A-Za-z0-9\-]{8,}"), r"\1" + MASK),
    # Our webhook signing secrets.
    (re.compile(r"\b(whsec_)[A-Za-z0-9_\-]{8,}"), r"\1" + MASK),
    # Our API keys: the non-secret prefix stays, to tell which key it was.
    (re.compile(r"\b(nk_[A-Za-z0-9_\-]{8})[A-Za-z0-9_\-]{8,}"), r"\1" + MASK),
    # GitHub tokens.
    (re.compile(r"\b(gh[pousr]_)[A-Za-z0-9]{20,}"), r"\1" + MASK),
    # JSON web tokens.
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*"), MASK),
    # HTTP credentials.
    (re.compile(r"\b(Bearer|Basic)([ \t]+)[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE),
     r"\1\2" + MASK),
)


def mask_secrets(text: object) -> str:
    """``text`` (any object; not a string: its ``str``) with every secret hidden.

    Never raises; idempotent. See the module's docstring for what is hidden.
    """
    try:
        current = text if isinstance(text, str) else _safe_str(text)
        for _ in range(_MAX_PASSES):
            masked = _mask_once(current)
            if masked == current:
                return masked
            current = masked
        return WITHHELD
    except Exception:  # the promise: printing never fails
        return WITHHELD


def mask_address(address: object) -> str:
    """A recipient's address as we print it (``recipients show``, ``dead-letters``).

    URLs (webhook, Slack, Apprise) may carry secrets and go through ``mask_secrets``;
    e-mail addresses and phone numbers are shown as they are (an operator looking for
    a recipient needs them; they pass ``mask_secrets`` unchanged).
    """
    return mask_secrets(address)


def is_secret_name(name: object) -> bool:
    """Whether an option or field of this name holds a secret."""
    if not isinstance(name, str):
        return False
    lowered = name.strip().strip("\"'").lower()
    return lowered in SECRET_OPTIONS or lowered.endswith(SECRET_SUFFIXES)


def mask_structure(value: Any, depth: int = 0) -> Any:
    """A JSON-like value (a dead letter's payload) with secrets hidden, kept a value of
    the same shape: every string through ``mask_secrets``, and the whole value of every
    field named like a secret. Deeper than 64 levels: hidden whole."""
    if depth > 64:
        return MASK
    if isinstance(value, dict):
        masked = {}
        for key, item in value.items():
            shown = mask_secrets(key)
            secret = is_secret_name(key) or is_secret_name(shown)
            hide = secret and item is not None and item != ""
            masked[shown] = MASK if hide else mask_structure(item, depth + 1)
        return masked
    if isinstance(value, list | tuple):
        return [mask_structure(item, depth + 1) for item in value]
    if isinstance(value, str):
        return mask_secrets(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return mask_secrets(value)


# --- One pass -------------------------------------------------------------------------


def _mask_once(text: str) -> str:
    text = _mask_urls(text)
    text = _KEY_VALUE.sub(_masked_key_value, text)
    for pattern, replacement in _TOKENS:
        text = pattern.sub(replacement, text)
    return text


def _masked_key_value(match: re.Match[str]) -> str:
    value = match.group("value")
    inner = value[1:-1] if value[:1] in "\"'" and len(value) >= 2 else value
    if not inner or _is_masked(inner):
        return match.group(0)
    quote = value[0] if value[:1] in "\"'" and value[-1:] == value[:1] else ""
    head = match.group(0)[: match.start("value") - match.start()]
    return f"{head}{quote}{MASK}{quote}"


def _is_masked(value: str) -> bool:
    """Already hidden (only ``*``): left as it is, which keeps masking idempotent."""
    return value.strip("*") == ""


def _mask_urls(text: str) -> str:
    out: list[str] = []
    position = 0
    run_end = -1  # where the whitespace-delimited run of the last URL ends
    while True:
        found = _SCHEME.search(text, position)
        if found is None:
            out.append(text[position:])
            return "".join(out)
        out.append(text[position:found.start()])
        start = found.end()
        if start > run_end:  # once per run: URLs nested in one run share it
            space = _WHITESPACE.search(text, start)
            run_end = space.start() if space else len(text)
        masked, position = _mask_url(text, found.group(1), start, run_end)
        out.append(f"{found.group(1)}://{masked}")


def _mask_url(text: str, scheme: str, start: int, end: int) -> tuple[str, int]:
    """The URL whose text after ``scheme://`` starts at ``start`` and may run to ``end``,
    masked; and where it really ended (at a URL nested in its path, if any).

    Every search here stops at the first hit, so a run of many URLs costs its length.
    """
    kind = _kind(scheme)
    userinfo, host_start = _masked_userinfo(text, start, end, kind)
    host_end = _search_end(_AUTHORITY_END, text, host_start, end)
    host = text[host_start:host_end]
    if kind == "other" and "." not in host and _looks_like_token(host):
        host = MASK
    nested = _SCHEME.search(text, host_end, end)
    url_end = nested.start() if nested else end
    return userinfo + host + _masked_rest(text[host_end:url_end], kind), url_end


def _kind(scheme: str) -> str:
    lowered = scheme.lower()
    base = lowered.split("+", 1)[0]
    if lowered in INFRASTRUCTURE_SCHEMES or base in INFRASTRUCTURE_SCHEMES:
        return "infrastructure"
    return "web" if lowered in WEB_SCHEMES else "other"


def _masked_userinfo(text: str, start: int, end: int, kind: str) -> tuple[str, int]:
    """The masked ``user:password@`` of the URL at ``start`` and where its host starts.

    A password runs to the last ``@`` of the run (looking at most ``MAX_USERINFO``
    characters ahead), so one holding ``@``, ``/``, quotes or ``://`` is hidden whole.
    """
    first = _search_end(_USERINFO_END, text, start, end)
    if first < end and text[first] == ":":
        at = text.rfind("@", first, min(end, start + MAX_USERINFO))
        if at > first:
            password = text[first + 1:at]
            shown = password if not password or _is_masked(password) else MASK
            return f"{_masked_user(text[start:first], kind)}:{shown}@", at + 1
        return "", start
    if first < end and text[first] == "@":
        return f"{_masked_user(text[start:first], kind)}@", first + 1
    return "", start


def _search_end(pattern: re.Pattern[str], text: str, start: int, end: int) -> int:
    found = pattern.search(text, start, end)
    return found.start() if found else end


def _masked_user(user: str, kind: str) -> str:
    return MASK if kind == "other" and _looks_like_token(user) else user


def _masked_rest(rest: str, kind: str) -> str:
    """Path, query and fragment of a URL, masked."""
    query_at = _search_end(_QUERY_START, rest, 0, len(rest))
    path = rest[:query_at]
    query = fragment = ""
    marker = rest[query_at:query_at + 1]
    if marker == "?":
        fragment_at = rest.find("#", query_at)
        fragment_at = len(rest) if fragment_at < 0 else fragment_at
        query = rest[query_at + 1:fragment_at]
        fragment = rest[fragment_at + 1:]
        has_fragment = fragment_at < len(rest)
    else:
        fragment = rest[query_at + 1:]
        has_fragment = marker == "#"
    masked = _masked_path(path, kind)
    if marker == "?":
        masked += "?" + _masked_options(query, kind)
    if has_fragment:
        masked += "#" + _masked_options(fragment, kind)
    return masked


def _masked_path(path: str, kind: str) -> str:
    if kind == "infrastructure" or not path:
        return path
    segments = path.split("/")
    named = [i for i, segment in enumerate(segments) if segment]
    for i in named:
        segment = segments[i]
        if _is_masked(segment):
            continue
        last = i == named[-1]
        if kind == "web":
            hide = _looks_like_token(segment) or (len(named) >= 3 and last)
        else:
            hide = len(segment) >= OTHER_SEGMENT_LENGTH or last
        if hide:
            segments[i] = MASK
    return "/".join(segments)


def _masked_options(options: str, kind: str) -> str:
    pairs = []
    for pair in options.split("&"):
        key, equals, value = pair.partition("=")
        if not equals:
            hide = kind != "infrastructure" and _looks_like_token(key)
            pairs.append(MASK if hide else key)
            continue
        hide = bool(value) and not _is_masked(value) and (
            is_secret_name(key) or (kind != "infrastructure" and _looks_like_token(value))
        )
        pairs.append(f"{key}={MASK if hide else value}")
    return "&".join(pairs)


def _looks_like_token(text: str) -> bool:
    return len(text) >= SECRET_LOOKING_LENGTH and not _is_masked(text)


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a broken __str__ must not break a line
        try:
            name = type(value).__name__
        except Exception:
            name = "object"
        return f"<unprintable {name}>"
