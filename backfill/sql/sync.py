"""The sync triggers a copy job with ``sync = "trigger"`` installs: every application write to
one table mirrored into another by the target's unique key, in the application's transaction.

The forward trigger (source -> target) goes in with the job's key range; the reverse one (the
new table under the source's name -> the old table) with the cut-over. Each row is mirrored with
``INSERT ... ON CONFLICT DO UPDATE`` (so a mirrored write never fails an application write
because of what the copy did), a key change as a delete under the old key and an insert under
the new one, and a delete as a delete. The function is ``SECURITY DEFINER`` with a fixed
``search_path`` (every name in it is schema-qualified), so the application's role needs no
privilege on the other table.

The column expressions are the copy's own (``Change.columns``): a column copied by name, or a
``[copy.values]`` expression over the source row. In the trigger they are evaluated over
``(SELECT (NEW).*) AS <source table name>``, so they read the row's columns as the batch
statement's do (a column named like a PL/pgSQL variable, ``old`` or ``new``, is the column:
``#variable_conflict use_column``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from backfill.sql.text import SCHEMA, ident

# PostgreSQL's longest identifier, in bytes.
_MAX_IDENT = 63


def _name(prefix: str, job: str) -> str:
    """``prefix`` + the job's name as an identifier (a hash keeps a long one unique)."""
    slug = job.replace("-", "_")
    name = f"{prefix}{slug}"
    if len(name) <= _MAX_IDENT:
        return name
    digest = hashlib.sha256(job.encode()).hexdigest()[:8]
    return f"{name[: _MAX_IDENT - 9]}_{digest}"


def forward_name(job: str) -> str:
    """The forward trigger's name and its function's (in the source's schema)."""
    return _name("backfill_sync_", job)


def reverse_name(job: str) -> str:
    """The reverse trigger's name and its function's (in the source's schema)."""
    return _name("backfill_back_", job)


@dataclass(frozen=True, slots=True)
class Mirror:
    """What one sync trigger writes: ``into`` (quoted) gets ``columns`` (column, SQL over the
    row of ``alias``, the table the trigger is on), unique on ``conflict``."""

    into: str
    alias: str
    columns: tuple[tuple[str, str], ...]
    conflict: tuple[str, ...]

    def _exprs(self, names: tuple[str, ...] | None = None) -> str:
        chosen = [(c, e) for c, e in self.columns if names is None or c in names]
        return ", ".join(e if e == ident(c) else f"({e}) AS {ident(c)}" for c, e in chosen)

    def _row(self, record: str, names: tuple[str, ...] | None = None) -> str:
        """The target's values computed from ``record`` (OLD or NEW)."""
        return f"(SELECT {self._exprs(names)} FROM (SELECT ({record}).*) AS {ident(self.alias)})"

    def _key(self, prefix: str) -> str:
        return "ROW(" + ", ".join(f"{prefix}.{ident(c)}" for c in self.conflict) + ")"

    def delete(self, *, key_changed: bool) -> str:
        """Delete the target's row under OLD's key (only if NEW's key differs: an update)."""
        same = " AND ".join(
            f"backfill_t.{ident(c)} = backfill_old.{ident(c)}" for c in self.conflict
        )
        using = f"{self._row('OLD', self.conflict)} AS backfill_old"
        if key_changed:
            using += f",\n                  {self._row('NEW', self.conflict)} AS backfill_new"
            same += (f"\n              AND {self._key('backfill_old')}"
                     f" IS DISTINCT FROM {self._key('backfill_new')}")
        return (f"DELETE FROM {self.into} AS backfill_t\n"
                f"            USING {using}\n            WHERE {same}")

    def upsert(self) -> str:
        """Insert NEW's values, or update the target's row with that key."""
        cols = ", ".join(ident(c) for c, _ in self.columns)
        others = [ident(c) for c, _ in self.columns if c not in self.conflict]
        action = "DO NOTHING"
        if others:
            action = "DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in others)
        conflict = ", ".join(ident(c) for c in self.conflict)
        return (
            f"INSERT INTO {self.into} AS backfill_t ({cols}) OVERRIDING SYSTEM VALUE\n"
            f"        SELECT * FROM {self._row('NEW')} AS backfill_new\n"
            f"        ON CONFLICT ({conflict}) {action}"
        )

    def check(self, table: str) -> str:
        """A statement to prepare (never run) that evaluates every column over a row of
        ``table``, as the trigger does: an expression it cannot apply fails to prepare."""
        return f"SELECT * FROM {self._row(f'NULL::{table}')} AS backfill_new"


