"""``make run``: the whole pipeline on this machine, fed a demo, in one command.

Steps: make sure Postgres and Redis answer (embedded ones otherwise, see
``local_services.py``), create and migrate the database, start a worker, beat, Flower and
the HTTP API in the background (logs and pids in ``.run/``), wait for the worker, send a
few demo notifications plus one invalid message, wait until Postgres has them and print
what happened, then the inbox demo page's address (the API runs with
``NOTIFIER_API_DEMO`` on and a token secret made for the run unless one is set). Running
it again reuses what already runs.

``python scripts/run.py stop`` stops the API, worker, beat and Flower, then the embedded
servers.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import local_services  # a sibling script, not a package

REPO = local_services.REPO
#: Logs and pids of worker, beat and Flower; embedded servers' data. ``--run-dir`` and
#: ``--data-dir`` move them (the fallback test keeps both in a temp dir).
RUN_DIR = REPO / ".run"
DATA_DIR = local_services.DEFAULT_DATA_DIR
FLOWER_USER = "notifier"  # of the login made for Flower when none is given
WORKER_NAME = "run"
WORKER_TIMEOUT = 60.0  # a cold worker on a small machine takes a few seconds
COMMIT_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0  # a warm shutdown lets the worker finish its batch
API_TIMEOUT = 60.0  # a cold API process imports FastAPI and the pipeline
#: Whose inbox the demo page opens on: carol, whose alerts the demo folds into a digest.
DEMO_RECIPIENT = "carol"


def celery_commands() -> dict[str, list[str]]:
    """The background processes, run with this interpreter so the venv is used."""
    celery = [sys.executable, "-m", "celery", "-A", "notifier"]
    address, port = flower_address()
    return {
        "worker": [*celery, "worker", "-l", "info", "-n", f"{WORKER_NAME}@%h"],
        "beat": [*celery, "beat", "-l", "info",
                 "--schedule", str(RUN_DIR / "celerybeat-schedule")],
        "flower": [*celery, "flower", f"--address={address}", f"--port={port}"],
    }


def api_command() -> list[str]:
    """``notifier api`` from this venv (its settings say where it listens)."""
    return [sys.executable, str(Path(sys.executable).with_name("notifier")), "api"]


def api_endpoint() -> tuple[str, int]:
    """Where this machine reaches the API (NOTIFIER_API_ADDRESS, NOTIFIER_API_PORT)."""
    from notifier.settings import get_settings

    settings = get_settings()
    address = settings.api_address
    return ("127.0.0.1" if address in ("0.0.0.0", "::") else address), settings.api_port


def _url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def flower_address() -> tuple[str, int]:
    """Where Flower listens: NOTIFIER_FLOWER_ADDRESS (default 127.0.0.1, because its
    /metrics and /healthcheck answer without a login) and NOTIFIER_FLOWER_PORT (5555)."""
    address = os.environ.get("NOTIFIER_FLOWER_ADDRESS") or "127.0.0.1"
    port = os.environ.get("NOTIFIER_FLOWER_PORT") or "5555"
    if not port.isdigit() or not 0 < int(port) < 65536:
        _fail(f"NOTIFIER_FLOWER_PORT: not a port number: {port!r}")
    return address, int(port)


def flower_endpoint() -> tuple[str, int]:
    """Where this machine reaches Flower (on loopback if it listens on every address)."""
    address, port = flower_address()
    return ("127.0.0.1" if address in ("0.0.0.0", "::") else address), port


def _marker(name: str) -> str:
    """What a process's command line holds, so a reused pid is never taken for ours."""
    return "notifier api" if name == "api" else f"-A notifier {name}"


def _log(name: str) -> str:
    return local_services.display(RUN_DIR / f"{name}.log")


def _fail(message: str) -> None:
    """Stop with one line a person can act on."""
    print(f"run: {message}", file=sys.stderr)
    raise SystemExit(1)


# --- services and database -------------------------------------------------------------


def use_services() -> None:
    """Point this process (and its children, via the environment) at answering services.

    ``notifier.worker.app`` already read the broker URL when ``local_services`` imported
    the settings, so the app is re-pointed too: our demo must reach the same broker.
    """
    changed = local_services.ensure_services(DATA_DIR)
    os.environ.update(changed)
    from notifier.settings import get_settings, mask_url
    from notifier.worker.app import app

    get_settings.cache_clear()
    settings = get_settings()
    app.conf.broker_url = settings.broker_url
    print(f"Postgres: {mask_url(settings.database_url)}")
    print(f"Broker:   {mask_url(settings.broker_url)}")


