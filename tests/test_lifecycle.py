"""A copy job's whole table change on real PostgreSQL (``[copy] sync = "trigger"``): the
generated sync trigger per recipe shape (a partitioned target, an int -> bigint shadow table, a
table split), the cut-over and its way back, what is refused before anything changes (exit 78),
and a long application transaction that makes the cut-over give up (exit 75) without queueing
the application behind it for longer than its lock_timeout per attempt."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from backfill import commands
from backfill.errors import ConfigError, GaveUp
from backfill.job import parse_job
from tests.conftest import Database, cli, write_job

pytestmark = pytest.mark.anyio

ORDERS = """
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL,
                     total bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
INSERT INTO orders (customer_id, total, created_at)
SELECT g % 100, g, timestamptz '2024-01-01' + g * interval '1 hour' FROM generate_series(1, 3000) g;
CREATE TABLE orders_p (id bigint NOT NULL, customer_id bigint NOT NULL, total bigint NOT NULL,
                       created_at timestamptz NOT NULL, PRIMARY KEY (id, created_at))
    PARTITION BY RANGE (created_at);
CREATE TABLE orders_p_2024 PARTITION OF orders_p FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE orders_p_rest PARTITION OF orders_p DEFAULT;
"""
ACCOUNTS = """
CREATE TABLE accounts (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, email text NOT NULL,
                       balance numeric(12, 2) NOT NULL DEFAULT 0);
INSERT INTO accounts (email) SELECT 'u' || g || '@example.com' FROM generate_series(1, 3000) g;
CREATE TABLE accounts_new (id bigint PRIMARY KEY, email text NOT NULL,
                           balance numeric(12, 2) NOT NULL DEFAULT 0);
