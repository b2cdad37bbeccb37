"""GET|PUT /v1/recipients/{id}/preferences: the model `notifier recipients` edits."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import httpx

from tests.api.server import NOTIFIER, ROOT, ApiServer


def test_put_changes_what_it_names_and_the_cli_sees_it(api: httpx.Client) -> None:
    assert api.get("/v1/recipients/ann/preferences").status_code == 404
    put = api.put("/v1/recipients/ann/preferences", json={
        "email": "ann@example.com", "timezone": "Europe/Berlin", "digest_mode": "daily",
        "digest_time": "07:30", "opt_out": {"marketing": ["email"]},
        "quiet_hours": [{"days": ["sat", "sun"], "start": "00:00", "end": "24:00"}],
    })
    assert put.status_code == 200, put.text
    stored = put.json()
    assert stored["email"] == "ann@example.com" and stored["digest_time"] == "07:30"
    assert api.get("/v1/recipients/ann/preferences").json() == stored
    shown = subprocess.run([NOTIFIER, "recipients", "show", "ann", "--json"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    import json

    cli = json.loads(shown.stdout)
    assert {k: cli[k] for k in stored} == stored
    # Only the fields named change; null restores a default.
    again = api.put("/v1/recipients/ann/preferences", json={"digest_mode": None}).json()
    assert again["digest_mode"] == "immediate" and again["email"] == "ann@example.com"


def test_bad_fields_are_422_naming_each_and_nothing_is_written(api: httpx.Client) -> None:
    answer = api.put("/v1/recipients/bob/preferences",
                     json={"email": "not-an-address", "colour": "red", "recipient_id": "x"})
    assert answer.status_code == 422
    fields = {problem["field"] for problem in answer.json()["detail"]}
    assert fields & {"colour", "recipient_id"}
    bad = api.put("/v1/recipients/bob/preferences", json={"min_priority": "urgent"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "min_priority"
    assert api.put("/v1/recipients/bob/preferences", json=[1]).status_code == 422
    assert api.get("/v1/recipients/bob/preferences").status_code == 404


def test_url_addresses_are_masked(api: httpx.Client) -> None:
    hook = "https://hooks.slack.com/services/T0000/B0000/XXXXXXXXXXXXXXXXXXXXXXXX"
    answer = api.put("/v1/recipients/cy/preferences", json={"addresses": {"slack": hook}})
    assert answer.status_code == 200
    assert answer.json()["addresses"]["slack"] != hook


def test_a_read_key_reads_and_a_send_key_writes(
    api_server: ApiServer, make_key: Callable[..., str],
) -> None:
    url = f"{api_server.url}/v1/recipients/dee/preferences"
    read = {"Authorization": f"Bearer {make_key('read')}"}
    send = {"Authorization": f"Bearer {make_key('send')}"}
    assert httpx.put(url, json={"name": "Dee"}, headers=read).status_code == 403
    assert httpx.put(url, json={"name": "Dee"}, headers=send).status_code == 200
    assert httpx.get(url, headers=read).json()["name"] == "Dee"
