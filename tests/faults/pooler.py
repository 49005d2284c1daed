"""A real PgBouncer in front of a test server, as deployed: Debian's ``pgbouncer``, default
settings (``ignore_startup_parameters`` no wider than ``extra_float_digits``), ``auth_type =
trust`` with an ``auth_file``, on a free port of 127.0.0.1 only. It refuses to run as root, so it
runs as the server's user."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from backfill.pgtemp import TempPostgres, free_port

CONFIG = """\
[databases]
* = host=127.0.0.1 port={upstream}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {root}/users.txt
pool_mode = {mode}
ignore_startup_parameters = extra_float_digits
default_pool_size = 20
max_client_conn = 200
logfile = {root}/pgbouncer.log
"""


class PgBouncer:
    def __init__(self, server: TempPostgres, *, mode: str, users: tuple[str, ...]) -> None:
        self.server = server
        self.mode = mode
        self.users = users
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix=f"backfill-pgbouncer-{mode}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def dsn(self, database: str, *, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    @property
    def log(self) -> str:
        path = self.root / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> PgBouncer:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not os.access(binary, os.X_OK):
            pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
        (self.root / "users.txt").write_text("".join(f'"{u}" ""\n' for u in self.users))
        (self.root / "pgbouncer.ini").write_text(CONFIG.format(
            upstream=self.server.port, port=self.port, root=self.root, mode=self.mode))
        kwargs: dict[str, object] = {}
        if os.geteuid() == 0:
            user = self.server.user or "postgres"
            entry = pwd.getpwnam(user)
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            kwargs = {"user": user, "group": entry.pw_gid}
        self.proc = subprocess.Popen(  # type: ignore[call-overload]
            [binary, str(self.root / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs,
        )
        deadline = time.monotonic() + 10
        while not _listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pgbouncer did not start: {self.log[-2000:]}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


@contextmanager
def pgbouncer(
    server: TempPostgres, *, mode: str, users: tuple[str, ...] = ("postgres",)
) -> Iterator[PgBouncer]:
    """A PgBouncer in ``mode`` (``session`` or ``transaction``) in front of ``server``."""
    bouncer = PgBouncer(server, mode=mode, users=users).start()
    try:
        yield bouncer
    finally:
        bouncer.stop()
