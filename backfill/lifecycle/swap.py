"""The name swap of a cut-over and of its rollback: one transaction under a short
``lock_timeout``, retried with backoff for a bounded time, that renames the two tables, moves
what belongs to the name (sequences and defaults, identity, referencing foreign keys, grants),
swaps the sync trigger's direction and records the job's new phase.

What it cannot move is refused before the first attempt, naming the object (``preflight``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import asyncpg

from backfill import sql
from backfill.errors import ConfigError, GaveUp
from backfill.job import Job
from backfill.sql import ident, swap, sync

log = logging.getLogger(__name__)
T = TypeVar("T")
_RETRYABLE = (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError)
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 1.0


@dataclass(frozen=True, slots=True)
class Direction:
    """One direction of the swap: the table under ``name`` leaves to ``leaving_to``, the
    table ``entering`` takes ``name``; trigger ``remove`` goes, trigger ``add`` comes (its
    function created from ``mirror``, or kept from before when None)."""

    verb: str
    schema: str
    name: str
    leaving_to: str
    entering: str
    remove: str
    add: str
    mirror: sync.Mirror | None
    phase_from: tuple[str, ...]
    phase_to: str

    def table(self, name: str) -> str:
        return f"{ident(self.schema)}.{ident(name)}"


@dataclass(slots=True)
class Outcome:
    """What a step did: ``changed`` False when it had been done already."""

    phase: str
    changed: bool = True
    attempts: int = 0
    seconds: float = 0.0
    to_validate: list[tuple[str, str]] = field(default_factory=list)  # (table, constraint)
    notes: list[str] = field(default_factory=list)


async def preflight(conn: asyncpg.Connection, d: Direction) -> tuple[int, int]:
    """Refuse (``ConfigError``, before anything changes) a swap that cannot move everything
    that belongs to the name; returns the oids of the leaving and the entering table."""
    leaving, entering = (await _oid(conn, d, d.name), await _oid(conn, d, d.entering))
    for oid, name in ((leaving, d.name), (entering, d.entering)):
        if not await conn.fetchval(swap.OWNS, oid):
            raise ConfigError(
                f"{d.verb}: permission denied: the current role does not own "
                f"{d.schema}.{name} (a rename needs its owner)"
            )
    for what in [r["what"] for r in await conn.fetch(swap.DEPENDENTS, leaving)]:
        raise ConfigError(
            f"{d.verb}: {what} depends on {d.schema}.{d.name} and would keep using the old "
            "table: drop it and re-create it after the cut-over"
        )
    for ref in await conn.fetch(swap.REFERENCES, leaving, entering):
        fk = f"foreign key {ref['name']} of {ref['referencing']}"
        if ref["self"]:
            raise ConfigError(f"{d.verb}: {fk} references its own table: it cannot re-point it")
        if not ref["fits"]:
            raise ConfigError(
                f"{d.verb}: {fk} cannot be re-pointed: {d.schema}.{d.entering} has no unique "
                "index on exactly the columns it references"
            )
        if not ref["owns"]:
            raise ConfigError(
                f"{d.verb}: permission denied: re-pointing {fk} needs the owner of "
                f"{ref['referencing']}"
            )
    if d.mirror is not None:
        try:
            await conn.prepare(d.mirror.check(d.table(d.entering)))
        except asyncpg.PostgresError as exc:
            raise ConfigError(f"{d.verb}: the reverse sync trigger cannot apply: {exc}") from exc
    return leaving, entering


async def _oid(conn: asyncpg.Connection, d: Direction, name: str) -> int:
    rel = await conn.fetchrow(sql.RELATION, d.schema, name)
    if rel is None:
        raise ConfigError(f"{d.verb}: {d.schema}.{name} does not exist")
    return int(rel["oid"])


async def with_lock_retries(
    conn: asyncpg.Connection, job: Job, step: Callable[[int], Awaitable[T]], *,
    verb: str, table: int,
) -> tuple[T, int, float]:
    """Run ``step(attempt)`` in a transaction under the job's ``[cutover]`` lock_timeout,
    retried with jittered exponential backoff while a lock is not granted in time, for at most
    ``retry_for``; then ``GaveUp`` (exit 75) naming who holds ``table``. Returns the step's
    value, the attempts and the seconds it took."""
    limits = job.cutover
    started = anyio.current_time()
    delay, attempt = FIRST_BACKOFF, 0
    while True:
        attempt += 1
        try:
            async with conn.transaction():
                await conn.execute(
                    swap.ATTEMPT, f"{limits.lock_timeout * 1000:.0f}ms",
                    f"{limits.statement_timeout * 1000:.0f}ms",
                )
                value = await step(attempt)
            return value, attempt, anyio.current_time() - started
        except _RETRYABLE as exc:
            spent = anyio.current_time() - started
            log.info("swap attempt found its tables held; retrying",
                     extra={"job": job.name, "verb": verb, "attempt": attempt,
                            "error": str(exc).splitlines()[0]})
            if spent + delay > limits.retry_for:
                holders = await _holders(conn, table)
                raise GaveUp(
                    f"{verb}: gave up after {attempt} attempts in {spent:.1f}s (each waited "
                    f"at most {limits.lock_timeout * 1000:.0f} ms for its locks): {holders}; "
                    "nothing changed: run it again later"
                ) from exc
        await anyio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, MAX_BACKOFF)


async def _holders(conn: asyncpg.Connection, table: int) -> str:
    rows = await conn.fetch(swap.HOLDERS, table)
    if not rows:
        return "the table was held by another session (gone now)"
    return "held by " + "; ".join(
        f"backend pid {r['pid']} ({r['state']}"
        + (f", in a transaction since {r['xact_start']:%H:%M:%S}" if r["xact_start"] else "")
        + f": {r['query']!r})"
        for r in rows
    )


async def swap_once(
    conn: asyncpg.Connection, d: Direction, job: str, leaving: int, entering: int, attempt: int
) -> Outcome:
    """One attempt, in the caller's transaction: lock, check the phase, swap, record."""
    row = await conn.fetchrow(sync.PHASE_LOCKED, job)
    phase = row["phase"] if row is not None else None
    if phase == d.phase_to:
        return Outcome(phase, changed=False)
    if phase not in d.phase_from:
        raise ConfigError(
            f"{d.verb}: job {job} is {phase or 'not a copy with sync = trigger'}; "
            f"{d.verb} needs it {' or '.join(d.phase_from)}"
        )
    refs = await conn.fetch(swap.REFERENCES, leaving, entering)
    others = [r["referencing"] for r in refs if r["referencing"] not in (d.name, d.entering)]
    await conn.execute(swap.lock([d.table(d.name), d.table(d.entering), *others]))
    refs = await conn.fetch(swap.REFERENCES, leaving, entering)  # as of the lock
    defaults = await conn.fetch(swap.DEFAULTS, leaving, entering)
    grants = await conn.fetch(swap.GRANTS, leaving)
    for ref in refs:
        await conn.execute(f"ALTER TABLE {ref['referencing']} DROP CONSTRAINT {ident(ref['name'])}")
    await conn.execute(f"DROP TRIGGER IF EXISTS {ident(d.remove)} ON {d.table(d.name)}")
    await conn.execute(swap.rename(d.table(d.name), d.leaving_to))
    await conn.execute(swap.rename(d.table(d.entering), d.name))
    now = d.table(d.name)
    for default in defaults:
        await _move_default(conn, now, default)
    outcome = Outcome(d.phase_to, attempts=attempt)
    for ref in refs:
        definition = ref["definition"].removesuffix(" NOT VALID")
        await conn.execute(
            f"ALTER TABLE {ref['referencing']} ADD CONSTRAINT {ident(ref['name'])} "
            f"{definition} NOT VALID"
        )
        outcome.to_validate.append((ref["referencing"], ref["name"]))
    for grant in grants:
        option = " WITH GRANT OPTION" if grant["grantable"] else ""
        await conn.execute(f"GRANT {grant['privilege']} ON {now} TO {grant['grantee']}{option}")
    if d.mirror is not None:
        await conn.execute(sync.function(d.schema, d.add, d.mirror))
    await conn.execute(sync.trigger(d.schema, d.add, now))
    await conn.execute(sync.SET_PHASE, job, d.phase_to, attempt)
    return outcome


