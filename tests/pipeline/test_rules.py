"""Aggregation rules: the built-ins, the TOML file over them, one-line errors."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from notifier.pipeline.rules import (
    BUILTIN_RULES,
    DEFAULT_RULE,
    Rule,
    RuleError,
    format_duration,
    get_rules,
    load_rules,
    parse_duration,
)
from notifier.settings import ConfigError, get_settings

MINUTE = timedelta(minutes=1)


def write_rules(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str) -> str:
    """The ConfigError message of loading ``text``, checked to be one line."""
    path = write_rules(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_rules(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"NOTIFIER_RULES_FILE: {path}: ")
    return message.removeprefix(f"NOTIFIER_RULES_FILE: {path}: ")


# --- Built-ins -----------------------------------------------------------------------


@pytest.mark.parametrize(("type", "window", "max_count", "title"), [
    ("system_update", 60 * MINUTE, 10, "{{ count }} system updates"),
    ("approval_request", 15 * MINUTE, 5, "{{ count }} approvals waiting for you"),
    ("alert", 5 * MINUTE, 3, "{{ count }} alerts"),
    ("reminder", 30 * MINUTE, 10, "{{ count }} reminders"),
    ("announcement", 24 * 60 * MINUTE, 20, "{{ count }} announcements"),
    ("task_deadline", 30 * MINUTE, 10, "{{ count }} task deadlines approaching"),
])
def test_builtin_rules(type, window, max_count, title):
    """Each built-in type has the product brief's window, count and title; all aggregate
    in fixed windows, split by nothing but recipient and type."""
    rule = BUILTIN_RULES.for_type(type)
    assert (rule.type, rule.window, rule.max_count, rule.title_template) == (
        type, window, max_count, title,
    )
    assert (rule.aggregate, rule.mode, rule.digest_key, rule.longest_wait) == (
        True, "fixed", None, window,
    )
    assert load_rules(None).for_type(type) == rule


def test_unknown_types_get_the_default_rule_under_their_own_name():
    """A type without a rule is aggregated by the default rule, reported as that type."""
    rule = BUILTIN_RULES.for_type("invoice_paid")
    assert rule.type == "invoice_paid"
    assert (rule.window, rule.max_count, rule.mode) == (15 * MINUTE, 10, "fixed")
    assert rule.title_template == "{{ count }} {{ type_label }} notifications"
    assert "invoice_paid" not in BUILTIN_RULES
    assert DEFAULT_RULE.type == "*"


def test_rules_list_types_in_order_with_the_default_last():
    """Iteration and items() give every rule once, for `notifier rules`."""
    types = [type for type, _ in BUILTIN_RULES.items()]
    assert types[-1] == "*"
    assert types[:-1] == sorted(types[:-1])
    assert {"alert", "reminder", "task_deadline"} <= set(types)
    assert len(BUILTIN_RULES) == len(types) == len(list(BUILTIN_RULES))


def test_sliding_rules_wait_at_most_max_wait():
    """A sliding window's cap defaults to four windows; fixed ones wait one window."""
    assert Rule("a", 10 * MINUTE, 5, mode="sliding").longest_wait == 40 * MINUTE
    assert Rule("a", 10 * MINUTE, 5, mode="sliding", max_wait=15 * MINUTE).longest_wait == (
        15 * MINUTE
    )
    assert Rule("a", 10 * MINUTE, 5, mode="leading").longest_wait == 10 * MINUTE


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"window": timedelta(0)}, "window: must be positive, got 0s"),
    ({"max_count": 0}, "max_count: must be at least 1, got 0"),
    ({"mode": "eager"}, 'mode: expected one of "fixed", "leading", "sliding", got "eager"'),
    ({"max_wait": MINUTE}, 'max_wait: only applies to mode "sliding"'),
    ({"mode": "sliding", "max_wait": MINUTE}, "max_wait: must be at least the window (5m)"),
])
def test_rules_check_their_values(kwargs, message):
    """A Rule built in code is held to the same limits as one from the file."""
    with pytest.raises(RuleError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        Rule(**{"type": "a", "window": 5 * MINUTE, "max_count": 3, **kwargs})


# --- Durations -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", timedelta(seconds=90)),
    ("15m", timedelta(minutes=15)),
    ("1h", timedelta(hours=1)),
    ("1h30m", timedelta(minutes=90)),
    ("2d", timedelta(days=2)),
    ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
    ("90", timedelta(seconds=90)),
    ("1.5s", timedelta(seconds=1.5)),
    ("1m0.5s", timedelta(seconds=60.5)),
    (90, timedelta(seconds=90)),
    (1.5, timedelta(seconds=1.5)),
])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize(("value", "problem"), [
    ("soon", 'expected a duration like "5m" or "1h30m", got "soon"'),
    ("", 'expected a duration like "5m" or "1h30m", got ""'),
    ("30m1h", 'expected a duration like "5m" or "1h30m", got "30m1h"'),
    ("1.5h", 'expected a duration like "5m" or "1h30m", got "1.5h"'),
    ("-5m", 'expected a duration like "5m" or "1h30m", got "-5m"'),
    (True, 'expected a duration like "5m" or "1h30m", got true'),
    ([1], 'expected a duration like "5m" or "1h30m", got an array'),
    ("0s", 'must be a positive duration, got "0s"'),
    (0, "must be a positive duration, got 0"),
    (-30, "must be a positive duration, got -30"),
    (float("inf"), "must be a positive duration, got inf"),
    (10**12 * 86400, "is too long"),
])
def test_bad_durations(value, problem):
    with pytest.raises(ValueError) as error:
        parse_duration(value)
    assert str(error.value).startswith(problem)


