"""The sandbox operator-written templates compile in (Jinja2's immutable sandbox).

Templates come from an operator's file, so they can read the items but neither call
into Python internals nor change the data another part of a digest is rendered from.
It sits below ``rules`` (which checks that a rules file's templates compile) and
``templates`` (which renders digests under the rules): templates depends on rules,
never the reverse.

Both environments use ``trim_blocks`` and ``lstrip_blocks`` (a line holding only a
``{% tag %}`` leaves no blank line) and render ``None`` as an empty string. HTML is
autoescaped; the title and the text body are not.
"""

from __future__ import annotations

from functools import cache

from jinja2 import ChainableUndefined, Template
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _blank_none(value: object) -> object:
    return "" if value is None else value


def _environment(*, html: bool) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        autoescape=html,
        undefined=ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_blank_none,
    )


_ENVIRONMENTS = {False: _environment(html=False), True: _environment(html=True)}


@cache
def compile_template(source: str, *, html: bool = False) -> Template:
    """The compiled template, compiled once per source (rules are few and fixed).

    Raises ``jinja2.TemplateSyntaxError`` (with ``lineno``) if it does not compile.
    """
    return _ENVIRONMENTS[html].from_string(source)
