"""TLS as deployed: a server whose certificate comes from a private CA (made here with trustme),
verified with ``sslmode=verify-full``, from the URL and from the ``PG*`` variables; a client
certificate accepted by ``hostssl ... cert`` in pg_hba.conf. A certificate that does not verify
(wrong CA, wrong host name) or a missing file is exit 78 at once, one line, nothing written.

Each batch records in the rows it updates whether its own session is encrypted, and with
which client certificate (``pg_stat_ssl``): TLS proven from inside the batch.
"""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import asyncpg
import pytest
import trustme
from cryptography import x509

from backfill.pgtemp import TempPostgres
from tests.conftest import (
    Database,
    seed_users,
    users_job,
    write_job,
)

from .harness import cli, exactly_once
from .sessions import eventually

pytestmark = pytest.mark.anyio

ROWS = 500
CERT_USER = "backfill_cert"
RECORD_TLS = (
    "display_name = first_name, touched = touched + 1, seen = (SELECT ssl::text || ' ' || "
    "coalesce(client_serial::text, '-') FROM pg_stat_ssl WHERE pid = pg_backend_pid())"
)


@dataclass(frozen=True)
class Tls:
    server: TempPostgres
    ca: Path  # the CA that signed the server's certificate
    wrong_ca: Path  # another CA
    client_cert: Path  # for CERT_USER, signed by the CA
    client_key: Path
    client_serial: int


def _write(path: Path, data: bytes, *, owner: str | None = None) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    if owner is not None:
        entry = pwd.getpwnam(owner)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


