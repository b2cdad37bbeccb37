"""A real PgBouncer (Debian's package) in transaction pooling mode, for one test module.

It listens on a free port of 127.0.0.1 with its ini and userlist in a temporary folder
and passes every database name on to the run's Postgres. Its pools are small on
purpose, so that the clients (worker processes, the flush loop, the CLI, the tests)
take turns on a few server connections and whatever one of them leaves on a server
connection is met by the next: ``pool_size`` connections per database, and aliases of
the run's database with fewer: ``SMALL_POOL`` (three), ``TWO_SERVERS`` and
``ONE_SERVER``. ``query_wait_timeout`` stays PgBouncer's default (120 s): a client
waiting that long for a server connection is what a test must never see.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.workers import wait_for

#: Where Debian puts it (root's PATH has /usr/sbin, a user's may not).
BINARY = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
#: The alias whose whole pool is one server connection.
ONE_SERVER = "notifier_pgbouncer_one"
#: An alias with the fewest server connections a ``-c 1`` worker delivers on: each pool
#: process delivering (two: its slot and the critical lane's) holds one for its batch's
#: claim while it sends, and their outcome writes take turns on one more.
SMALL_POOL, SMALL_POOL_SIZE = "notifier_pgbouncer_small", 3
#: An alias with fewer server connections than a ``-c 2`` worker's delivering processes
#: (three: two slots and the critical lane) hold claims: at most one of them can claim
#: at a time, the others give their claims back until a connection is free.
TWO_SERVERS = "notifier_pgbouncer_two"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PgBouncer:
    """``start()`` writes the files and waits until the port answers; ``stop()`` ends it."""

    def __init__(self, server_url: str, database: str, pool_size: int = SMALL_POOL_SIZE) -> None:
        parts = urlsplit(server_url)
        self.server_host = parts.hostname or "127.0.0.1"
        self.server_port = parts.port or 5432
        self.user = parts.username or "postgres"
        self.database = database
        self.pool_size = pool_size
        self.port = _free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="notifier-pgbouncer-"))
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, database: str | None = None) -> str:
        """A SQLAlchemy URL of ``database`` (default: the run's) through PgBouncer."""
        netloc = f"{self.user}@127.0.0.1:{self.port}"
        return urlunsplit(("postgresql+psycopg", netloc, f"/{database or self.database}", "", ""))

    def start(self) -> PgBouncer:
        assert BINARY, "pgbouncer is not installed"
        server = f"host={self.server_host} port={self.server_port}"
        ini = self.folder / "pgbouncer.ini"
        users = self.folder / "userlist.txt"
        ini.write_text("\n".join([
            "[databases]",
            f"{ONE_SERVER} = {server} dbname={self.database} pool_size=1",
            f"{SMALL_POOL} = {server} dbname={self.database} pool_size={SMALL_POOL_SIZE}",
            f"{TWO_SERVERS} = {server} dbname={self.database} pool_size=2",
            f"* = {server}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",  # as the run's Postgres on 127.0.0.1
            f"auth_file = {users}",
            f"admin_users = {self.user}",
            "pool_mode = transaction",
            f"default_pool_size = {self.pool_size}",
            "max_client_conn = 500",
            # PgBouncer refuses to run as root; CI runs as root.
            *(["user = postgres"] if os.geteuid() == 0 else []),
            "",
        ]))
        users.write_text(f'"{self.user}" ""\n')
        for path in (self.folder, ini, users):  # readable by the user it switches to
            path.chmod(0o755 if path.is_dir() else 0o644)
        log = (self.folder / "pgbouncer.log").open("wb")
        self.process = subprocess.Popen([BINARY, str(ini)], stdout=log, stderr=log,
                                        start_new_session=True)
        log.close()
        wait_for(self._answers, timeout=15, what=f"pgbouncer on port {self.port}")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited: {self.log()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def log(self) -> str:
        return (self.folder / "pgbouncer.log").read_text(errors="replace")

    def show(self, what: str) -> list[dict[str, str]]:
        """Rows of the admin console's ``SHOW <what>`` (it speaks the simple protocol
        only, which psql uses)."""
        result = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d",
             "pgbouncer", "--csv", "-c", f"SHOW {what}"],
            capture_output=True, text=True, check=True, timeout=10,
        )
        header, *rows = result.stdout.splitlines()
        names = header.split(",")
        return [dict(zip(names, row.split(","), strict=False)) for row in rows]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # immediate shutdown
            self.process.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)