CREATE TABLE logins (id serial PRIMARY KEY, account_id int NOT NULL REFERENCES accounts (id));
INSERT INTO logins (account_id) SELECT g FROM generate_series(1, 3000, 7) g;
CREATE ROLE lifecycle_app;
GRANT SELECT, INSERT, UPDATE ON accounts TO lifecycle_app;
"""
EVENTS = """
CREATE TABLE events (id bigint PRIMARY KEY, kind text NOT NULL, payload text);
INSERT INTO events SELECT g, 'k' || g % 5, repeat('x', 50) FROM generate_series(1, 3000) g;
CREATE TABLE events_slim (id bigint PRIMARY KEY, kind text NOT NULL);
"""


def job_of(name: str, table: str, into: str, **copy: Any) -> dict[str, Any]:
    return {"name": name, "table": table, "key": "id", "batch": {"size": 500},
            "copy": {"into": into, "sync": "trigger", **copy},
            "cutover": {"lock_timeout": "100ms", "retry_for": "1s"}}


async def run(db: Database, fields: dict[str, Any]) -> Any:
    job = parse_job(fields)
    await commands.run(job, db.params, observers=[])
    return job


async def differ(conn: asyncpg.Connection, a: str, b: str, columns: str) -> int:
    """Rows in one table and not in the other, both ways, in one snapshot."""
    return int(await conn.fetchval(
        f"SELECT count(*) FROM ((SELECT {columns} FROM {a} EXCEPT ALL SELECT {columns} FROM {b})"
        f" UNION ALL (SELECT {columns} FROM {b} EXCEPT ALL SELECT {columns} FROM {a})) d"
    ))


async def kind(conn: asyncpg.Connection, table: str) -> str:
    return str(await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = $1", table))


async def test_partitioned_target_through_the_whole_change(db: Database) -> None:
    conn = await db.connect()
    try:
        await conn.execute(ORDERS)
        job = await run(db, job_of("orders-p", "public.orders", "public.orders_p"))
        cols = "id, customer_id, total, created_at"
        # The application after the copy: inserts, updates, a partition-key change, a key
        # change, deletes: all mirrored by the generated trigger.
        await conn.execute("""
            INSERT INTO orders (customer_id, total) VALUES (1, 1), (2, 2);
            UPDATE orders SET total = total + 1 WHERE id % 97 = 0;
            UPDATE orders SET created_at = created_at + interval '2 years' WHERE id = 10;
            UPDATE orders SET id = 100000 WHERE id = 11;
            DELETE FROM orders WHERE id % 101 = 0""")
        assert await differ(conn, "orders", "orders_p", cols) == 0
        assert await commands.verify(job, db.params) == 0
        done = await commands.cutover(job, db.params)
        assert (done.phase, done.changed) == ("cut over", True)
        assert await kind(conn, "orders") == "p"
        new_id = await conn.fetchval("INSERT INTO orders (customer_id, total) VALUES (3, 3) "
                                     "RETURNING id")
        assert new_id == 3003  # the sequence moved with the name
        await conn.execute("UPDATE orders SET total = 0 WHERE id = 5; DELETE FROM orders "
                           "WHERE id = 6")
        assert await differ(conn, "orders", "orders_old", cols) == 0  # the reverse trigger
        assert not (await commands.cutover(job, db.params)).changed  # idempotent
        back = await commands.rollback(job, db.params)
        assert back.phase == "rolled back"
        assert await kind(conn, "orders") == "r"
        await conn.execute("INSERT INTO orders (customer_id, total) VALUES (4, 4)")
        assert await differ(conn, "orders", "orders_p", cols) == 0  # forward again
        await commands.cutover(job, db.params)
        finished = await commands.finish(job, db.params)
        assert finished.phase == "finished"
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'backfill_%'") == 0
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'backfill_%'") == 0
        st = await commands.status(db.params, "orders-p")
        assert st.changes == {"orders-p": "finished"}
    finally:
        await conn.close()


async def test_int_to_bigint_with_identity_a_foreign_key_and_grants(db: Database) -> None:
    conn = await db.connect()
    try:
        await conn.execute(ACCOUNTS)
        job = await run(db, job_of("accounts-bigint", "public.accounts", "public.accounts_new"))
        await conn.execute("INSERT INTO accounts (email) VALUES ('late@example.com')")
        await commands.cutover(job, db.params)
        assert await conn.fetchval(
            "SELECT format_type(atttypid, atttypmod) || attidentity::text FROM pg_attribute "
            "WHERE attrelid = 'accounts'::regclass AND attname = 'id'") == "biginta"
        assert await conn.fetchval("INSERT INTO accounts (email) VALUES ('x') RETURNING id") \
            == 3002
        fk = await conn.fetchrow("SELECT confrelid::regclass::text AS ref, convalidated "
                                 "FROM pg_constraint WHERE conname = 'logins_account_id_fkey'")
        assert (fk["ref"], fk["convalidated"]) == ("accounts", True)
        assert await conn.fetchval(
            "SELECT has_table_privilege('lifecycle_app', 'accounts', 'UPDATE')")
        await conn.execute("UPDATE accounts SET balance = 5 WHERE id = 3002")
        assert await differ(conn, "accounts", "accounts_old", "id, email, balance") == 0
        await commands.rollback(job, db.params)
        fk_back = await conn.fetchval("SELECT confrelid::regclass::text FROM pg_constraint "
                                      "WHERE conname = 'logins_account_id_fkey'")
        assert fk_back == "accounts"
        assert await conn.fetchval("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                                   "WHERE attrelid = 'accounts'::regclass AND attname = 'id'") \
            == "integer"
        assert await conn.fetchval("INSERT INTO accounts (email) VALUES ('y') RETURNING id") \
            == 3003
    finally:
        await conn.close()


async def test_table_split_mirrors_its_columns_and_the_old_table_keeps_the_rest(
    db: Database,
) -> None:
    conn = await db.connect()
    try:
        await conn.execute(EVENTS)
        job = await run(db, job_of("events-slim", "public.events", "public.events_slim"))
        await conn.execute("INSERT INTO events VALUES (5000, 'new', 'p'); "
                           "UPDATE events SET kind = 'changed' WHERE id = 1")
        assert await differ(conn, "events", "events_slim", "id, kind") == 0
        await commands.cutover(job, db.params)
        await conn.execute("INSERT INTO events VALUES (5001, 'after'); "
                           "UPDATE events SET kind = 'again' WHERE id = 2")
        assert await differ(conn, "events", "events_old", "id, kind") == 0
        assert await conn.fetchval("SELECT payload FROM events_old WHERE id = 2") == "x" * 50
    finally:
        await conn.close()


async def test_the_trigger_applies_copy_values_and_the_cutover_refuses_to_invert_them(
    db: Database,
) -> None:
    conn = await db.connect()
    try:
        await conn.execute("""
            CREATE TABLE prices (id bigint PRIMARY KEY, euros numeric NOT NULL);
            INSERT INTO prices SELECT g, g / 4.0 FROM generate_series(1, 500) g;
            CREATE TABLE prices_c (id bigint PRIMARY KEY, cents bigint NOT NULL)""")
        job = await run(db, job_of("prices-cents", "public.prices", "public.prices_c",
                                   values={"cents": "(prices.euros * 100)::bigint"}))
        await conn.execute("UPDATE prices SET euros = 7.5 WHERE id = 3; "
                           "INSERT INTO prices VALUES (900, 1.25)")
        assert await conn.fetchval("SELECT cents FROM prices_c WHERE id = 3") == 750
        assert await conn.fetchval("SELECT cents FROM prices_c WHERE id = 900") == 125
        with pytest.raises(ConfigError, match=r"cannot invert copy\.values\.cents"):
            await commands.cutover(job, db.params)
    finally:
        await conn.close()


async def test_bad_input_is_one_line_exit_78_and_changes_nothing(
    db: Database, tmp_path: Path,
) -> None:
    await db.execute(EVENTS + "CREATE TABLE events_nokey (id bigint, kind text);")
    env = db.env()

    def attempt(verb: str, **copy: Any) -> str:
        fields = job_of("events-bad", "public.events", "public.events_slim")
        values = copy.pop("values", None)
        fields["copy"] |= copy
        path = write_job(tmp_path, fields)
        if values is not None:  # a table in a table: write_job writes one level
            path.write_text(path.read_text() + "\n[copy.values]\n" + "".join(
                f'{k} = "{v}"\n' for k, v in values.items()))
        done = cli(verb, path, env=env)
        assert done.returncode == 78, done.stderr
        (line,) = [x for x in done.stderr.splitlines() if x.startswith("backfill: error:")]
        return line

    assert "not unique in public.events_nokey" in attempt("run", into="public.events_nokey")
    assert "sync trigger cannot apply" in attempt("run", values={"kind": "xmin::text"})
    assert "is not started" in attempt("cutover")
    assert "needs it cut over" in attempt("finish")
    await db.execute("CREATE ROLE weak LOGIN; GRANT SELECT, UPDATE ON events TO weak; "
                     "GRANT INSERT ON events_slim TO weak; GRANT USAGE ON SCHEMA backfill TO "
                     "weak; GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA backfill TO weak")
    weak = cli("run", write_job(tmp_path, job_of("events-bad", "public.events",
                                                 "public.events_slim")),
               env=db.env(BACKFILL_DATABASE_URL=db.server.dsn(db.name, user="weak")))
    assert weak.returncode == 78 and "lacks TRIGGER on public.events" in weak.stderr
    assert await db.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'backfill%'") == 0
    assert await db.fetchval("SELECT count(*) FROM backfill.checkpoints") == 0
    assert await db.fetchval("SELECT count(*) FROM events_slim") == 0


async def test_cutover_refuses_what_it_cannot_move(db: Database) -> None:
    await db.execute(EVENTS + "CREATE VIEW kinds AS SELECT DISTINCT kind FROM events")
    job = await run(db, job_of("events-view", "public.events", "public.events_slim"))
    with pytest.raises(ConfigError, match=r"view public\.kinds depends on public\.events"):
        await commands.cutover(job, db.params)
    await db.execute("DROP VIEW kinds; UPDATE backfill.checkpoints SET state = 'interrupted'")
    with pytest.raises(ConfigError, match="has not finished copying"):
        await commands.cutover(job, db.params)
    assert await db.fetchval("SELECT phase FROM backfill.lifecycle") == "syncing"


async def test_a_long_transaction_makes_the_cutover_give_up_and_the_app_waits_briefly(
    db: Database,
) -> None:
    await db.execute(EVENTS)
    job = await run(db, job_of("events-long", "public.events", "public.events_slim"))
    holder = await db.connect()
    app = await db.connect()
    waits: list[float] = []
    stop = anyio.Event()

    async def application() -> None:
        n = 10_000
        while not stop.is_set():
            t0 = time.perf_counter()
            await app.execute("INSERT INTO events VALUES ($1, 'app')", n)
            waits.append(time.perf_counter() - t0)
            n += 1
            await anyio.sleep(0.005)

    try:
        await holder.execute("BEGIN; SELECT count(*) FROM events")  # holds ACCESS SHARE
        async with anyio.create_task_group() as tg:
            tg.start_soon(application)
            t0 = time.perf_counter()
            with pytest.raises(GaveUp, match=r"gave up after \d+ attempts.*nothing changed"):
                await commands.cutover(job, db.params)
            took = time.perf_counter() - t0
            stop.set()
        await holder.execute("ROLLBACK")
        assert 0.5 <= took < 5.0
        assert len(waits) > 20
        assert max(waits) < 0.1 + 0.25, max(waits)  # lock_timeout per attempt, plus noise
        assert await db.fetchval("SELECT phase FROM backfill.lifecycle") == "syncing"
        assert await db.fetchval("SELECT to_regclass('events_old')") is None
        assert await db.fetchval("SELECT count(*) FROM events_slim WHERE kind = 'app'") \
            == len(waits)  # the forward trigger stayed
    finally:
        await holder.close()
        await app.close()
