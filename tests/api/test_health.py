"""`notifier health`'s api check: on when NOTIFIER_API_URL is set, against the server."""

from __future__ import annotations

import os
import subprocess

from notifier.ops.health import CHECK_NAMES, default_checks
from notifier.settings import Settings
from tests.api.server import NOTIFIER, ROOT, ApiServer, free_port


def health(api_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NOTIFIER, "health", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                      "NOTIFIER_API_URL": api_url})


def test_the_api_check_passes_against_the_server_and_fails_without_it(
    api_server: ApiServer,
) -> None:
    up = health(api_server.url, "--check", "api")
    assert up.returncode == 0, up.stdout + up.stderr
    assert up.stdout.startswith("ok   api") and "/v1/health" in up.stdout
    down = health(f"http://127.0.0.1:{free_port()}", "--check", "api", "--timeout", "1")
    assert down.returncode == 1 and down.stdout.startswith("FAIL api  cannot reach")


def test_the_api_check_runs_by_default_only_where_configured() -> None:
    assert "api" not in default_checks(Settings(api_url=None))
    assert default_checks(Settings(api_url="http://127.0.0.1:8000")) == CHECK_NAMES
