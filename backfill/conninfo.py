"""Connection parameters the way libpq reads them: ``postgresql://`` URLs with any number of
hosts, the ``PG*`` values under them, host lists, the password file and the TLS files.

``ConnectParams`` holds what the settings said (``backfill.settings`` reads the environment
into it, once, at the CLI); each connection resolves it afresh into asyncpg's keyword
arguments (``kwargs``), reading the URL file and the password file again, so that a rotated
password is picked up. No ``repr``, message or ``describe`` ever shows a password, nor quotes a
URL that cannot be parsed (its pieces may be pieces of the password).
"""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode

from pydantic import SecretStr

from backfill import pgpass
from backfill.errors import ConfigError

# The runner writes: it accepts only a server that does (asyncpg checks at connect time).
WRITABLE: tuple[str, ...] = ("read-write", "primary")
# TLS and password files named in the settings: checked before connecting, since the driver's
# own error for a missing file ("No such file or directory") would not say which.
_FILES = ("sslrootcert", "sslcert", "sslkey")

_UNENCODED = (
    "cannot be parsed: percent-encode special characters (such as / ? # @ :) in the user name "
    "and password"
)
_URL = re.compile(r"(?P<netloc>[^/?#]*)(?P<path>/[^?#]*)?(?:\?(?P<query>[^#]*))?(?P<frag>#.*)?",
                  re.S)
_HOSTSPEC = re.compile(r"(?P<host>\[[^\]]+\]|[^:\[\]]*)(?::(?P<port>[^:]*))?")


@dataclass(frozen=True, slots=True)
class Conninfo:
    """Where to connect and how (libpq's connection parameters), from a URL or the ``PG*``
    variables; ``None``: not said."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()  # none, one for every host, or one per host
    database: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # sslmode, target_session_attrs, ...

    def over(self, defaults: Conninfo) -> Conninfo:
        """These values, with ``defaults`` for whatever they leave out (libpq's rule for the
        ``PG*`` variables under a URL)."""
        return Conninfo(
            user=self.user or defaults.user,
            password=self.password if self.password is not None else defaults.password,
            hosts=self.hosts or defaults.hosts,
            ports=self.ports or defaults.ports,
            database=self.database or defaults.database,
            options={**defaults.options, **self.options},
        )

    def describe(self) -> str:
        hosts = tuple(f"[{h}]" if ":" in h else h for h in self.hosts) or ("localhost",)
        ports = self.ports * len(hosts) if len(self.ports) == 1 else self.ports
        if len(ports) == len(hosts):
            where = ",".join(f"{h}:{p}" for h, p in zip(hosts, ports, strict=True))
        else:
            where = ",".join(hosts)
        user = f"{self.user}@" if self.user else ""
        return f"{user}{where}/{self.database or ''}"


def parse_url(url: str) -> Conninfo:
    """A ``postgresql://`` URL, libpq's form with any number of hosts. Raises ``ValueError``
    with a reason that quotes none of it: a password with an unencoded ``/``, ``?``, ``#`` or
    ``@`` splits the URL in the wrong place, and a parser's own message would then quote a
    piece of the password as a host or a port."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise ValueError("must start with postgresql:// (or postgres://)")
    m = _URL.fullmatch(rest)
    assert m is not None  # every string matches
    netloc, path, query = m["netloc"], m["path"] or "", m["query"] or ""
    if m["frag"] is not None or "@" in path + query or netloc.count("@") > 1:
        raise ValueError(_UNENCODED)
    userinfo, _, hostlist = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    hosts: list[str] = []
    ports: list[int] = []
    for spec in hostlist.split(",") if hostlist else []:
        hm = _HOSTSPEC.fullmatch(spec)
        if hm is None or not hm["host"] or (hm["port"] is not None and not valid_port(hm["port"])):
            raise ValueError(_UNENCODED)
        hosts.append(unquote(hm["host"].strip("[]")))
        if hm["port"]:
            ports.append(int(hm["port"]))
    if ports and len(ports) != len(hosts):
        raise ValueError("give a port for every host, or for none")
    try:
        options = dict(parse_qsl(query, strict_parsing=True, keep_blank_values=True)) if (
            query) else {}
    except ValueError:
        raise ValueError(_UNENCODED) from None
    # The query may say what the URL's parts did not (libpq: ?host=/var/run/postgresql).
    if "host" in options and not hosts:
        hosts = [h for h in options.pop("host").split(",") if h]
    if "port" in options and not ports:
        if not all(valid_port(p) for p in options["port"].split(",")):
            raise ValueError("port must be a number")
        ports = [int(p) for p in options.pop("port").split(",")]
    database = unquote(path[1:]) if len(path) > 1 else None
    return Conninfo(
        user=unquote(user) or options.pop("user", None),
        password=unquote(password) if password else options.pop("password", None),
        hosts=tuple(hosts),
        ports=tuple(ports),
        database=database or options.pop("dbname", None) or options.pop("database", None),
        options=options,
    )


