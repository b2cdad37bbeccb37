"""Rendering a digest (title, plain-text body, HTML body) from its rule's templates.

Templates come from an operator's file, so they run in Jinja2's immutable sandbox: they
can read the items but neither call into Python internals nor change the data another
part of the digest is rendered from. A missing ``data`` field renders as nothing, and a
template that fails at render time falls back to the built-in one of its type, then the
generic one, with a warning: a flush must never lose the notifications it gathered.

How templates compile (the sandbox, whitespace, ``None``, escaping) is
``notifier.pipeline.sandbox``; the title is folded onto one line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from notifier.pipeline.rules import BUILTIN_RULES, DEFAULT_RULE, Rule
from notifier.pipeline.sandbox import compile_template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DigestItem:
    """One notification of a digest, as templates see it (``item.data.project_name``)."""

    id: str
    title: str
    body: str
    data: dict[str, Any]
    created_at: datetime | None
    priority: str


@dataclass(frozen=True)
class RenderedDigest:
    title: str
    body: str
    html: str


#: Digest part -> (``Rule`` field holding its template, whether it is HTML).
_PARTS: dict[str, tuple[str, bool]] = {
    "title": ("title_template", False),
    "body": ("body_template", False),
    "html": ("html_template", True),
}

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def type_label(type: str) -> str:
    """The type as words, for titles: ``task_deadline`` -> ``task deadline``."""
    return type.replace("_", " ")


def render_digest(
    rule: Rule,
    items: Sequence[DigestItem],
    *,
    recipient_name: str | None = None,
    window_start: datetime | None = None,
    window_end: datetime | None = None,
) -> RenderedDigest:
    """The digest of ``items`` (all of them, however many) under ``rule``'s templates."""
    items = list(items)
    context = {
        "count": len(items),
        "items": items,
        "first": items[0] if items else None,
        "last": items[-1] if items else None,
        "type": rule.type,
        "type_label": type_label(rule.type),
        "recipient_name": recipient_name,
        "window_start": window_start,
        "window_end": window_end,
    }
    return RenderedDigest(**{part: _render_part(rule, part, context) for part in _PARTS})


def _render_part(rule: Rule, part: str, context: dict[str, Any]) -> str:
    """The part from the rule's template, else from the fallbacks, the last unguarded:
    the built-in templates only read what every digest has."""
    *guarded, last = _sources(rule, part)
    for source in guarded:
        try:
            return _render_source(source, part, context)
        except Exception as error:
            log.warning(
                "digest %s template of type %r failed (%s: %s); using the built-in one",
                part, rule.type, type(error).__name__, error,
            )
    return _render_source(last, part, context)


def _sources(rule: Rule, part: str) -> list[str]:
    field, _ = _PARTS[part]
    candidates = (rule, BUILTIN_RULES.for_type(rule.type), DEFAULT_RULE)
    return list(dict.fromkeys(getattr(candidate, field) for candidate in candidates))


def _render_source(source: str, part: str, context: dict[str, Any]) -> str:
    _, html = _PARTS[part]
    text = compile_template(source, html=html).render(context)
    if part != "title":
        return text.strip()
    title = " ".join(_CONTROL_CHARS.sub(" ", text).split())
    if not title:
        raise ValueError("the title renders empty")
    return title
