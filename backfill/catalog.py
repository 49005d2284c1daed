"""Resolve and check a job's table and key against the database's catalog, before any write.

Every problem is a ``ConfigError`` naming the job-file field.
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from backfill import sql
from backfill.errors import ConfigError
from backfill.job import Copy, Job, Table
from backfill.sql import Change, KeyColumn, Target, ident

KEY_TYPES = frozenset(
    {"int2", "int4", "int8", "numeric", "uuid", "text", "varchar", "bpchar", "timestamp",
     "timestamptz", "date"}
)
_KINDS = {"v": "a view", "m": "a materialized view", "f": "a foreign table", "S": "a sequence",
          "i": "an index", "c": "a composite type", "I": "an index", "t": "a TOAST table"}


# The privileges each shape needs on its source (FOR SHARE needs UPDATE too).
_SOURCE_RIGHTS = {"update": ("select", "update"), "copy": ("select", "update"),
                  "delete": ("select", "delete"), "archive": ("select", "delete")}


async def _relation(conn: asyncpg.Connection, field: str, table: Table) -> asyncpg.Record:
    return _table(field, table, await conn.fetchrow(sql.RELATION, table.schema_, table.name))


def _table(field: str, table: Table, rel: asyncpg.Record | None) -> asyncpg.Record:
    """``rel`` (a row with ``relkind``), if it is a table."""
    if rel is None:
        raise ConfigError(f"{field}: {table.display} does not exist")
    if rel["relkind"] not in ("r", "p"):
        raise ConfigError(
            f"{field}: {table.display} is {_KINDS.get(rel['relkind'], 'not a table')}"
        )
    return rel


async def _require(conn: asyncpg.Connection, oid: int, table: str, rights: Iterable[str]) -> None:
    granted = await conn.fetchrow(sql.PRIVILEGES, oid)
    assert granted is not None
    _granted(granted, table, rights)


def _granted(granted: asyncpg.Record, table: str, rights: Iterable[str]) -> None:
    for right in rights:
        if not granted[f"can_{right}"]:
            raise ConfigError(
                f"permission denied: role {granted['role']} lacks {right.upper()} on {table}"
            )


async def resolve(conn: asyncpg.Connection, job: Job) -> Target:
    """The job's table and key, checked against the catalog in one round trip."""
    table = job.table.display
    row = _table("table", job.table, await conn.fetchrow(
        sql.RESOLVE, job.table.schema_, job.table.name, list(job.key)
    ))
    described = zip(row["names"] or [], row["sql_types"] or [], row["type_names"] or [],
                    row["not_null"] or [], strict=True)
    found = {name: (sql_type, type_name, not_null)
             for name, sql_type, type_name, not_null in described}
    for name in job.key:
        column = found.get(name)
        if column is None:
            raise ConfigError(f"key: column {name} does not exist in {table}")
        sql_type, type_name, not_null = column
        if not not_null:
            raise ConfigError(f"key: column {name} of {table} allows NULL")
        if type_name not in KEY_TYPES:
            raise ConfigError(
                f"key: column {name} has type {sql_type}, not one of "
                "smallint/integer/bigint, numeric, uuid, text/varchar, date, timestamp(tz)"
            )
    if not row["key_unique"]:
        columns = ", ".join(job.key)
        raise ConfigError(
            f"key: ({columns}) is not unique in {table}: it needs a primary key or a unique "
            "btree index on exactly these columns, in this order"
        )
    _granted(row, table, _SOURCE_RIGHTS[job.shape])
    key = tuple(KeyColumn(name, found[name][0]) for name in job.key)
    return Target(schema=job.table.schema_, table=job.table.name, key=key)


async def estimated_rows(conn: asyncpg.Connection, job: Job) -> int:
    rel = await conn.fetchrow(sql.RELATION, job.table.schema_, job.table.name)
    return int(await conn.fetchval(sql.ESTIMATED_ROWS, rel["oid"])) if rel else 0


async def change(conn: asyncpg.Connection, job: Job, target: Target) -> Change:
    """The job's shape, resolved and checked against the catalog: the copy's target or the
    archive exists, has the columns written, with types that fit, and may be written."""
    if job.copy_ is not None:
        return await _copy(conn, job, job.copy_, target)
    if job.delete is None:
        assert job.set is not None
        return Change(sql.UPDATE, job.where, set_=job.set)
    if job.delete.archive is None:
        return Change(sql.DELETE, job.where)
    archive = job.delete.archive
    rel = await _relation(conn, "delete.archive", archive)
    source = await _columns(conn, target)
    into = {c["name"]: c for c in await conn.fetch(sql.ALL_COLUMNS, rel["oid"])}
    for name, column in source.items():
        there = into.get(name)
        if there is None or there["type_oid"] != column["type_oid"]:
            has = "has no such column" if there is None else f"has it as {there['sql_type']}"
            raise ConfigError(
                f"delete.archive: column {name} ({column['sql_type']}) of {job.table.display}: "
                f"{archive.display} {has}"
            )
    _defaults(into, set(source), "delete.archive", archive.display)
    await _require(conn, rel["oid"], archive.display, ("insert",))
    columns = tuple((n, ident(n)) for n in source if not into[n]["generated"])
    return Change(sql.ARCHIVE, job.where, into=_quoted(archive), columns=columns)


