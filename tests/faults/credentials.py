"""Roles with passwords for the secrets tests: every character a URL treats specially in the
password, password (scram) authentication for them, and the check that no output shows it."""

from __future__ import annotations

import os
import re
from urllib.parse import quote

import anyio
import asyncpg

from backfill.pgtemp import TempPostgres
from tests.conftest import REPO, USERS, Database, new_database

from .harness import Cli
from .sessions import eventually

PASSWORD = "Sup3r/s3cret#pw?x@y:z"  # every character a URL treats specially
WRONG = "Wr0ng/pa55#word"
ROWS = 2000
ROLES = ("backfill_runner", "backfill_reader", "backfill_stateless", "backfill_columns")


def readme_grants() -> str:
    """The GRANTs docs/failure-behaviour.md gives the runner role ("Least privilege"), as a
    template over ``{role}`` (the roles themselves are made here, with a password)."""
    page = (REPO / "docs" / "failure-behaviour.md").read_text()
    block = re.search(r"```sql\n(.*?)```", page.split("**Least privilege.**", 1)[1], re.S)
    assert block, "docs/failure-behaviour.md has no ```sql block after Least privilege"
    grants = [s.strip() for s in block.group(1).split(";") if s.strip().startswith("GRANT")]
    assert grants[-1] == "GRANT SELECT, UPDATE ON public.users TO backfill_runner"
    return ";\n".join(grants).replace("backfill_runner", "{role}") + ";"


GRANTS = readme_grants()


def url(db: Database, *, user: str = "backfill_runner", password: str = PASSWORD,
        port: int | None = None, host: str = "127.0.0.1") -> str:
    return (f"postgresql://{user}:{quote(password, safe='')}@{host}:{port or db.server.port}"
            f"/{db.name}")


def assert_no_secret(*procs: Cli) -> None:
    for proc in procs:
        text = proc.output
        for secret in (PASSWORD, quote(PASSWORD, safe=""), WRONG, quote(WRONG, safe="")):
            assert secret not in text, (proc.args, text)
        assert "postgresql://" not in text, (proc.args, text)


def require_passwords(server: TempPostgres, roles: tuple[str, ...] = ROLES) -> None:
    """Password (scram) authentication for ``roles``, made here with ``PASSWORD``; trust for
    everyone else."""
    hba = server.datadir / "pg_hba.conf"
    line = f"host all {','.join(roles)} 127.0.0.1/32 scram-sha-256\n"
    stat = os.stat(hba)
    hba.write_text(line + hba.read_text())
    os.chown(hba, stat.st_uid, stat.st_gid)
    server.pg_ctl("reload")

    async def create() -> None:
        conn = await asyncpg.connect(server.dsn())
        try:
            for role in roles:
                await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
        finally:
            await conn.close()

        async def enforced() -> bool:  # the reload is asynchronous
            try:
                c = await asyncpg.connect(server.dsn(user=roles[0]))
            except asyncpg.InvalidPasswordError:
                return True
            except asyncpg.InvalidAuthorizationSpecificationError:
                return True
            await c.close()
            return False

        await eventually(enforced, within=10, interval=0.05)

    anyio.run(create, backend="asyncio")


async def bare_database(server: TempPostgres) -> Database:
    """A database without the state schema, with public.users owned by the superuser."""
    db = await new_database(server, template="template0")
    await db.execute(USERS)
    await db.execute(
        "INSERT INTO users (id, first_name, last_name) "
        f"SELECT g, 'f' || g, 'l' || g FROM generate_series(1, {ROWS}) g"
    )
    return db