def function(schema: str, name: str, mirror: Mirror) -> str:
    """``CREATE OR REPLACE FUNCTION`` of a sync trigger's function."""
    return f"""CREATE OR REPLACE FUNCTION {ident(schema)}.{ident(name)}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $backfill$
#variable_conflict use_column
BEGIN
    -- Generated by backfill: mirrors each row into {mirror.into}.
    IF TG_OP = 'DELETE' THEN
        {mirror.delete(key_changed=False)};
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        {mirror.delete(key_changed=True)};
    END IF;
    {mirror.upsert()};
    RETURN NULL;
END
$backfill$"""


def trigger(schema: str, name: str, table: str) -> str:
    """``CREATE OR REPLACE TRIGGER`` of the function ``name`` on ``table`` (quoted)."""
    return (
        f"CREATE OR REPLACE TRIGGER {ident(name)} AFTER INSERT OR UPDATE OR DELETE ON {table}\n"
        f"FOR EACH ROW EXECUTE FUNCTION {ident(schema)}.{ident(name)}()"
    )


def drop(schema: str, name: str, table: str) -> str:
    """Drop a sync trigger and its function, whichever of them exists."""
    return (
        f"DROP TRIGGER IF EXISTS {ident(name)} ON {table};\n"
        f"DROP FUNCTION IF EXISTS {ident(schema)}.{ident(name)}()"
    )


# Whether table ($1 oid) has the trigger named $2.
HAS_TRIGGER = "SELECT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = $1::oid AND tgname = $2)"
# What the current role may do for a sync trigger on table $1 (oid): create triggers on it,
# own it (a rename and a trigger function that outlives a role need it), create functions in
# its schema.
SYNC_RIGHTS = """
SELECT has_table_privilege($1::oid, 'TRIGGER') AS can_trigger,
       pg_has_role(c.relowner, 'USAGE') AS owns,
       has_schema_privilege(c.relnamespace, 'CREATE') AS can_create,
       current_user::text AS role
FROM pg_class c WHERE c.oid = $1::oid
"""

# Each job's place in its table change: 'syncing' (the forward trigger in place), 'cut over'
# (the names swapped, the reverse trigger in place), 'finished' (no trigger left).
LIFECYCLE = f"""
CREATE TABLE IF NOT EXISTS {SCHEMA}.lifecycle (
    job        text        PRIMARY KEY,
    phase      text        NOT NULL,
    source     text        NOT NULL,
    target     text        NOT NULL,
    old        text        NOT NULL,
    attempts   integer     NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
)"""
# A job's phase, recorded in the transaction that installs its forward trigger.
SYNCING = f"""
INSERT INTO {SCHEMA}.lifecycle (job, phase, source, target, old) VALUES ($1, 'syncing', $2, $3, $4)
ON CONFLICT (job) DO UPDATE SET phase = 'syncing', source = $2, target = $3, old = $4,
    updated_at = now()
"""
# A job's phase ($1).
PHASE = f"SELECT * FROM {SCHEMA}.lifecycle WHERE job = $1"
# The same, locked for the step that changes it.
PHASE_LOCKED = f"SELECT * FROM {SCHEMA}.lifecycle WHERE job = $1 FOR UPDATE"
# Every job's phase (or one's).
PHASES = f"SELECT job, phase FROM {SCHEMA}.lifecycle WHERE $1::text IS NULL OR job = $1"
# Move a job to phase $2 after $3 attempts.
SET_PHASE = f"""
UPDATE {SCHEMA}.lifecycle SET phase = $2, attempts = $3, updated_at = now() WHERE job = $1
"""
