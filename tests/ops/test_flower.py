"""Flower, started by ``make flower`` exactly as a person starts it, next to a real worker.

One worker and one Flower serve the whole module (each takes seconds to start). Flower
gets its login from ``NOTIFIER_FLOWER_BASIC_AUTH`` and a free port from
``NOTIFIER_FLOWER_PORT``; ``ENV=`` keeps the recipe from sourcing ``.notifier-data/env``
(the embedded servers of a ``make run``), so Flower watches this run's broker.

What the tests pin down: the API and the dashboard refuse a missing or wrong login; with
the login, ``/api/workers`` and ``/api/tasks`` show our worker and our tasks by name
(task events are on); ``/metrics`` and ``/healthcheck`` answer *without* a login (Flower
does that by design), which is why Flower listens on 127.0.0.1 unless told otherwise; the
password never appears on a command line.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.workers import ROOT, WorkerProcess, wait_for

pytestmark = pytest.mark.slow

USER = "ops"
PASSWORD = secrets.token_urlsafe(16)
WRONG_LOGINS = [(USER, PASSWORD + "x"), ("admin", PASSWORD), (USER, "")]
#: Flower's HTTP API; the dashboard's pages need the login too.
API = ["/api/workers", "/api/tasks", "/api/task/types", "/api/queues/length"]
PAGES = ["/", "/workers", "/tasks", "/broker"]
STARTUP_TIMEOUT = 30.0
NOTIFICATIONS = 3


@dataclass
class Flower:
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str
    port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, auth: tuple[str, str] | None = (USER, PASSWORD)) -> httpx.Client:
        # trust_env=False: a proxy from the environment must not carry 127.0.0.1 requests.
        return httpx.Client(base_url=self.url, auth=auth, timeout=10, trust_env=False)

    def get_json(self, path: str) -> Any:
        with self.client() as client:
            response = client.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def stop(self) -> None:
        """SIGTERM the session (make and Flower), SIGKILL it if anything is left."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.process.poll()  # reap make, or its zombie keeps the group alive
                try:
                    os.killpg(self.process.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_flower(port: int) -> Flower:
    """``make flower`` with our login and port, in a session of its own."""
    log_fd, log_name = tempfile.mkstemp(prefix="flower-", suffix=".log")
    env = {**os.environ, "NOTIFIER_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
           "NOTIFIER_FLOWER_PORT": str(port)}
    env.pop("NOTIFIER_FLOWER_ADDRESS", None)  # the default is under test
    command = ["make", "--no-print-directory", "-s", "-o", "install",
               f"BIN={Path(sys.executable).parent}", "ENV=", "flower"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                               stdout=log_fd, stderr=subprocess.STDOUT, start_new_session=True)
    os.close(log_fd)
    return Flower(process, Path(log_name), f"http://127.0.0.1:{port}", port)


def wait_until_ready(flower: Flower, timeout: float = STARTUP_TIMEOUT) -> None:
    """Until Flower answers HTTP and its event receiver is connected to the broker."""
    def ready() -> bool:
        if flower.process.poll() is not None:
            raise RuntimeError(f"Flower exited ({flower.process.returncode}):\n{flower.log()}")
        if "Connected to" not in flower.log():
            return False
        try:
            with flower.client(auth=None) as client:
                return client.get("/healthcheck").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout, "Flower to answer")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{flower.log()}") from None


def our_workers(names: Any) -> list[str]:
    """The names of this process's test workers (tests/workers.py names them so)."""
    return [name for name in names if name.startswith(f"test{os.getpid()}-")]