async def _move_default(conn: asyncpg.Connection, table: str, default: asyncpg.Record) -> None:
    """Give the table that took the name the leaving table's default of one column: its
    sequence (owned by the column from now on, widened to the column's type) or identity
    (continuing where the leaving one's stopped), or its expression."""
    column, seq = ident(default["name"]), default["seq"]
    if default["identity"]:
        assert seq is not None
        after = await conn.fetchval(swap.next_value(seq))
        if not default["their_identity"]:
            kind = "ALWAYS" if default["identity"] == "a" else "BY DEFAULT"
            await conn.execute(
                f"ALTER TABLE {table} ALTER COLUMN {column} DROP DEFAULT, "
                f"ALTER COLUMN {column} ADD GENERATED {kind} AS IDENTITY"
            )
        await conn.execute(f"ALTER TABLE {table} ALTER COLUMN {column} RESTART WITH {int(after)}")
        return
    if seq is not None:
        if default["their_type"] == "bigint":
            await conn.execute(f"ALTER SEQUENCE {seq} AS bigint")
        await conn.execute(f"ALTER SEQUENCE {seq} OWNED BY {table}.{column}")
    if not default["they_have"] or seq is not None:
        expr = default["expr"]
        await conn.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT {expr}")


async def validate(conn: asyncpg.Connection, outcome: Outcome) -> None:
    """Validate the re-created foreign keys, outside the swap's lock (they take no lock that
    blocks the application's writes); one that fails stays NOT VALID, with a note."""
    for table, name in outcome.to_validate:
        try:
            await conn.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {ident(name)}")
        except asyncpg.PostgresError as exc:
            outcome.notes.append(
                f"foreign key {name} of {table} is NOT VALID ({str(exc).splitlines()[0]}): "
                f"ALTER TABLE {table} VALIDATE CONSTRAINT {ident(name)}"
            )