@pytest.fixture(scope="module")
def tls(own_pg: TempPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    """The module's own server, made to accept TLS with certificates of a private CA."""
    ca, wrong = trustme.CA(), trustme.CA()
    # The server's certificate names 127.0.0.1 only: "localhost" is the wrong host name.
    leaf = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("runner.backfill.test", common_name=CERT_USER)
    local = tmp_path_factory.mktemp("tls")
    assert own_pg.root is not None
    conf = own_pg.root / "tls"
    conf.mkdir()
    if own_pg.user is not None:
        entry = pwd.getpwnam(own_pg.user)
        os.chown(conf, entry.pw_uid, entry.pw_gid)
    chain = b"".join(pem.bytes() for pem in leaf.cert_chain_pems)
    files = {
        "ssl_cert_file": _write(conf / "server.crt", chain, owner=own_pg.user),
        "ssl_key_file": _write(conf / "server.key", leaf.private_key_pem.bytes(),
                               owner=own_pg.user),
        "ssl_ca_file": _write(conf / "ca.crt", ca.cert_pem.bytes(), owner=own_pg.user),
    }
    with (own_pg.datadir / "postgresql.conf").open("a") as f:
        f.write("ssl = on\n" + "".join(f"{k} = '{v}'\n" for k, v in files.items()))
    hba = own_pg.datadir / "pg_hba.conf"
    stat = os.stat(hba)
    hba.write_text(f"hostssl all {CERT_USER} 127.0.0.1/32 cert\n" + hba.read_text())
    os.chown(hba, stat.st_uid, stat.st_gid)
    own_pg.pg_ctl("reload")
    anyio.run(_enabled, own_pg, backend="asyncio")
    yield Tls(
        server=own_pg,
        ca=_write(local / "ca.crt", ca.cert_pem.bytes()),
        wrong_ca=_write(local / "wrong-ca.crt", wrong.cert_pem.bytes()),
        client_cert=_write(local / "client.crt",
                           b"".join(p.bytes() for p in client.cert_chain_pems)),
        client_key=_write(local / "client.key", client.private_key_pem.bytes()),
        client_serial=x509.load_pem_x509_certificate(
            client.cert_chain_pems[0].bytes()).serial_number,
    )


async def _enabled(server: TempPostgres) -> None:
    conn = await asyncpg.connect(server.dsn())
    try:
        try:  # the reload is asynchronous
            await eventually(lambda: _ssl_on(conn), within=5, interval=0.05)
        except TimeoutError:
            pytest.skip("this PostgreSQL build has no TLS support")
        await conn.execute(f"CREATE ROLE {CERT_USER} LOGIN SUPERUSER")
    finally:
        await conn.close()


async def _ssl_on(conn: asyncpg.Connection) -> bool:
    return await conn.fetchval("SHOW ssl") == "on"


@pytest.fixture
async def tls_db(tls: Tls, own_db: Database) -> AsyncIterator[Database]:
    await seed_users(own_db, f"generate_series(1, {ROWS})")
    await own_db.execute("ALTER TABLE users ADD COLUMN seen text")
    yield own_db


def _url(db: Database, *, user: str = "postgres", host: str = "127.0.0.1", **query: Path | str
         ) -> str:
    options = "&".join(f"{k}={v}" for k, v in query.items())
    return f"postgresql://{user}@{host}:{db.server.port}/{db.name}" + (
        f"?{options}" if options else "")


def _pg_env(db: Database, *, user: str = "postgres", **variables: Path | str) -> dict[str, str]:
    env = {k: v for k, v in db.env().items() if k != "BACKFILL_DATABASE_URL"}
    return env | {"PGHOST": "127.0.0.1", "PGPORT": str(db.server.port), "PGUSER": user,
                  "PGDATABASE": db.name} | {k: str(v) for k, v in variables.items()}


async def _runs_encrypted(
    db: Database, tmp_path: Path, env: dict[str, str], *, serial: int | None = None
) -> None:
    """Run; each batch must have found its session encrypted, with the client certificate of
    ``serial`` (if any)."""
    job = write_job(tmp_path, users_job(set=RECORD_TLS, where="true"))
    run = await cli(tmp_path, "run", job, env=env)
    assert run.code == 0, run.output
    seen = {r["seen"] for r in await db.fetch("SELECT DISTINCT seen FROM users")}
    assert seen == {f"true {'-' if serial is None else serial}"}
    conn = await db.connect()
    try:
        await exactly_once(conn, 1, ROWS)
    finally:
        await conn.close()


@pytest.mark.parametrize("form", ["url", "pg variables"])
async def test_verify_full_against_a_private_ca(
    tls: Tls, tls_db: Database, tmp_path: Path, form: str
) -> None:
    if form == "url":
        env = tls_db.env(BACKFILL_DATABASE_URL=_url(tls_db, sslmode="verify-full",
                                                    sslrootcert=tls.ca))
    else:
        env = _pg_env(tls_db, PGSSLMODE="verify-full", PGSSLROOTCERT=tls.ca)
    await _runs_encrypted(tls_db, tmp_path, env)


@pytest.mark.parametrize("form", ["url", "pg variables"])
async def test_client_certificate_accepted_by_hostssl_cert(
    tls: Tls, tls_db: Database, tmp_path: Path, form: str
) -> None:
    if form == "url":
        env = tls_db.env(BACKFILL_DATABASE_URL=_url(
            tls_db, user=CERT_USER, sslmode="verify-full", sslrootcert=tls.ca,
            sslcert=tls.client_cert, sslkey=tls.client_key))
    else:
        env = _pg_env(tls_db, user=CERT_USER, PGSSLMODE="verify-full", PGSSLROOTCERT=tls.ca,
                      PGSSLCERT=tls.client_cert, PGSSLKEY=tls.client_key)
    await _runs_encrypted(tls_db, tmp_path, env, serial=tls.client_serial)


async def test_what_does_not_verify_exits_78_at_once_writing_nothing(
    tls: Tls, tls_db: Database, db: Database, tmp_path: Path
) -> None:
    job = write_job(tmp_path, users_job(limits={"connect_retry_seconds": "30s"}))
    cases = {
        "wrong CA": (_url(tls_db, sslmode="verify-full", sslrootcert=tls.wrong_ca),
                     "certificate verify failed"),
        "wrong host name": (_url(tls_db, host="localhost", sslmode="verify-full",
                                 sslrootcert=tls.ca), "Hostname mismatch"),
        "missing CA file": (_url(tls_db, sslmode="verify-full",
                                 sslrootcert=tmp_path / "nowhere.crt"), "no such file"),
        "no client certificate": (_url(tls_db, user=CERT_USER, sslmode="verify-full",
                                       sslrootcert=tls.ca), "authentication failed"),
        # A server without TLS (the suite's own) and sslmode=require.
        "server without TLS": (db.dsn + "?sslmode=require", "does not accept TLS"),
    }
    for name, (url, reason) in cases.items():
        for verb in (["run", job], ["status"]):
            started = time.monotonic()
            proc = await cli(tmp_path, *verb, env=tls_db.env(BACKFILL_DATABASE_URL=url))
            assert proc.code == 78, (name, verb, proc.output)
            assert time.monotonic() - started < 15, (name, verb)  # not after the retry window
            [error] = proc.errors()
            assert reason in error, (name, error)
            assert "Traceback" not in proc.output, (name, proc.output)
    assert await tls_db.fetchval("SELECT count(*) FROM backfill.checkpoints") == 0
    assert await tls_db.fetchval("SELECT count(*) FROM backfill.runs") == 0
    assert await tls_db.fetchval("SELECT count(*) FROM users WHERE touched <> 0") == 0
