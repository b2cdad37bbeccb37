"""Aggregation rules: which notifications wait for a digest, for how long, and how it reads.

Notifications that can wait are gathered per recipient, type (and optionally a field of
their ``data``) into a window; when the window closes, or holds ``max_count`` items, one
digest ("3 alerts") is delivered in their place. Critical notifications never wait; that
is enforced where they are ingested, not here.

Every type has a rule: its own built-in one (``BUILTIN_RULES``), else the default rule.
Operators change them with a TOML file named by ``NOTIFIER_RULES_FILE``::

    [default]            # optional: the rule of types without their own
    window = "15m"
    max_count = 10

    [types.task_deadline]
    window = "30m"       # durations: "90s", "15m", "1h", "1h30m", "2d", or seconds (90)
    max_count = 5        # a group reaching this many items is flushed at once
    mode = "sliding"     # "fixed" (default), "leading" or "sliding", see ``Mode``
    max_wait = "2h"      # sliding only; default 4 x window
    digest_key = "project_id"   # a key of the notification's data: one digest per value
    title = "{{ count }} task deadlines approaching in {{ items[0].data.project_name }}"
    body = \"\"\"...\"\"\"     # plain text, Jinja2
    html = \"\"\"...\"\"\"     # HTML, Jinja2, autoescaped

    [types.security_alert]
    aggregate = false    # never aggregated: delivered at once

    [types."billing.invoice"]   # a type with a dot in its name is quoted
    window = "1h"

A type table overrides only the keys it sets: the rest comes from the built-in rule of
that type or, for other types, from the default rule (after ``[default]``). ``[default]``
does not change the built-in types. Templates see ``count``, ``items`` (each with ``id``,
``title``, ``body``, ``data``, ``created_at``, ``priority``), ``first``, ``last``,
``type``, ``type_label``, ``recipient_name``, ``window_start`` and ``window_end``; see
``notifier.pipeline.templates``. Any mistake in the file stops the start with a ``ConfigError``
of one line naming the file, the key and the problem.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

from jinja2 import TemplateSyntaxError

from notifier.pipeline.sandbox import compile_template
from notifier.schemas import TYPE_PATTERN
from notifier.settings import ConfigError, get_settings

Mode = Literal["fixed", "leading", "sliding"]
"""How a window is timed.

``fixed``: the first item opens a window of ``window``; everything until it closes is one
digest. ``leading``: the first item is delivered at once, the rest are batched for
``window`` (a quiet type stays immediate, a burst is summarised). ``sliding``: each new
item pushes the close ``window`` further out, but never beyond ``max_wait`` after the
first item, so a steady trickle still gets delivered.
"""

MODES: tuple[str, ...] = get_args(Mode)

#: A sliding window without ``max_wait`` closes at the latest this many windows after
#: its first item: long enough to absorb a burst, short enough to bound the delay.
SLIDING_MAX_WAIT_FACTOR = 4

DEFAULT_TITLE = "{{ count }} {{ type_label }} notifications"
DEFAULT_BODY = """\
{% for item in items %}
- {{ item.title }}
{% if item.body %}
{{ item.body | indent(2, first=true) }}
{% endif %}
{% endfor %}
"""
DEFAULT_HTML = """\
<ul>
{% for item in items %}
  <li><strong>{{ item.title }}</strong>
{%- if item.body %}<div style="white-space: pre-line">{{ item.body }}</div>{% endif %}</li>
{% endfor %}
</ul>
"""


class RuleError(ValueError):
    """A rule's value is out of range; ``key`` names the field, ``problem`` says why."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


@dataclass(frozen=True)
class Rule:
    """How notifications of one type are aggregated into digests."""

    #: The notification type it applies to; ``"*"`` for the default rule.
    type: str
    window: timedelta
    #: A group reaching this many items is flushed at once, window or not.
    max_count: int
    #: ``False``: never aggregated, delivered at once.
    aggregate: bool = True
    mode: Mode = "fixed"
    #: Sliding only. ``None``: ``SLIDING_MAX_WAIT_FACTOR`` windows; read ``longest_wait``.
    max_wait: timedelta | None = None
    #: A key of the notification's ``data`` whose value splits groups (a digest per project).
    digest_key: str | None = None
    title_template: str = DEFAULT_TITLE
    body_template: str = DEFAULT_BODY
    html_template: str = DEFAULT_HTML

    def __post_init__(self) -> None:
        if self.window <= timedelta(0):
            raise RuleError("window", f"must be positive, got {format_duration(self.window)}")
        if isinstance(self.max_count, bool) or self.max_count < 1:
            raise RuleError("max_count", f"must be at least 1, got {self.max_count}")
        if self.mode not in MODES:
            raise RuleError("mode", f"expected one of {_choices(MODES)}, got {_show(self.mode)}")
        self._check_max_wait()

    def _check_max_wait(self) -> None:
        if self.max_wait is None:
            return
        if self.mode != "sliding":
            raise RuleError(
                "max_wait", f'only applies to mode "sliding", and the mode is "{self.mode}"'
            )
        if self.max_wait < self.window:
            raise RuleError(
                "max_wait",
                f"must be at least the window ({format_duration(self.window)}),"
                f" got {format_duration(self.max_wait)}",
            )

    @property
    def longest_wait(self) -> timedelta:
        """The longest an item may wait: the window, or for sliding windows the cap."""
        if self.mode != "sliding":
            return self.window
        return self.max_wait or SLIDING_MAX_WAIT_FACTOR * self.window