def valid_port(text: str) -> bool:
    return text.isdigit() and 0 < int(text) < 65536


@dataclass(frozen=True, slots=True)
class ConnectParams:
    """What asyncpg needs to connect; ``repr`` and ``describe`` never show the password.

    ``dsn`` is a URL given as is; ``dsn_file`` a file holding one, read at each connection. The
    other fields are the ``PG*`` variables, defaults for what the URL leaves out.
    """

    dsn: SecretStr | None = None
    dsn_file: Path | None = None
    host: str | None = None  # one host or a comma-separated list
    port: str | None = None  # one port, or a comma-separated list matching the hosts
    user: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    database: str | None = None
    sslmode: str | None = None
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    passfile: str | None = None  # PGPASSFILE, else ~/.pgpass: read at each connection
    target_session_attrs: str | None = None

    def resolve(self) -> Conninfo:
        """The URL's values (the file's, read now) over the ``PG*`` ones. Raises
        ``ConfigError`` for a URL that cannot be used, naming its source, never its text."""
        options = {name: getattr(self, name) for name in (
            "sslmode", "sslrootcert", "sslcert", "sslkey", "target_session_attrs")}
        plain = Conninfo(
            user=self.user,
            password=self.password.get_secret_value() if self.password is not None else None,
            hosts=tuple(h.strip() for h in self.host.split(",")) if self.host else (),
            ports=tuple(int(p) for p in self.port.split(",")) if self.port else (),
            database=self.database,
            options={k: v for k, v in options.items() if v},
        )
        url, source = self._url()
        if url is None:
            return plain
        try:
            return parse_url(url).over(plain)
        except ValueError as exc:
            raise ConfigError(f"{source} {exc}") from None

    def _url(self) -> tuple[str | None, str]:
        if self.dsn is not None:
            return self.dsn.get_secret_value(), "BACKFILL_DATABASE_URL (or DATABASE_URL)"
        if self.dsn_file is None:
            return None, ""
        source = f"BACKFILL_DATABASE_URL_FILE ({self.dsn_file})"
        try:
            text = self.dsn_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read it: {exc.strerror or exc}") from None
        if not text:
            raise ConfigError(f"{source} is empty")
        return text, source

    def describe(self) -> str:
        """``user@host:port/database`` without the password, for messages. Never raises."""
        try:
            return self.resolve().describe()
        except ConfigError:
            return "the database URL"  # its pieces may be pieces of the password

    def kwargs(self, *, writable: bool = False) -> dict[str, object]:
        """Keyword arguments for ``asyncpg.connect``, everything explicit (the driver's own
        environment fallbacks then find nothing to add). With ``writable``, only a server that
        accepts writes will do: ``target_session_attrs`` defaults to ``read-write``."""
        info = self.resolve()
        options = dict(info.options)
        attrs = options.get("target_session_attrs")
        if writable and attrs is None:
            options["target_session_attrs"] = "read-write"
        elif writable and attrs not in (*WRITABLE, "any"):
            raise ConfigError(
                f"target_session_attrs={attrs}: the runner writes, so it needs read-write "
                "(the default) or primary"
            )
        for name in _FILES:
            path = options.get(name)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{name} {path}: no such file, or not readable")
        password = info.password
        if password is None and self.passfile:
            password = _from_passfile(Path(self.passfile), info)
        out: dict[str, object] = {
            "user": info.user,
            "password": password,
            "database": info.database,
            "passfile": self.passfile,
        }
        if info.hosts:
            out["host"] = list(info.hosts)
        if info.ports:
            out["port"] = list(info.ports)
        if options:
            # The driver reads these (sslrootcert, sslcert, sslkey, ...) only from a URL.
            out["dsn"] = "postgresql://?" + urlencode(options)
        return {k: v for k, v in out.items() if v is not None}


def _from_passfile(path: Path, info: Conninfo) -> str | None:
    """libpq's defaults: user the login name, database the user, host localhost, port 5432."""
    user = info.user or pwd.getpwuid(os.getuid()).pw_name
    hosts = info.hosts or ("localhost",)
    ports = info.ports * len(hosts) if len(info.ports) == 1 else info.ports
    if len(ports) != len(hosts):
        ports = (5432,) * len(hosts)
    return pgpass.lookup(
        path, hosts=hosts, ports=ports, database=info.database or user, user=user
    )
