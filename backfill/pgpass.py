"""The libpq password file (``PGPASSFILE``, else ``~/.pgpass``), read the way libpq reads it.

The driver has its own reader, but it keeps the backslash of an escaped ``\\:`` in a password,
and says nothing but a Python warning for a file others may read. Read here, at each
connection (a rotated file is picked up), into the one password the connection uses.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path

from backfill.errors import ConfigError


def lookup(
    path: Path, *, hosts: Sequence[str], ports: Sequence[int], database: str, user: str
) -> str | None:
    """The password of the first line matching one of the hosts (in order), or None. A file
    that others may read is refused, as libpq refuses it (which then asks for no password)."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"the password file {path} is not a plain file")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"the password file {path} has group or world access: chmod 0600 it"
            )
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"the password file {path}: {exc.strerror or exc}") from None
    entries = [_fields(line) for line in lines if line.strip() and not line.startswith("#")]
    for host, port in zip(hosts, ports, strict=True):
        # libpq matches a Unix-domain socket as "localhost"
        host = "localhost" if host.startswith("/") else host
        for fields in entries:
            if len(fields) == 5 and all(
                pattern in ("*", value)
                for pattern, value in zip(fields, (host, str(port), database, user), strict=False)
            ):
                return fields[4]
    return None


def _fields(line: str) -> list[str]:
    """host:port:database:user:password, where a backslash escapes ``:`` and itself."""
    fields: list[str] = []
    current: list[str] = []
    escaped = False
    for char in line:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":" and len(fields) < 4:
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    return [*fields, "".join(current)]