@pytest.fixture(scope="module")
def flower(database: str) -> Iterator[Flower]:
    """A worker and Flower; a few notifications that Flower saw through to delivery."""
    from notifier import client

    worker: WorkerProcess | None = None
    server = start_flower(_free_port())
    try:
        worker = WorkerProcess.start()
        wait_until_ready(server)
        # Redis delivers events only to subscribers: wait until Flower has heard the
        # worker (its heartbeat, every 2 s) before sending anything.
        wait_for(lambda: our_workers(server.get_json("/api/workers?status=1")),
                 STARTUP_TIMEOUT, "Flower to hear the worker's events")
        for number in range(NOTIFICATIONS):  # critical: delivered at once, never digested
            client.notify(f"flower-{number}", "flower_check", f"Flower sees this ({number})",
                          priority="critical")

        def delivered() -> bool:
            return any(task["name"] == "notifier.deliver" and task["state"] == "SUCCESS"
                       for task in server.get_json("/api/tasks").values())
        try:
            wait_for(delivered, STARTUP_TIMEOUT, "Flower to show a delivery that succeeded")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\nworker log:\n{worker.log()}") from None
        yield server
    finally:
        server.stop()
        if worker is not None:
            worker.stop()
        server.log_path.unlink(missing_ok=True)


def test_api_and_dashboard_refuse_a_missing_or_wrong_login(flower: Flower) -> None:
    for path in API + PAGES:
        with flower.client(auth=None) as client:
            assert client.get(path).status_code == 401, path
        for auth in WRONG_LOGINS:
            with flower.client(auth=auth) as client:
                assert client.get(path).status_code == 401, (path, auth[0])
    with flower.client(auth=None) as client:  # a malformed header is no login either
        response = client.get("/api/workers", headers={"Authorization": "Basic !!!"})
        assert response.status_code == 401
        response = client.get("/")
    assert response.headers["WWW-Authenticate"].startswith("Basic")  # a browser asks


def test_the_login_opens_the_dashboard(flower: Flower) -> None:
    with flower.client() as client:
        for path in PAGES:
            response = client.get(path)
            assert response.status_code == 200, (path, response.status_code)


def test_api_workers_shows_our_worker(flower: Flower) -> None:
    """?refresh=1 makes Flower inspect the workers (stats, queues, registered tasks);
    a reply later than Flower's inspect timeout (1 s) is missing, so ask again."""
    workers: dict[str, Any] = {}

    def inspected() -> bool:
        workers.update(flower.get_json("/api/workers?refresh=1"))
        return any({"registered", "active_queues"} <= set(workers[name])
                   for name in our_workers(workers))

    wait_for(inspected, 15, "Flower's inspection of the worker")
    (name,) = our_workers(workers)
    info = workers[name]
    assert {"notifier.ingest", "notifier.deliver"} <= set(info["registered"])
    assert "notifier.critical" in {queue["name"] for queue in info["active_queues"]}


def test_api_tasks_shows_our_tasks_by_name(flower: Flower) -> None:
    """Deliveries come with the worker's events (received, started, succeeded); an
    ingest batch sends one set for the batch, counting what it carried, never the
    payload."""
    tasks = list(flower.get_json("/api/tasks").values())
    names = {task["name"] for task in tasks}
    assert {"notifier.ingest", "notifier.deliver"} <= names
    ingest = [task for task in tasks if task["name"] == "notifier.ingest"]
    assert sum(int(task["args"].split(" messages")[0].lstrip("[<")) for task in ingest) \
        >= NOTIFICATIONS
    assert all(task["state"] == "SUCCESS" and task["runtime"] is not None for task in ingest)
    assert not any("Flower sees this" in str(task) for task in tasks)
    types = flower.get_json("/api/task/types")["task-types"]
    assert {"notifier.ingest", "notifier.deliver"} <= set(types)


#: Beat's housekeeping: run every second or few, with task events off.
HOUSEKEEPING = {"notifier.flush_windows", "notifier.sweep_deliveries", "notifier.heartbeat"}


