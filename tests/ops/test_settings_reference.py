"""docs/configuration.md is rendered from ``Settings`` and must match it: a setting added,
renamed or re-documented in notifier/settings.py without ``make docs`` fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from notifier.ops import settings_reference
from notifier.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / settings_reference.PAGE


def test_the_configuration_page_is_what_make_docs_renders():
    assert PAGE.read_text() == settings_reference.render(), (
        f"{settings_reference.PAGE} is stale: run `make docs` and commit it"
    )


def test_every_setting_is_documented_and_on_the_page():
    page = PAGE.read_text()
    undocumented = [name for name, field in Settings.model_fields.items()
                    if not (field.description or "").strip()]
    assert undocumented == [], "give these fields a docstring in notifier/settings.py"
    missing = [name for name in Settings.model_fields
               if f"`NOTIFIER_{name.upper()}" not in page]
    assert missing == []


def test_every_setting_is_in_exactly_one_section():
    placed = [name for _, names in settings_reference.sections() for name in names]
    assert sorted(placed) == sorted(Settings.model_fields)
    titles = [title for title, _ in settings_reference.sections()]
    assert titles[:3] == ["Connections and ingest", "Limits",
                          "Retention (``notifier/pipeline/retention.py``, ``docs/retention.md``)"]


def test_the_command_prints_the_page_whatever_the_environment_says():
    """The tests' own NOTIFIER_* values (visibility timeout 4 s, ...) must not leak into
    the defaults, nor a channel URL holding a password."""
    env = {**os.environ, "NOTIFIER_CHANNELS__EMAIL": "smtp://mailer:hunter22@mail.example:587",
           "NOTIFIER_INGEST_BATCH_SIZE": "7"}
    printed = subprocess.run(
        [sys.executable, "-m", "notifier.ops.settings_reference"], env=env, cwd=REPO,
        capture_output=True, text=True, check=True,
    ).stdout
    assert printed == PAGE.read_text()
    assert "hunter22" not in printed
    assert "| `NOTIFIER_VISIBILITY_TIMEOUT` | `int`, ≥ 1 | `300` |" in printed


class _Example(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXAMPLE_", env_nested_delimiter="__",
                                      use_attribute_docstrings=True)

    # --- Connections ---------------------------------------------------------------
    url: str = "smtp://mailer:s3cret-pass@mail.example:587?token=abcdef123456"
    """Where to connect; see ``retries``."""
    retries: int = Field(3, ge=0, le=10)
    """How often to try, or 0 | never."""

    # --- Routes (``docs/egress.md``) ------------------------------------------------
    routes: dict[str, str] = {"a": "https://hooks.example.org/services/T0/B0/XXXXXXXXXXXX"}
    """One URL per route."""
    names: list[str] | None = None
    """Names."""


def test_a_rendered_section_masks_secrets_and_names_variables():
    page = settings_reference.render(_Example)
    assert "s3cret-pass" not in page and "abcdef123456" not in page
    assert "XXXXXXXXXXXX" not in page
    assert "`smtp://mailer:***@mail.example:587?token=***`" in page
    # A field named in a description becomes its variable; a | cannot break the table.
    assert ("| `EXAMPLE_URL` | `str` | `smtp://mailer:***@mail.example:587?token=***`"
            " | Where to connect; see `EXAMPLE_RETRIES`. |") in page
    assert ("| `EXAMPLE_RETRIES` | `int`, ≥ 0, ≤ 10 | `3`"
            " | How often to try, or 0 \\| never. |") in page
    assert "## Routes\n\nSee also [egress.md](egress.md)." in page
    assert "| `EXAMPLE_ROUTES__<NAME>` | `str` per key | `a`: `https://" in page
    assert "| `EXAMPLE_NAMES` | JSON list of `str` | unset | Names. |" in page
    assert "Read outside `Settings`" not in page