class Rules:
    """The rules of the named types and the default rule for all others."""

    def __init__(self, rules: Iterable[Rule], default: Rule):
        self._rules: Mapping[str, Rule] = MappingProxyType({rule.type: rule for rule in rules})
        self.default = default
        #: Default rules made for other types (ingest asks once per notification).
        self._defaults: dict[str, Rule] = {}

    def for_type(self, type: str) -> Rule:
        """The type's own rule, else the default rule carrying the asked ``type``."""
        rule = self._rules.get(type) or self._defaults.get(type)
        if rule is None:
            rule = replace(self.default, type=type)
            if len(self._defaults) < 10_000:  # types come from callers: keep it bounded
                self._defaults[type] = rule
        return rule

    def items(self) -> list[tuple[str, Rule]]:
        """``(type, rule)`` pairs by type, the default rule (``"*"``) last."""
        return [(rule.type, rule) for rule in self]

    def __iter__(self) -> Iterator[Rule]:
        yield from (self._rules[name] for name in sorted(self._rules))
        yield self.default

    def __contains__(self, type: object) -> bool:
        return type in self._rules

    def __len__(self) -> int:
        return len(self._rules) + 1

    def __repr__(self) -> str:
        return f"Rules({', '.join(self._rules)}, default={self.default!r})"


# --- Built-in rules ---------------------------------------------------------------

_BUILTINS: tuple[Rule, ...] = (
    Rule("system_update", timedelta(hours=1), 10, title_template="{{ count }} system updates"),
    Rule(
        "approval_request", timedelta(minutes=15), 5,
        title_template="{{ count }} approvals waiting for you",
    ),
    # Critical alerts bypass the window, as all critical notifications do (at ingest).
    Rule("alert", timedelta(minutes=5), 3, title_template="{{ count }} alerts"),
    Rule("reminder", timedelta(minutes=30), 10, title_template="{{ count }} reminders"),
    Rule(
        "announcement", timedelta(hours=24), 20, title_template="{{ count }} announcements"
    ),
    Rule(
        "task_deadline", timedelta(minutes=30), 10,
        title_template="{{ count }} task deadlines approaching",
    ),
)

#: Types nobody configured are most likely ordinary informational ones: 15 minutes keeps
#: them timely while folding a burst into one message, and a fixed window bounds the
#: delay (a sliding one could hold a steady trickle for an hour).
DEFAULT_RULE = Rule("*", timedelta(minutes=15), 10)

BUILTIN_RULES = Rules(_BUILTINS, DEFAULT_RULE)


# --- Durations --------------------------------------------------------------------

