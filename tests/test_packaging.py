"""What pyproject.toml declares: every library the code imports, a base install that is
enough for a producer, the ``server`` extra for the rest, and type information shipped."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.workers import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in requirements}


BASE = _names(PROJECT["dependencies"])
SERVER = _names(PROJECT["optional-dependencies"]["server"])


def _imported_distributions(paths: list[Path]) -> dict[str, set[str]]:
    """Distribution -> the files importing it, for every import (inside functions too) of
    a library that is neither the standard library nor notifier."""
    by_module = packages_distributions()
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "notifier":
                    continue
                for distribution in by_module.get(top, [top]):
                    found.setdefault(canonicalize_name(distribution), set()).add(
                        str(path.relative_to(ROOT)))
    return found


def test_every_library_the_package_imports_is_declared():
    """Each library imported by notifier/ or the migrations shipped inside it is a base
    dependency or in the ``server`` extra (none arrives only as another's dependency)."""
    sources = [*(ROOT / "notifier").rglob("*.py"), *(ROOT / "migrations").rglob("*.py")]
    undeclared = {name: files for name, files in _imported_distributions(sources).items()
                  if name not in BASE | SERVER}
    assert undeclared == {}


def test_the_client_needs_only_the_base_dependencies():
    """Every module a fresh ``import notifier.client`` loads imports only libraries of the
    base dependencies, and the base has none of the server's."""
    script = "import json, sys, notifier.client; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = [name for name in json.loads(result.stdout) if name.split(".")[0] == "notifier"]
    files = [ROOT / Path(*name.split(".")).with_suffix(".py") for name in loaded]
    files = [path if path.exists() else path.with_suffix("") / "__init__.py" for path in files]
    assert ROOT / "notifier" / "client.py" in files
    beyond_base = {name: used for name, used in _imported_distributions(files).items()
                   if name not in BASE}
    assert beyond_base == {}
    assert not BASE & SERVER
    assert {"sqlalchemy", "psycopg", "alembic", "flower", "apprise", "httpx"} <= SERVER


def test_type_information_ships_in_the_package():
    """``notifier/py.typed`` marks the package as typed (PEP 561), inside the wheel's
    package directory, which hatch ships whole."""
    assert (ROOT / "notifier" / "py.typed").is_file()
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    wheel = tool["hatch"]["build"]["targets"]["wheel"]
    assert wheel["packages"] == ["notifier"]
    assert not {"only-include", "exclude"} & set(wheel)


def test_images_and_make_install_the_server_extra():
    """The image (workers, beat, Flower, the migrate job) and ``make install`` install
    the ``server`` extra, without which they could not start."""
    assert 'pip install ".[server]"' in (ROOT / "Dockerfile").read_text()
    install = re.search(r'^\$\(VENV\)/\.installed:.*\n\t.*pip install .*-e "\.\[([^]]*)\]"',
                        (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert install and "server" in install.group(1).split(",")