def migrate() -> None:
    """Create the database if missing and bring its schema to the newest revision."""
    from sqlalchemy.engine import make_url

    from notifier.settings import get_settings
    from notifier.storage.migrate import upgrade

    created = upgrade()
    database = make_url(get_settings().database_url).database
    print(f"Database {database}: {'created and ' if created else ''}migrated to head.")


# --- background processes ---------------------------------------------------------------


def running_pid(name: str) -> int | None:
    """The pid of our ``name`` process if it still runs, else None."""
    pid = local_services.read_pid(RUN_DIR / f"{name}.pid")
    return pid if local_services.process_alive(pid, _marker(name)) else None


def start_process(name: str, command: list[str]) -> int:
    """Start ``command`` detached (own session: Ctrl-C on make does not reach it)."""
    env = dict(os.environ)
    env.pop("NOTIFIER_FLOWER_BASIC_AUTH", None)  # Flower's login is for Flower only
    if name == "flower":
        env["FLOWER_BASIC_AUTH"] = flower_login()
    if name == "api":
        env.update(api_environment())
    with open(RUN_DIR / f"{name}.log", "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    (RUN_DIR / f"{name}.pid").write_text(f"{process.pid}\n")
    return process.pid


def start_background() -> None:
    """Start worker, beat, Flower and the API unless they already run."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    for name, command in {**celery_commands(), "api": api_command()}.items():
        pid = running_pid(name)
        if pid:
            print(f"{name:<6} already runs (pid {pid}), log {_log(name)}")
            continue
        if name == "api" and listens(api_endpoint()):
            host, port = api_endpoint()
            print(f"api    not started: something else listens on {host}:{port}"
                  " (NOTIFIER_API_PORT picks another port)")
            continue
        pid = start_process(name, command)
        print(f"{name:<6} started (pid {pid}), log {_log(name)}")


#: How the API this run started got its token secret (stays None when it already ran).
_api_secret_note: str | None = None


def api_environment() -> dict[str, str]:
    """The API's demo page on, and a key to sign its recipient tokens: NOTIFIER_API_TOKEN_SECRET,
    or one made for this run (in the API's environment only, stored nowhere)."""
    global _api_secret_note
    secret = os.environ.get("NOTIFIER_API_TOKEN_SECRET")
    _api_secret_note = ("tokens signed with NOTIFIER_API_TOKEN_SECRET" if secret else
                        "tokens signed with a key made for this run")
    return {"NOTIFIER_API_DEMO": "true",
            "NOTIFIER_API_TOKEN_SECRET": secret or secrets.token_urlsafe(32)}


#: How the Flower this run started logs in (stays None when Flower already ran).
_flower_login_note: str | None = None


def flower_login() -> str:
    """Flower's ``user:password``: NOTIFIER_FLOWER_BASIC_AUTH, or one made for this run.

    It reaches Flower as FLOWER_BASIC_AUTH in its environment, which `ps` does not show
    (a --basic-auth flag it would). A made one is printed once and stored nowhere.
    """
    global _flower_login_note
    login = os.environ.get("NOTIFIER_FLOWER_BASIC_AUTH")
    if login:
        _flower_login_note = "login from NOTIFIER_FLOWER_BASIC_AUTH"
        return login
    password = secrets.token_urlsafe(12)  # no ':' or ',' (Flower splits logins at ',')
    _flower_login_note = (f"login {FLOWER_USER} / {password}, made for this run"
                          " (choose one: NOTIFIER_FLOWER_BASIC_AUTH=user:password)")
    return f"{FLOWER_USER}:{password}"


def wait_for_worker(timeout: float = WORKER_TIMEOUT) -> None:
    """Block until our worker answers a ping: demo messages need a consumer."""
    from notifier.worker.app import app

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running_pid("worker"):
            _fail(f"the worker exited while starting; see {_log('worker')}")
        replies = app.control.ping(timeout=1.0)
        if any(name.startswith(f"{WORKER_NAME}@") for reply in replies for name in reply):
            print("Worker answers.")
            return
    _fail(f"the worker did not answer within {timeout:.0f}s; see {_log('worker')}")


def listens(endpoint: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(endpoint, timeout=0.5):
            return True
    except OSError:
        return False


def flower_listens(timeout: float = 10.0) -> bool:
    """Whether Flower's port accepts connections (it takes a moment to open it)."""
    return local_services.wait_until(lambda: listens(flower_endpoint()), timeout, 0.2)


def api_answers(timeout: float = API_TIMEOUT) -> bool:
    """Whether our API answers ``/v1/health`` (False at once if it is not running)."""
    import urllib.request

    health = f"{_url(*api_endpoint())}/v1/health"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(health, timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    return bool(running_pid("api")) and local_services.wait_until(
        lambda: answers() or not running_pid("api"), timeout, 0.2) and answers()


# --- the demo ---------------------------------------------------------------------------


@dataclass
class Demo:
    """What the demo sent: notification ids, and the task id of the invalid message."""

    ids: list[str]
    invalid_task_id: str


def send_demo() -> Demo:
    """Send one critical and one normal notification, a batch of 20, three alerts that
    become one digest, and a bad message.

    The bad one goes around the client (which would refuse it) as a foreign producer
    would send it, to show that ingest parks it as a dead letter instead of failing.
    """
    from notifier.client import INGEST_TASK, notify, notify_many
    from notifier.worker.app import app

    ids = [
        notify("alice", "security.login", "New sign-in to your account",
               "From Firefox on Linux.", priority="critical"),
        notify("bob", "comment.reply", "Carol replied to your comment", "Looks good!"),
    ]
    ids += notify_many(_batch(20))
    # Three alerts reach the rule's maximum (3): the flush loop sends them as one digest at once.
    ids += [notify("carol", "alert", f"Build {build} failed", f"Pipeline {build} is red.")
            for build in (101, 102, 103)]
    bad = {"recipient": "alice", "type": "Password Reset!", "title": "", "priority": "urgent"}
    result = app.send_task(INGEST_TASK, args=[bad], queue="notifier.low")
    print(f"Sent {len(ids)} notifications and 1 invalid message.")
    return Demo(ids, result.id)


def _batch(count: int) -> list[dict[str, Any]]:
    """Notifications of mixed types and priorities for ``notify_many``."""
    kinds = [("order.shipped", "high", "Your order has shipped"),
             ("comment.reply", "normal", "New reply in your thread"),
             ("digest.weekly", "low", "Your week in review"),
             ("billing.invoice", "normal", "Your invoice is ready")]
    batch = []
    for index in range(count):
        kind, priority, title = kinds[index % len(kinds)]
        batch.append({"recipient": f"user-{index % 5 + 1}", "type": kind, "priority": priority,
                      "title": f"{title} (#{index + 1})", "data": {"demo": True}})
    return batch


def wait_for_commit(demo: Demo, timeout: float = COMMIT_TIMEOUT) -> str:
    """Poll Postgres until every demo row and the dead letter are there; the reason."""
    from sqlalchemy import text

    from notifier.storage.db import get_engine

    ids = [uuid.UUID(value) for value in demo.ids]
    reason: str | None = None
    stored = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with get_engine().connect() as connection:
            stored = connection.execute(
                text("SELECT count(*) FROM notifications WHERE id = ANY(:ids)"), {"ids": ids}
            ).scalar_one()
            reason = connection.execute(
                text("SELECT reason FROM dead_letters WHERE dedup_key LIKE :key"),
                {"key": f"ingest:{demo.invalid_task_id}:%"},
            ).scalar()
        if stored == len(ids) and reason:
            return reason
        time.sleep(0.25)
    _fail(f"after {timeout:.0f}s Postgres holds {stored} of {len(ids)} demo notifications"
          f"{'' if reason else ' and no dead letter'}; see {_log('worker')}")
    raise AssertionError("unreachable")


def report(demo: Demo, reason: str) -> None:
    """Print the notifications table by status and priority, the dead letter, next steps."""
    from sqlalchemy import text

    from notifier.settings import PRIORITIES
    from notifier.storage.db import get_engine

    show_digest(demo)
    with get_engine().connect() as connection:
        rows = connection.execute(text(
            "SELECT status, priority, count(*) FROM notifications GROUP BY 1, 2"
        )).all()
    counts = {(status, priority): count for status, priority, count in rows}
    statuses = sorted({status for status, _ in counts})
    print(f"\nAll {len(demo.ids)} demo notifications are in Postgres. The notifications table"
          " (every run so far)\nby status and priority; pending ones wait in a digest window:")
    print(f"  {'':<12}" + "".join(f"{p:>10}" for p in PRIORITIES))
    for status in statuses:
        print(f"  {status:<12}" + "".join(f"{counts.get((status, p), 0):>10}" for p in PRIORITIES))
    print(f"\nThe invalid message became a dead letter (stage ingest): {reason}")
    print_next_steps()


def show_digest(demo: Demo, timeout: float = COMMIT_TIMEOUT) -> None:
    """Wait for this run's three alerts to come out as one digest in carol's inbox."""
    from sqlalchemy import text

    from notifier.storage.db import get_engine

    alerts = [uuid.UUID(value) for value in demo.ids[-3:]]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with get_engine().connect() as connection:
            found = connection.execute(text(
                "SELECT m.title, m.body FROM inbox_messages m JOIN digests d ON d.id = m.digest_id"
                " WHERE d.notification_ids && CAST(:ids AS uuid[])"), {"ids": alerts}).first()
        if found:
            print(f"\ncarol's three alerts arrived as one digest in her inbox: \"{found.title}\"")
            for line in found.body.splitlines()[:6]:
                print(f"    {line}")
            return
        time.sleep(0.25)
    print(f"\ncarol's alert digest has not arrived yet: is beat running? ({_log('beat')})")


def print_next_steps() -> None:
    """Where to look further (the inbox demo first), including how a new shell reaches
    embedded servers."""
    print("\nLook further:")
    if api_answers():
        demo = f"{_url(*api_endpoint())}/inbox/demo?recipient={DEMO_RECIPIENT}"
        print(f"  {demo}\n  {'':<26} {DEMO_RECIPIENT}'s inbox in a browser, live: send one with")
        print(f"  {'':<26} .venv/bin/notifier send --recipient {DEMO_RECIPIENT} --type alert"
              " --priority critical --title Hello")
        print(f"  {'':<26} (a page for development: it hands a token to anyone who asks;")
        print(f"  {'':<26} {_api_secret_note or 'the API was already running'})")
        open_in_browser(demo)
    elif running_pid("api"):
        print(f"  the API did not answer within {API_TIMEOUT:.0f}s; see {_log('api')}")
    env_file = DATA_DIR / "env"
    if env_file.is_file() and env_file.read_text().strip():
        print(f"  . {local_services.display(env_file):<23} (in a new shell first: use the"
              " embedded servers)")
    print("  .venv/bin/notifier status  counts, queue depths, dead letters")
    url = _url(*flower_endpoint())
    print(f"  {url:<26} Flower: workers, tasks, queues, with a login;")
    print(f"  {'':<26} {_flower_login_note or 'the login it was started with'}")
    print(f"  {_log('worker')}, {_log('beat')}, {_log('flower')}, {_log('api')}")
    print("  make stop                  stops the API, worker, beat, Flower and embedded"
          " servers")


def open_in_browser(url: str) -> None:
    """Open the page for a person at a terminal with a display, never in a script or CI."""
    if sys.stdout.isatty() and (sys.platform == "darwin" or os.environ.get("DISPLAY")
                                or os.environ.get("WAYLAND_DISPLAY")):
        import webbrowser

        webbrowser.open(url)


# --- stop -------------------------------------------------------------------------------


def stop_process(name: str, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM (Celery's warm shutdown), wait, then kill the whole process group."""
    pid = running_pid(name)
    if pid:
        os.kill(pid, signal.SIGTERM)
        if not local_services.wait_until(lambda: not running_pid(name), timeout, 0.2):
            print(f"{name} did not stop within {timeout:.0f}s; killing it", file=sys.stderr)
            os.killpg(pid, signal.SIGKILL)  # its own session: the group holds its pool too
        print(f"Stopped {name} (pid {pid}).")
    (RUN_DIR / f"{name}.pid").unlink(missing_ok=True)


def stop() -> None:
    """Stop the API and beat first (no new work), then the worker and Flower, then the
    servers."""
    for name in ("api", "beat", "worker", "flower"):
        stop_process(name)
    for name in local_services.stop_services(DATA_DIR):
        print(f"Stopped the embedded {name}.")


# --- main -------------------------------------------------------------------------------


def run() -> None:
    """The ``make run`` sequence."""
    use_services()
    migrate()
    start_background()
    wait_for_worker()
    demo = send_demo()
    reason = wait_for_commit(demo)
    if not flower_listens():
        print(f"Flower did not open its port; see {_log('flower')}", file=sys.stderr)
    report(demo, reason)


def main(argv: list[str] | None = None) -> int:
    """``run.py [--run-dir DIR] [--data-dir DIR]`` runs everything; ``run.py stop`` stops it."""
    global RUN_DIR, DATA_DIR
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=["run", "stop"], default="run")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR,
                        help="logs and pid files of worker, beat and Flower")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR,
                        help="where embedded servers keep data, sockets and pid files")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    RUN_DIR, DATA_DIR = args.run_dir.resolve(), args.data_dir.resolve()
    if args.command == "stop":
        try:
            stop()  # needs no settings: a broken configuration must not block stopping
        except local_services.ServiceError as exc:
            _fail(str(exc))
        return 0
    try:
        from notifier.settings import ConfigError
    except Exception as exc:  # settings are read on import: a bad value raises here
        _fail(str(exc))
    try:
        run()
    except (ConfigError, local_services.ServiceError) as exc:
        _fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
