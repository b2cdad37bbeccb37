"""Migrations: they build an empty database from the repository root and match the models."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from notifier.storage.models import Base
from tests.conftest import DATABASE_URL, SERVER_URL
from tests.workers import ROOT

ALEMBIC = str(Path(sys.executable).with_name("alembic"))


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = f"notifier_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"{SERVER_URL}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield f"{SERVER_URL}/{name}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def _alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ALEMBIC, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NOTIFIER_DATABASE_URL": url}, timeout=120)


def test_alembic_upgrade_head_from_the_repository_root(empty_database):
    """`alembic upgrade head` builds every table on an empty database, and downgrades."""
    assert _alembic(empty_database, "upgrade", "head").returncode == 0
    engine = create_engine(empty_database)
    tables = set(inspect(engine).get_table_names())
    assert {"notifications", "deliveries", "digests", "dead_letters", "recipients"} <= tables
    engine.dispose()
    downgrade = _alembic(empty_database, "downgrade", "base")
    assert downgrade.returncode == 0, downgrade.stderr


def test_models_match_the_migrations():
    """The SQLAlchemy models describe exactly the schema the migrations build."""
    engine = create_engine(DATABASE_URL)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []


def test_migrations_ship_inside_the_wheel_layout():
    """The wheel maps migrations/ into the package, where `notifier db upgrade` looks."""
    import tomllib

    from notifier.storage.migrate import migrations_dir

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    included = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert included["migrations"] == "notifier/_migrations"
    assert migrations_dir() == ROOT / "migrations"


def test_upgrades_started_at_once_take_turns():
    """Three ``notifier db upgrade`` at once on a database that does not exist yet (an init
    container per pod): the first creates it, the others meet it created meanwhile, the
    migrations run once under the lock and every command ends well at head."""
    name = f"notifier_mig_{uuid.uuid4().hex[:8]}"
    url = f"{SERVER_URL}/{name}"
    notifier = str(Path(sys.executable).with_name("notifier"))
    env = {**os.environ, "NOTIFIER_DATABASE_URL": url}
    try:
        runs = [subprocess.Popen([notifier, "db", "upgrade"], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for _ in range(3)]
        results = [(run.wait(timeout=180), *run.communicate()) for run in runs]
        for code, out, err in results:
            assert code == 0, out + err
            assert "Traceback" not in err
        engine = create_engine(url)
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
        engine.dispose()
        from notifier.storage.migrate import head_revision
        assert current == head_revision()
    finally:
        admin = create_engine(f"{SERVER_URL}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