_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?")
_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def parse_duration(value: object) -> timedelta:
    """``"90s"``, ``"15m"``, ``"1h30m"``, ``"2d"`` or a number of seconds, as a timedelta.

    Only the seconds may have a fraction (``"1.5s"``), as ``format_duration`` writes them.

    Raises ``ValueError`` with a message meant for the person who wrote the value.
    """
    seconds = _duration_seconds(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive duration, got {_show(value)}")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"is too long, got {_show(value)}") from None


def _duration_seconds(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        if _SECONDS.fullmatch(value):
            return float(value)
        match = _DURATION.fullmatch(value)
        if value and match:
            numbers = (float(n or 0) for n in match.groups())
            return sum(n * size for n, (_, size) in zip(numbers, _UNITS, strict=True))
    raise ValueError(f'expected a duration like "5m" or "1h30m", got {_show(value)}')


def format_duration(duration: timedelta) -> str:
    """The duration in the notation ``parse_duration`` reads ("1h30m"), for display."""
    seconds = duration.total_seconds()
    if seconds <= 0 or seconds != int(seconds):
        return f"{seconds:g}s"
    parts, rest = [], int(seconds)
    for unit, size in _UNITS:
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


# --- Loading the TOML file -----------------------------------------------------------

_VARIABLE = "NOTIFIER_RULES_FILE"
_TOP_LEVEL_KEYS = ("default", "types")


class _Problem(Exception):
    """A mistake in the rules file at ``key`` (a dotted path; ``None``: the whole file)."""

    def __init__(self, key: str | None, problem: str):
        self.key, self.problem = key, problem
        super().__init__(problem)


def load_rules(path: str | Path | None) -> Rules:
    """The built-in rules, overridden and extended by the TOML file at ``path`` if any.

    Raises ``ConfigError`` of one line naming the variable, file, key and problem.
    """
    if path is None or str(path) == "":
        return BUILTIN_RULES
    try:
        return _rules_from_document(_read_toml(Path(path)))
    except _Problem as problem:
        where = f"{path}: {problem.key}" if problem.key else str(path)
        raise ConfigError(_one_line(f"{_VARIABLE}: {where}: {problem.problem}")) from None


@lru_cache(maxsize=1)
def get_rules() -> Rules:
    """The rules of this process, read once from ``NOTIFIER_RULES_FILE``."""
    return load_rules(get_settings().rules_file)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise _Problem(None, "no such file") from None
    except OSError as error:
        raise _Problem(None, f"cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise _Problem(None, "not valid UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise _Problem(None, f"not valid TOML: {error}") from None


def _rules_from_document(document: dict[str, Any]) -> Rules:
    for key in document:
        if key not in _TOP_LEVEL_KEYS:
            raise _Problem(_key(key), f"unknown key; expected {_choices(_TOP_LEVEL_KEYS)}")
    default = DEFAULT_RULE
    if "default" in document:
        default = _rule_from_table(DEFAULT_RULE, "*", document["default"], "default")
    rules = {rule.type: rule for rule in _BUILTINS}
    for name, table in _table(document.get("types", {}), "types").items():
        where = f"types.{_key(name)}"
        if not TYPE_PATTERN.match(name):
            raise _Problem(where, _BAD_TYPE_NAME)
        rules[name] = _rule_from_table(rules.get(name, default), name, table, where)
    return Rules(rules.values(), default)


_BAD_TYPE_NAME = (
    "not a notification type: it must start with a lowercase letter and hold only"
    " lowercase letters, digits, '_', '.' or '-', at most 64 characters"
)


def _rule_from_table(base: Rule, type: str, table: object, where: str) -> Rule:
    """``base`` with the keys ``table`` sets; ``where`` is the table's dotted path."""
    changes: dict[str, Any] = {}
    for key, value in _table(table, where).items():
        if key not in _KEYS:
            raise _Problem(f"{where}.{_key(key)}", f"unknown key; expected {_choices(_KEYS)}")
        field, convert = _KEYS[key]
        try:
            changes[field] = convert(value)
        except ValueError as error:
            raise _Problem(f"{where}.{key}", str(error)) from None
    if changes.get("mode", "sliding") != "sliding" and "max_wait" not in changes:
        changes["max_wait"] = None  # a cap inherited from a sliding rule no longer applies
    try:
        return replace(base, type=type, **changes)
    except RuleError as error:
        raise _Problem(f"{where}.{error.key}", error.problem) from None


def _table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Problem(where, f"expected a table, got {_show(value)}")
    return value


# --- Converters of the values of a rule table -----------------------------------------


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_show(value)}")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    return value


def _field_name(value: object) -> str:
    name = _string(value)
    if not name or re.search(r"[\x00-\x1f\x7f]", name):
        raise ValueError(f"expected the name of a field of data, got {_show(value)}")
    return name


def _template(*, html: bool) -> Callable[[object], str]:
    def check(value: object) -> str:
        source = _string(value)
        try:
            compile_template(source, html=html)
        except TemplateSyntaxError as error:
            raise ValueError(f"template error on line {error.lineno}: {error.message}") from None
        return source

    return check


#: TOML key -> (``Rule`` field, converter that raises ValueError with the problem).
_KEYS: dict[str, tuple[str, Callable[[object], Any]]] = {
    "window": ("window", parse_duration),
    "max_count": ("max_count", _integer),
    "aggregate": ("aggregate", _boolean),
    "mode": ("mode", _string),
    "max_wait": ("max_wait", parse_duration),
    "digest_key": ("digest_key", _field_name),
    "title": ("title_template", _template(html=False)),
    "body": ("body_template", _template(html=False)),
    "html": ("html_template", _template(html=True)),
}


# --- Wording --------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(name: str) -> str:
    """A key as TOML spells it: bare if it can be, else quoted ("billing.invoice")."""
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _show(value: object) -> str:
    """A value as the person wrote it in TOML, quoted if a string."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (int, float)):
        return str(value)
    return f"a {type(value).__name__}"


def _choices(names: Iterable[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def _one_line(text: str) -> str:
    return re.sub(r"\s*[\r\n\x0b\x0c\x85\u2028\u2029]+\s*", " ", text)
