"""Connection settings from the environment, without a server: the PG* variables and their
lists, what they refuse, and a database out of reach (the resolver: tests/test_conninfo.py)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pytest

from backfill.conninfo import ConnectParams
from backfill.errors import ConfigError
from backfill.pgtemp import free_port
from backfill.settings import DatabaseSettings
from tests.conftest import cli

SECRET = "pa55/w#rd?@:"


def settings(**env: str) -> ConnectParams:
    return DatabaseSettings.model_validate(env).params()


def test_pg_variables_lists_and_errors() -> None:
    params = settings(PGHOST="db-a,db-b", PGPORT="5432,5433", PGUSER="app", PGDATABASE="app",
                      PGPASSWORD=SECRET, PGTARGETSESSIONATTRS="primary")
    kwargs = params.kwargs(writable=True)
    assert (kwargs["host"], kwargs["port"], kwargs["password"]) == (
        ["db-a", "db-b"], [5432, 5433], SECRET)
    assert kwargs["dsn"] == "postgresql://?target_session_attrs=primary"
    assert params.describe() == "app@db-a:5432,db-b:5433/app"
    assert SECRET not in repr(params) + params.describe()
    assert settings(PGHOST="a,b", PGPORT="6432").describe() == "a:6432,b:6432/"
    with pytest.raises(ConfigError, match="PGPORT lists 3 ports for 2 host"):
        settings(PGHOST="a,b", PGPORT="1,2,3")
    with pytest.raises(ConfigError, match="PGPORT: a port is a number"):
        settings(PGPORT="70000")


def test_an_unreachable_database_is_exit_69_for_every_verb(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BACKFILL_"))}
    env["BACKFILL_DATABASE_URL_FILE"] = str(tmp_path / "url")
    secret = quote(SECRET, safe="")
    (tmp_path / "url").write_text(f"postgresql://u:{secret}@127.0.0.1:{free_port()}/db")
    for verb in (["init"], ["status"], ["pause", "some-job"]):
        out = cli(*verb, env=env)
        assert out.returncode == 69, (verb, out.stderr)
        assert out.stderr.startswith("backfill: error: connecting to u@127.0.0.1:"), out.stderr
        assert "Traceback" not in out.stderr and SECRET not in out.stderr