@pytest.mark.parametrize(("text", "shown"), [
    ("90s", "1m30s"), ("15m", "15m"), ("1h30m", "1h30m"), ("2d", "2d"), ("1d1s", "1d1s"),
    (1.5, "1.5s"),
])
def test_durations_are_shown_as_they_are_written(text, shown):
    assert format_duration(parse_duration(text)) == shown
    assert parse_duration(shown) == parse_duration(text)


# --- The TOML file -------------------------------------------------------------------


def test_a_type_table_overrides_only_its_keys(tmp_path):
    """Keys left out keep the built-in rule's values, templates included."""
    rules = load_rules(write_rules(tmp_path, """
        [types.alert]
        window = "10m"
        mode = "leading"
    """))
    alert = rules.for_type("alert")
    assert (alert.window, alert.mode, alert.max_count) == (10 * MINUTE, "leading", 3)
    assert alert.title_template == "{{ count }} alerts"
    assert rules.for_type("reminder") == BUILTIN_RULES.for_type("reminder")


def test_the_full_example_of_the_docstring(tmp_path):
    """Every key of a type table is read."""
    rules = load_rules(write_rules(tmp_path, '''
        [types.task_deadline]
        window = "30m"
        max_count = 5
        mode = "sliding"
        max_wait = "2h"
        digest_key = "project_id"
        title = "{{ count }} task deadlines approaching in {{ items[0].data.project_name }}"
        body = """{% for item in items %}{{ item.title }}{% endfor %}"""
        html = "<p>{{ count }}</p>"

        [types.security_alert]
        aggregate = false
    '''))
    rule = rules.for_type("task_deadline")
    assert (rule.window, rule.max_count, rule.mode, rule.max_wait, rule.digest_key) == (
        30 * MINUTE, 5, "sliding", 120 * MINUTE, "project_id",
    )
    assert rule.longest_wait == 120 * MINUTE
    assert rule.title_template.endswith("{{ items[0].data.project_name }}")
    assert rule.html_template == "<p>{{ count }}</p>"
    security = rules.for_type("security_alert")
    assert security.aggregate is False
    assert "security_alert" in rules


def test_new_types_start_from_the_changed_default(tmp_path):
    """[default] changes the rule of types without their own, and is the base of new
    type tables; the built-in types keep their own rules."""
    rules = load_rules(write_rules(tmp_path, """
        [default]
        window = "1h"
        max_count = 50

        [types."billing.invoice"]
        max_count = 2
    """))
    assert (rules.default.window, rules.default.max_count) == (60 * MINUTE, 50)
    assert rules.for_type("other").window == 60 * MINUTE
    invoice = rules.for_type("billing.invoice")
    assert (invoice.window, invoice.max_count) == (60 * MINUTE, 2)
    assert invoice.title_template == "{{ count }} {{ type_label }} notifications"
    assert rules.for_type("alert").window == 5 * MINUTE


def test_a_cap_inherited_from_a_sliding_default_is_dropped_with_the_mode(tmp_path):
    """max_wait belongs to sliding windows: a type that picks another mode loses it."""
    rules = load_rules(write_rules(tmp_path, """
        [default]
        mode = "sliding"
        max_wait = "2h"

        [types.fixed_one]
        mode = "fixed"

        [types.sliding_one]
        window = "5m"
    """))
    assert rules.for_type("fixed_one").max_wait is None
    assert rules.for_type("sliding_one").longest_wait == 120 * MINUTE