def test_beat_s_housekeeping_stays_out_of_the_task_list(flower: Flower) -> None:
    """The flush tick, the sweep and the heartbeat run (as beat sends them) but send no
    task events: a delivery published after them, whose events Flower shows, finds no
    row of theirs beside it, so the list keeps showing ingest and deliveries."""
    from notifier import client
    from notifier.storage.state import state_redis
    from notifier.worker.app import app
    from notifier.worker.flush_loop import armed_for
    from notifier.worker.heartbeat import read_heartbeat
    from notifier.worker.queues import BEAT_QUEUE

    for name in sorted(HOUSEKEEPING):
        app.send_task(name, queue=BEAT_QUEUE)
    wait_for(lambda: read_heartbeat(state_redis()).ran_at is not None, 20, "the heartbeat")
    wait_for(lambda: armed_for(state_redis()) > 0, 20, "the flush tick")

    def deliveries() -> int:
        return sum(task["name"] == "notifier.deliver" and task["state"] == "SUCCESS"
                   for task in flower.get_json("/api/tasks").values())

    before = deliveries()
    client.notify("flower-later", "flower_check", "After the housekeeping", priority="critical")
    wait_for(lambda: deliveries() > before, STARTUP_TIMEOUT, "Flower to show the delivery")
    names = {task["name"] for task in flower.get_json("/api/tasks").values()}
    assert {"notifier.ingest", "notifier.deliver"} <= names
    assert not names & HOUSEKEEPING, names
    types = set(flower.get_json("/api/task/types")["task-types"])
    assert not types & HOUSEKEEPING, types


def test_metrics_and_healthcheck_answer_without_a_login(flower: Flower) -> None:
    """By Flower's design, not ours: the reason it listens on 127.0.0.1 by default."""
    with flower.client(auth=None) as client:
        health = client.get("/healthcheck")
        metrics = client.get("/metrics")
    assert (health.status_code, health.text) == (200, "OK")
    assert metrics.status_code == 200
    for name in ("notifier.ingest", "notifier.deliver"):
        assert f'task="{name}"' in metrics.text, name
    assert 'type="task-succeeded"' in metrics.text


def _non_loopback_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_flower_listens_on_loopback_only(flower: Flower) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with pytest.raises(OSError):
        socket.create_connection((address, flower.port), timeout=2).close()


def test_the_password_is_on_no_command_line(flower: Flower) -> None:
    """make hands the login over in the environment (FLOWER_BASIC_AUTH), which `ps` does
    not show to other users, instead of a --basic-auth flag, which it does."""
    proc = Path("/proc")
    if not proc.is_dir():
        pytest.skip("needs /proc")
    session = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[3]) == flower.process.pid:  # its session id
            session.append(cmdline)
    assert any(" flower " in f"{cmdline} " for cmdline in session), session
    assert not any(PASSWORD in cmdline for cmdline in session)


# --- make run's Flower (scripts/run.py), without starting anything ---------------------


@pytest.fixture
def run_script(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """scripts/run.py as a module; sys.path and sys.modules are as before afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # run.py prepends scripts/
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("run_script", ROOT / "scripts" / "run.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in {"run_script", "local_services"} - before:
            sys.modules.pop(name, None)


def test_make_run_starts_flower_on_loopback_with_a_login(
    run_script: ModuleType, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """make run's Flower: 127.0.0.1 unless NOTIFIER_FLOWER_ADDRESS says otherwise; the
    login from NOTIFIER_FLOWER_BASIC_AUTH, else a random one for the run, never a flag."""
    for name in ("NOTIFIER_FLOWER_ADDRESS", "NOTIFIER_FLOWER_PORT", "NOTIFIER_FLOWER_BASIC_AUTH"):
        monkeypatch.delenv(name, raising=False)
    command = run_script.celery_commands()["flower"]
    assert command[-2:] == ["--address=127.0.0.1", "--port=5555"]
    assert not any("auth" in arg for arg in command)

    made = run_script.flower_login()
    user, password = made.split(":", 1)
    assert user == run_script.FLOWER_USER and len(password) >= 16
    assert "," not in made and ":" not in password  # Flower splits logins at ","
    assert password in run_script._flower_login_note  # printed once, for this run
    assert run_script.flower_login() != made

    monkeypatch.setenv("NOTIFIER_FLOWER_BASIC_AUTH", f"{USER}:{PASSWORD}")
    monkeypatch.setenv("NOTIFIER_FLOWER_ADDRESS", "0.0.0.0")
    monkeypatch.setenv("NOTIFIER_FLOWER_PORT", "5601")
    assert run_script.flower_login() == f"{USER}:{PASSWORD}"
    assert PASSWORD not in run_script._flower_login_note
    assert run_script.celery_commands()["flower"][-2:] == ["--address=0.0.0.0", "--port=5601"]
    assert run_script.flower_endpoint() == ("127.0.0.1", 5601)
