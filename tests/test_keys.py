"""Every supported key type, and composite keys, through the real batch statement."""

from __future__ import annotations

import pytest

from backfill import commands
from backfill.job import parse_job
from tests.conftest import Database

pytestmark = pytest.mark.anyio

# type -> an expression producing 250 distinct values from g = 1..250, unordered on purpose
KEY_TYPES = {
    "smallint": "(g * 7)::smallint",
    "integer": "-g * 1000",
    "bigint": "g * 10000000000",
    "numeric": "g / 7.0",
    "uuid": "md5(g::text)::uuid",
    "text": "'k' || md5(g::text)",
    "varchar(40)": "'ключ-' || g",
    "char(12)": "lpad(g::text, 12, 'x')",
    "date": "date '2000-01-01' + g * 3",
    "timestamp": "timestamp '2020-01-01' + g * interval '1.5 seconds'",
    "timestamptz": "timestamptz '2020-01-01 00:00:00.000001+05' + g * interval '1 microsecond'",
}


@pytest.mark.parametrize("sql_type", KEY_TYPES)
async def test_key_type(db: Database, sql_type: str) -> None:
    await db.execute(f"CREATE TABLE items (k {sql_type} PRIMARY KEY, v int, touched int DEFAULT 0)")
    await db.execute(
        f"INSERT INTO items (k) SELECT {KEY_TYPES[sql_type]} FROM generate_series(1, 250) g"
    )
    job = parse_job(
        {
            "name": "items",
            "table": "items",
            "key": "k",
            "set": "v = 1, touched = touched + 1",
            "where": "v IS NULL",
            "batch": {"size": 16},
        }
    )
    ckpt = await commands.run(job, db.params, observers=[])
    assert (ckpt.rows_updated, ckpt.batches, ckpt.state) == (250, 16, "succeeded")
    assert await db.fetchval("SELECT count(*) FROM items WHERE touched = 1 AND v = 1") == 250


async def test_composite_key(db: Database) -> None:
    await db.execute(
        "CREATE TABLE line_items (order_id bigint, line_no text, amount numeric, cents bigint, "
        "touched int DEFAULT 0, PRIMARY KEY (order_id, line_no))"
    )
    await db.execute(
        "INSERT INTO line_items (order_id, line_no, amount) "
        "SELECT o, 'L' || l, o + l / 100.0 FROM generate_series(1, 60) o, generate_series(1, 17) l"
    )
    job = parse_job(
        {
            "name": "li",
            "table": "public.line_items",
            "key": ["order_id", "line_no"],
            "set": "cents = round(amount * 100), touched = touched + 1",
            "where": "cents IS NULL",
            "batch": {"size": 50},
        }
    )
    ckpt = await commands.run(job, db.params, observers=[])
    assert ckpt.rows_updated == 1020 and ckpt.batches == 21
    assert ckpt.cursor == ("60", "L9")  # text ordering of line_no: L9 sorts last
    assert await db.fetchval("SELECT count(*) FROM line_items WHERE touched <> 1") == 0


async def test_composite_key_must_match_index_order(db: Database) -> None:
    await db.execute("CREATE TABLE t (a int, b int, v int, PRIMARY KEY (a, b))")
    job = parse_job({"name": "t", "table": "t", "key": ["b", "a"], "set": "v = 1", "where": "true"})
    with pytest.raises(Exception, match=r"key: \(b, a\) is not unique"):
        await commands.run(job, db.params, observers=[])
