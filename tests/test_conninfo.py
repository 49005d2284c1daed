"""The connection resolver, without a server: URLs with several hosts, what a URL leaves to the
PG* values, the files read at each connection (the URL file, TLS files), the runner's need of a
writable server, and messages that never quote a password."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from backfill.conninfo import ConnectParams, parse_url
from backfill.errors import ConfigError
from tests.test_settings import SECRET, settings


def test_multi_host_urls_parse_as_libpq_reads_them() -> None:
    target = parse_url("postgresql://app@db-a:5432,db-b:5433/app?target_session_attrs=read-write")
    assert (target.user, target.hosts, target.ports, target.database) == (
        "app", ("db-a", "db-b"), (5432, 5433), "app")
    assert target.options == {"target_session_attrs": "read-write"}
    assert parse_url("postgres://[::1]:6432,h2:6433/x").hosts == ("::1", "h2")
    socket = parse_url("postgresql:///app?host=/var/run/postgresql&port=5433")
    assert (socket.hosts, socket.ports, socket.database) == (("/var/run/postgresql",), (5433,),
                                                             "app")
    assert parse_url("postgresql://u:p%2Fw@h/db").password == "p/w"


@pytest.mark.parametrize("url", [
    f"postgresql://u:{SECRET}@h:5432/db",  # unencoded: splits in the wrong places
    "postgresql://u:p@h:54x32/db",
    "postgresql://u@a:5432,b/db",  # a port for some hosts only
    "mysql://u@h/db",
])
def test_unusable_urls_are_refused_without_quoting_them(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_url(url)
    assert SECRET not in str(caught.value) and "54x32" not in str(caught.value)
    with pytest.raises(ConfigError) as error:
        settings(BACKFILL_DATABASE_URL=url)
    assert str(error.value).startswith("BACKFILL_DATABASE_URL (or DATABASE_URL) ")
    assert SECRET not in str(error.value)


def test_a_url_takes_what_it_leaves_out_from_the_pg_variables(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("not read before connecting")
    params = settings(BACKFILL_DATABASE_URL="postgresql://app@db-a,db-b/app?sslmode=require",
                      PGSSLMODE="verify-full", PGSSLROOTCERT=str(ca), PGPORT="6432")
    kwargs = params.kwargs()
    assert kwargs["port"] == [6432]
    assert "sslmode=require" in str(kwargs["dsn"])  # the URL's own value wins
    assert "sslrootcert=" in str(kwargs["dsn"]) and "target_session_attrs" not in str(kwargs)
    with pytest.raises(ConfigError, match=r"sslrootcert .*: no such file"):
        settings(PGSSLROOTCERT=str(tmp_path / "missing.crt"), PGSSLMODE="verify-ca").kwargs()


def test_the_runner_asks_for_a_server_that_accepts_writes() -> None:
    plain = ConnectParams(dsn=SecretStr("postgresql://h/db"))
    assert "target_session_attrs=read-write" in str(plain.kwargs(writable=True)["dsn"])
    assert "dsn" not in plain.kwargs()  # admin verbs, gates: any server
    explicit = ConnectParams(dsn=SecretStr("postgresql://h/db?target_session_attrs=any"))
    assert "target_session_attrs=any" in str(explicit.kwargs(writable=True)["dsn"])
    standby = ConnectParams(dsn=SecretStr("postgresql://h/db?target_session_attrs=standby"))
    with pytest.raises(ConfigError, match="the runner writes"):
        standby.kwargs(writable=True)


def test_the_url_file_is_read_at_each_connection(tmp_path: Path) -> None:
    path = tmp_path / "url"
    path.write_text("postgresql://app:old@db/app\n")
    params = settings(BACKFILL_DATABASE_URL_FILE=str(path), DATABASE_URL="postgresql://x/y")
    assert params.kwargs()["password"] == "old"
    path.write_text("postgresql://app:new@db/app")
    assert params.kwargs()["password"] == "new"
    assert params.describe() == "app@db/app"
    path.write_text(f"postgresql://app:{SECRET}@db/app")
    assert params.describe() == "the database URL"
    with pytest.raises(ConfigError, match="not both"):
        settings(BACKFILL_DATABASE_URL="postgresql://h/d", BACKFILL_DATABASE_URL_FILE=str(path))
    assert settings(DATABASE_URL="postgresql://other/db").describe() == "other/db"