def test_an_empty_file_gives_the_builtin_rules(tmp_path):
    rules = load_rules(write_rules(tmp_path, ""))
    assert list(rules) == list(BUILTIN_RULES)
    assert load_rules("") is BUILTIN_RULES


@pytest.mark.parametrize(("text", "problem"), [
    ('[types.alert]\nwindow = "soon"',
     'types.alert.window: expected a duration like "5m" or "1h30m", got "soon"'),
    ('[types.alert]\nwindow = "0m"', 'types.alert.window: must be a positive duration, got "0m"'),
    ("[types.alert]\nwindow = -5", "types.alert.window: must be a positive duration, got -5"),
    ("[types.alert]\nmax_count = 0", "types.alert.max_count: must be at least 1, got 0"),
    ('[types.alert]\nmax_count = "5"', 'types.alert.max_count: expected an integer, got "5"'),
    ("[types.alert]\nmax_count = 2.5", "types.alert.max_count: expected an integer, got 2.5"),
    ('[types.alert]\naggregate = "no"', 'types.alert.aggregate: expected true or false, got "no"'),
    ('[types.alert]\nmode = "eager"',
     'types.alert.mode: expected one of "fixed", "leading", "sliding", got "eager"'),
    ("[types.alert]\nmode = 1", "types.alert.mode: expected a string, got 1"),
    ('[types.alert]\nmode = "sliding"\nmax_wait = "1m"',
     "types.alert.max_wait: must be at least the window (5m), got 1m"),
    ('[types.alert]\nmax_wait = "1h"',
     'types.alert.max_wait: only applies to mode "sliding", and the mode is "fixed"'),
    ('[types.alert]\ndigest_key = ""', 'types.alert.digest_key: expected the name of a field'),
    ("[types.alert]\nwindw = 5", 'types.alert.windw: unknown key; expected "window", '),
    ("[types.alert]\ntitle = 5", "types.alert.title: expected a string, got 5"),
    ('[types.alert]\ntitle = "{{ count }"',
     "types.alert.title: template error on line 1: unexpected '}'"),
    ('[types.alert]\nbody = """\nline\n{% for x in items %}\n"""',
     "types.alert.body: template error on line 2: Unexpected end of template."),
    ('[types.alert]\nhtml = "{{ count | nosuchfilter }}"',
     "types.alert.html: template error on line 1: No filter named 'nosuchfilter'."),
    ('[types."Bad Type"]\nmax_count = 2', 'types."Bad Type": not a notification type'),
    ("[types]\nalert = 5", "types.alert: expected a table, got 5"),
    ("types = 5", "types: expected a table, got 5"),
    ('[default]\nwindow = "x"', 'default.window: expected a duration like "5m"'),
    ("[defaults]\nwindow = 5", 'defaults: unknown key; expected "default", "types"'),
    ("[types.alert\n", "not valid TOML: Expected ']' at the end of a table declaration"
                       " (at line 1, column 13)"),
    ('[types.alert]\nwindow = "5m"\nwindow = "6m"', "not valid TOML: Cannot overwrite a value"),
])
def test_mistakes_in_the_file_name_file_key_and_problem(tmp_path, text, problem):
    """Each mistake is one line: variable, file, dotted key, what is wrong."""
    assert load_error(tmp_path, text).startswith(problem)


def test_a_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=f"^NOTIFIER_RULES_FILE: {path}: no such file$"):
        load_rules(path)


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_bytes(b'[types.alert]\ntitle = "\xff"\n')
    with pytest.raises(ConfigError, match=f"^NOTIFIER_RULES_FILE: {path}: not valid UTF-8"):
        load_rules(path)


def test_a_directory_is_not_a_rules_file(tmp_path):
    with pytest.raises(ConfigError, match=f"^NOTIFIER_RULES_FILE: {tmp_path}: cannot be read"):
        load_rules(tmp_path)


def test_get_rules_reads_the_file_named_by_the_environment(tmp_path, monkeypatch):
    """get_rules() loads NOTIFIER_RULES_FILE once per process."""
    path = write_rules(tmp_path, "[types.alert]\nmax_count = 7\n")
    monkeypatch.setenv("NOTIFIER_RULES_FILE", str(path))
    get_settings.cache_clear()
    get_rules.cache_clear()
    try:
        assert get_rules().for_type("alert").max_count == 7
        assert get_rules() is get_rules()
        monkeypatch.delenv("NOTIFIER_RULES_FILE")
        get_settings.cache_clear()
        get_rules.cache_clear()
        assert get_rules() is BUILTIN_RULES
    finally:
        get_settings.cache_clear()
        get_rules.cache_clear()
