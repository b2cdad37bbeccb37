"""Run the Alembic migrations from a checkout or from an installed package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from notifier.settings import get_settings
from notifier.storage.db import create_database_if_missing


def migrations_dir() -> Path:
    """Where the migrations are: shipped in the wheel, or the repository's folder."""
    package = Path(__file__).resolve().parent.parent  # notifier/
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("notifier's migrations are missing from this installation")


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    url = url or get_settings().database_url
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logging"] = False
    return config


def upgrade(url: str | None = None, revision: str = "head") -> bool:
    """Create the database if it is missing, then migrate it; True if it was created."""
    created = create_database_if_missing(url)
    command.upgrade(alembic_config(url), revision)
    return created


def current_revision(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from notifier.storage.db import get_engine

    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest migration this version of notifier ships."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head() or "base"
