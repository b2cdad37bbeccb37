"""Digest rendering: every item, escaping in HTML only, no lost digest on a bad template."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from notifier.pipeline.rules import BUILTIN_RULES, Rule
from notifier.pipeline.templates import DigestItem, RenderedDigest, compile_template, render_digest


def item(number: int, *, title: str | None = None, body: str = "", **data) -> DigestItem:
    return DigestItem(
        id=f"id-{number}",
        title=title or f"Task {number} is due",
        body=body,
        data=data,
        created_at=datetime(2026, 1, 1, 9, number % 60, tzinfo=UTC),
        priority="normal",
    )


def custom(**templates: str) -> Rule:
    """The task_deadline rule with some templates replaced."""
    return replace(BUILTIN_RULES.for_type("task_deadline"), **templates)


def test_builtin_title_counts_items():
    items = [item(1), item(2), item(3)]
    digest = render_digest(BUILTIN_RULES.for_type("task_deadline"), items)
    assert isinstance(digest, RenderedDigest)
    assert digest.title == "3 task deadlines approaching"
    assert render_digest(BUILTIN_RULES.for_type("alert"), items).title == "3 alerts"


def test_default_title_names_the_type_in_words():
    rule = BUILTIN_RULES.for_type("invoice_paid")
    assert render_digest(rule, [item(1), item(2)]).title == "2 invoice paid notifications"


def test_default_body_lists_each_item_with_its_body_indented():
    digest = render_digest(
        BUILTIN_RULES.for_type("reminder"),
        [item(1, body="Due at noon.\nIn room 4."), item(2)],
    )
    assert digest.body == (
        "- Task 1 is due\n"
        "  Due at noon.\n"
        "  In room 4.\n"
        "- Task 2 is due"
    )
    assert digest.html.startswith("<ul>")
    assert digest.html.count("<li>") == 2
    assert "Due at noon." in digest.html


def test_all_of_fifty_items_are_rendered():
    """No cap on the items a digest shows, unlike some hosted services."""
    items = [item(number) for number in range(50)]
    digest = render_digest(BUILTIN_RULES.for_type("alert"), items)
    assert digest.title == "50 alerts"
    assert digest.body.count("\n- ") == 49
    assert digest.html.count("<li>") == 50
    for number in range(50):
        assert f"Task {number} is due" in digest.body
        assert f"Task {number} is due" in digest.html


def test_html_is_escaped_and_text_is_not():
    digest = render_digest(
        BUILTIN_RULES.for_type("alert"), [item(1, title="<script>alert(1)</script>")]
    )
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in digest.html
    assert "<script>" not in digest.html
    assert "- <script>alert(1)</script>" in digest.body


def test_the_context_has_every_documented_name():
    start = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
    rule = custom(
        title_template="{{ count }} for {{ recipient_name }} of {{ type }} ({{ type_label }})",
        body_template=(
            "{{ first.id }}..{{ last.id }} {{ window_start.isoformat() }}"
            " {{ (window_end - window_start).seconds }} {{ items | length }}"
            " {{ items[0].data.project_name }} {{ first.priority }}"
        ),
    )
    digest = render_digest(
        rule, [item(1, project_name="Apollo"), item(2)], recipient_name="Ada",
        window_start=start, window_end=start + timedelta(minutes=30),
    )
    assert digest.title == "2 for Ada of task_deadline (task deadline)"
    assert digest.body == "id-1..id-2 2026-01-01T09:00:00+00:00 1800 2 Apollo normal"


def test_a_missing_data_field_renders_as_nothing():
    """A template written for data some producer does not send still renders."""
    rule = custom(
        title_template="{{ count }} deadlines in {{ items[0].data.project.name }}",
        body_template="[{{ first.data.missing }}][{{ recipient_name }}]",
    )
    digest = render_digest(rule, [item(1)])
    assert digest.title == "1 deadlines in"
    assert digest.body == "[][]"


def test_the_title_is_one_line():
    """It becomes an e-mail subject: line breaks and control characters are folded."""
    rule = custom(title_template="{{ count }}\n  deadlines\r\n{{ first.title }}\x07!")
    assert render_digest(rule, [item(1, title="a\tb")]).title == "1 deadlines a b !"


@pytest.mark.parametrize("bad", [
    "{{ 1/0 }}",
    "{{ count }",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ first.data.update({'x': 1}) }}",
    "  ",
])
def test_a_failing_template_falls_back_to_the_builtin_one(bad, caplog):
    """Division by zero, a syntax error, sandbox violations, an empty title: the digest
    is still delivered, with the built-in template, and a warning is logged."""
    rule = custom(title_template=bad, body_template=bad, html_template=bad)
    with caplog.at_level(logging.WARNING, logger="notifier.pipeline.templates"):
        digest = render_digest(rule, [item(1), item(2)])
    assert digest.title == "2 task deadlines approaching"
    if bad.strip():
        assert digest.body == "- Task 1 is due\n- Task 2 is due"
        assert digest.html.count("<li>") == 2
    assert "task_deadline" in caplog.text
    assert "using the built-in one" in caplog.text


def test_a_custom_type_falls_back_to_the_generic_templates(caplog):
    rule = replace(BUILTIN_RULES.for_type("deploy"), title_template="{{ 1/0 }}")
    with caplog.at_level(logging.WARNING, logger="notifier.pipeline.templates"):
        assert render_digest(rule, [item(1)]).title == "1 deploy notifications"
    assert "ZeroDivisionError" in caplog.text


def test_templates_are_compiled_once_per_source():
    assert compile_template("{{ count }}") is compile_template("{{ count }}")
    assert compile_template("{{ count }}", html=True) is not compile_template("{{ count }}")
