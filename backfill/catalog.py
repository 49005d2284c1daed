"""Resolve and check a job's table and key against the database's catalog, before any write.

Every problem is a ``ConfigError`` naming the job-file field.
"""

from __future__ import annotations

import asyncpg

from backfill import sql
from backfill.errors import ConfigError
from backfill.job import Job
from backfill.sql import KeyColumn, Target

KEY_TYPES = frozenset(
    {"int2", "int4", "int8", "numeric", "uuid", "text", "varchar", "bpchar", "timestamp",
     "timestamptz", "date"}
)
_KINDS = {"v": "a view", "m": "a materialized view", "f": "a foreign table", "S": "a sequence",
          "i": "an index", "c": "a composite type", "I": "an index", "t": "a TOAST table"}


async def resolve(conn: asyncpg.Connection, job: Job) -> Target:
    table = job.table.display
    rel = await conn.fetchrow(sql.RELATION, job.table.schema_, job.table.name)
    if rel is None:
        raise ConfigError(f"table: {table} does not exist")
    if rel["relkind"] not in ("r", "p"):
        raise ConfigError(f"table: {table} is {_KINDS.get(rel['relkind'], 'not a table')}")
    rows = await conn.fetch(sql.COLUMNS, rel["oid"], list(job.key))
    found = {r["name"]: r for r in rows}
    for name in job.key:
        column = found.get(name)
        if column is None:
            raise ConfigError(f"key: column {name} does not exist in {table}")
        if not column["not_null"]:
            raise ConfigError(f"key: column {name} of {table} allows NULL")
        if column["type_name"] not in KEY_TYPES:
            raise ConfigError(
                f"key: column {name} has type {column['sql_type']}, not one of "
                "smallint/integer/bigint, numeric, uuid, text/varchar, date, timestamp(tz)"
            )
    attnums = [found[name]["attnum"] for name in job.key]
    if await conn.fetchval(sql.UNIQUE_INDEX, rel["oid"], attnums) is None:
        columns = ", ".join(job.key)
        raise ConfigError(
            f"key: ({columns}) is not unique in {table}: it needs a primary key or a unique "
            "btree index on exactly these columns, in this order"
        )
    rights = await conn.fetchrow(sql.PRIVILEGES, rel["oid"])
    assert rights is not None
    for right in ("select", "update"):
        if not rights[f"can_{right}"]:
            raise ConfigError(
                f"permission denied: role {rights['role']} lacks {right.upper()} on {table}"
            )
    key = tuple(KeyColumn(name, found[name]["sql_type"]) for name in job.key)
    return Target(schema=job.table.schema_, table=job.table.name, key=key)


async def estimated_rows(conn: asyncpg.Connection, job: Job) -> int:
    rel = await conn.fetchrow(sql.RELATION, job.table.schema_, job.table.name)
    return int(await conn.fetchval(sql.ESTIMATED_ROWS, rel["oid"])) if rel else 0
