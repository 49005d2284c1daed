"""Tables and jobs for the copy and delete shapes, and their exactly-once checks.

A source table ``src`` (key: one column of a given type, or a composite key), a target
``dst`` with the same columns (a copy), an archive ``src_archive`` (an archive job).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg

# The key columns and how the i-th row's key is written, per key type.
KEYS: dict[str, tuple[str, str, list[str]]] = {
    "bigint": ("id bigint", "g", ["id"]),
    "integer": ("id integer", "g::int", ["id"]),
    "uuid": ("id uuid", "md5(g::text)::uuid", ["id"]),
    "text": ("id text", "lpad(g::text, 8, '0') || 'k'", ["id"]),
    "composite": ("a int, b bigint", "g % 7, g", ["a", "b"]),
}

SYNC_TRIGGER = Path(__file__).parent / "faults" / "sync_trigger.sql"


def _pk(kind: str) -> str:
    return ", ".join(KEYS[kind][2])


async def create_source(conn: asyncpg.Connection, kind: str, rows: int) -> None:
    """``src`` with ``rows`` rows: the key, a payload, an ``old`` flag on every other row."""
    columns, value, _ = KEYS[kind]
    await conn.execute(f"""
        CREATE TABLE src ({columns}, payload text NOT NULL, n int NOT NULL, old boolean NOT NULL,
                          PRIMARY KEY ({_pk(kind)}));
        INSERT INTO src SELECT {value}, 'p' || g, g, g % 2 = 0 FROM generate_series(1, {rows}) g;
        ANALYZE src""")


async def create_target(conn: asyncpg.Connection, kind: str, *, table: str = "dst") -> None:
    columns, _, _ = KEYS[kind]
    await conn.execute(
        f"CREATE TABLE {table} ({columns}, payload text, n int, old boolean, "
        f"PRIMARY KEY ({_pk(kind)}))"
    )


async def create_archive(conn: asyncpg.Connection, kind: str) -> None:
    """The archive: every source column, no unique key, and a column of its own."""
    columns, _, _ = KEYS[kind]
    await conn.execute(
        f"CREATE TABLE src_archive ({columns}, payload text NOT NULL, n int NOT NULL, "
        "old boolean NOT NULL, archived_at timestamptz NOT NULL DEFAULT now())"
    )


def shape_job(kind: str, shape: str, **overrides: Any) -> dict[str, Any]:
    """A job over ``src``: ``copy`` into ``dst``, ``delete`` (the old rows) or ``archive``
    (the old rows into ``src_archive``)."""
    job: dict[str, Any] = {
        "name": f"src-{shape}",
        "table": "public.src",
        "key": KEYS[kind][2],
        "batch": {"size": 100},
        "limits": {"statement_timeout": "5s", "lock_timeout": "1s"},
    }
    if shape == "copy":
        job["copy"] = {"into": "public.dst"}
    else:
        job["where"] = "old"
        job["delete"] = {"archive": "public.src_archive"} if shape == "archive" else {}
    job.update(overrides)
    return job


async def target_equals_source(conn: asyncpg.Connection, *, where: str = "true") -> None:
    """Both EXCEPTs empty: every source row (matching ``where``) is in the target, as it
    is, and nothing else."""
    cols = "payload, n, old"
    keys = await conn.fetchval(
        "SELECT string_agg(attname, ', ') FROM pg_attribute WHERE attrelid = 'src'::regclass "
        "AND attnum > 0 AND attname NOT IN ('payload', 'n', 'old') AND NOT attisdropped"
    )
    missing = await conn.fetchval(
        f"SELECT count(*) FROM (SELECT {keys}, {cols} FROM src WHERE {where} "
        f"EXCEPT SELECT {keys}, {cols} FROM dst) x"
    )
    extra = await conn.fetchval(
        f"SELECT count(*) FROM (SELECT {keys}, {cols} FROM dst "
        f"EXCEPT SELECT {keys}, {cols} FROM src WHERE {where}) x"
    )
    assert (missing, extra) == (0, 0), f"missing from the target {missing}, extra {extra}"


async def moved_exactly_once(conn: asyncpg.Connection, rows: int, *, archive: bool) -> int:
    """Every old row deleted, every other kept; with an archive, each deleted row archived
    exactly once and none left in both tables. Returns the rows deleted."""
    old_left = await conn.fetchval("SELECT count(*) FROM src WHERE old")
    kept = await conn.fetchval("SELECT count(*) FROM src WHERE NOT old")
    assert (old_left, kept) == (0, rows - rows // 2)
    if archive:
        archived = await conn.fetchval("SELECT count(*) FROM src_archive")
        distinct = await conn.fetchval("SELECT count(*) FROM (SELECT DISTINCT * FROM "
                                       "(SELECT payload FROM src_archive) a) d")
        both = await conn.fetchval(
            "SELECT count(*) FROM src JOIN src_archive USING (payload)"
        )
        assert (archived, distinct, both) == (rows // 2, rows // 2, 0)
        assert await conn.fetchval("SELECT bool_and(old) FROM src_archive")
    return rows // 2