async def _copy(conn: asyncpg.Connection, job: Job, copy: Copy, target: Target) -> Change:
    into = copy.into.display
    rel = await _relation(conn, "copy.into", copy.into)
    source = await _columns(conn, target)
    there = {c["name"]: c for c in await conn.fetch(sql.ALL_COLUMNS, rel["oid"])}
    for name in copy.values:
        if name not in there or there[name]["generated"]:
            what = "does not exist" if name not in there else "is generated"
            raise ConfigError(f"copy.values: column {name} {what} in {into}")
    if copy.columns is None:  # every column both have, by name, that the target lets write
        names = [n for n in source if n in there and not there[n]["generated"]
                 and n not in copy.values]
    else:
        names = list(copy.columns)
    for name in names:
        if name not in source:
            raise ConfigError(f"copy.columns: column {name} does not exist in {job.table.display}")
        if name not in there or there[name]["generated"]:
            what = "does not exist" if name not in there else "is generated"
            raise ConfigError(f"copy.columns: column {name} {what} in {into}")
        mine, theirs = source[name], there[name]
        if not await conn.fetchval(sql.WIDENS, mine["type_oid"], theirs["type_oid"]):
            raise ConfigError(
                f"copy.columns: column {name} is {mine['sql_type']} in {job.table.display} "
                f"but {theirs['sql_type']} in {into} (use [copy.values] to convert it)"
            )
    written = set(names) | set(copy.values)
    _defaults(there, written, "copy.into", into)
    for key in target.key:
        if key.name not in written:
            raise ConfigError(f"copy.columns: the key column {key.name} is not copied to {into}")
    # The conflict target: a unique index on the key columns, or on them and other copied
    # columns (a partitioned target's primary key includes its partition key).
    keys = {k.name for k in target.key}
    unique = [tuple(r["columns"]) for r in await conn.fetch(sql.UNIQUE_INDEXES, rel["oid"])]
    fits = [u for u in unique if keys <= set(u) <= written]
    if not fits:
        raise ConfigError(
            f"copy.into: ({target.columns()}) is not unique in {into}: ON CONFLICT needs a "
            "primary key or a unique index on these columns (and, at most, other copied ones)"
        )
    rights = ("insert", "select", "update") if copy.on_conflict == "update" else ("insert",)
    await _require(conn, rel["oid"], into, rights)
    columns = tuple((n, ident(n)) for n in names) + tuple(copy.values.items())
    return Change(sql.COPY, job.where, into=_quoted(copy.into), columns=columns,
                  on_conflict=copy.on_conflict, conflict=fits[0])


def _defaults(columns: dict[str, asyncpg.Record], written: set[str], field: str,
              table: str) -> None:
    """Every column not written must take a default (or NULL)."""
    for name, column in columns.items():
        if name not in written and column["needs_value"]:
            raise ConfigError(
                f"{field}: column {name} of {table} is NOT NULL without a default and is not "
                "written (give it a default, e.g. DEFAULT now())"
            )


async def _columns(conn: asyncpg.Connection, target: Target) -> dict[str, asyncpg.Record]:
    rel = await conn.fetchrow(sql.RELATION, target.schema, target.table)
    assert rel is not None
    return {c["name"]: c for c in await conn.fetch(sql.ALL_COLUMNS, rel["oid"])}


def _quoted(table: Table) -> str:
    return f"{ident(table.schema_)}.{ident(table.name)}"


async def unindexed_references(conn: asyncpg.Connection, job: Job) -> list[str]:
    """Foreign keys referencing the job's table without an index on their columns, as
    ``table (columns)``: every row a delete removes scans each of those tables."""
    rel = await conn.fetchrow(sql.RELATION, job.table.schema_, job.table.name)
    if rel is None:
        return []
    rows = await conn.fetch(sql.UNINDEXED_REFERENCES, rel["oid"])
    return [f"{r['referencing']} ({r['columns']}, constraint {r['name']})" for r in rows]
