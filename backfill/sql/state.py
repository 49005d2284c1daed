"""The state schema (checkpoints, runs, controls, canaries), its migrations, and the statements
that keep it."""

from __future__ import annotations

from dataclasses import dataclass

from backfill.sql.sync import LIFECYCLE
from backfill.sql.text import SCHEMA, literal


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered change of the state schema. ``backfill init`` applies those whose number
    is above the highest in ``backfill.schema_version``, each with its row there, in one
    transaction. Each is written to apply cleanly to any install it may find (``IF NOT
    EXISTS``): the first one brings an install from before versions up to date whatever it had.
    """

    version: int
    description: str
    sql: str


# The state schema as it stood before versions (migration 1).
_BASELINE = f"""
CREATE TABLE IF NOT EXISTS {SCHEMA}.checkpoints (
    job          text        NOT NULL,
    shard        integer     NOT NULL DEFAULT 0,
    shards       integer     NOT NULL DEFAULT 1,
    fingerprint  text        NOT NULL,
    target       text        NOT NULL,
    state        text        NOT NULL,
    range_lo     text[],
    range_hi     text[],
    cursor       text[],
    rows_updated bigint      NOT NULL DEFAULT 0,
    rows_skipped bigint      NOT NULL DEFAULT 0,
    skipped_keys jsonb       NOT NULL DEFAULT '[]',
    batches      bigint      NOT NULL DEFAULT 0,
    control      jsonb       NOT NULL DEFAULT '{{}}',
    holder       text,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (job, shard)
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.runs (
    id             bigserial   PRIMARY KEY,
    job            text        NOT NULL,
    shard          integer     NOT NULL DEFAULT 0,
    fingerprint    text        NOT NULL,
    version        text        NOT NULL,
    host           text        NOT NULL,
    outcome        text        NOT NULL DEFAULT 'running',
    started_at     timestamptz NOT NULL DEFAULT now(),
    ended_at       timestamptz,
    rows_at_start  bigint      NOT NULL DEFAULT 0,
    batches_at_start bigint    NOT NULL DEFAULT 0,
    rows_updated   bigint,
    batches        bigint,
    error          text
);
CREATE INDEX IF NOT EXISTS runs_job ON {SCHEMA}.runs (job, shard, id);
-- Where the run's cursor was when it started: `status` derives its rate and ETA from it.
ALTER TABLE {SCHEMA}.runs ADD COLUMN IF NOT EXISTS cursor_at_start text[];
-- Live control: the job file's speed settings as the last run saw them (for `status`), and the
-- overrides set before a job's first run (its checkpoints start with them).
ALTER TABLE {SCHEMA}.checkpoints ADD COLUMN IF NOT EXISTS settings jsonb NOT NULL DEFAULT '{{}}';
CREATE TABLE IF NOT EXISTS {SCHEMA}.controls (
    job        text        PRIMARY KEY,
    control    jsonb       NOT NULL DEFAULT '{{}}',
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- What the batches of the last group did, as (rows, microseconds, backend pid): the statement
-- records it, since a group's statements return nothing to the client (see `group`). And
-- whether the last slice was dense (one integer key: the next slice's end is then computed).
ALTER TABLE {SCHEMA}.checkpoints ADD COLUMN IF NOT EXISTS recent int8[];
ALTER TABLE {SCHEMA}.checkpoints ADD COLUMN IF NOT EXISTS dense boolean NOT NULL DEFAULT false;
-- The impact budget's canary: a row per job and shard that a running job's probe reads and
-- writes several times a second (never the checkpoint's row: a batch holds that one), and
-- where it leaves what it measured, for `status`.
CREATE TABLE IF NOT EXISTS {SCHEMA}.canaries (
    job       text             NOT NULL,
    shard     integer          NOT NULL,
    beats     bigint           NOT NULL DEFAULT 0,
    ratio     double precision,
    budget    double precision,
    duty      double precision,
    current_s double precision,
    baseline_s double precision,
    deciding  text,
    at        timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (job, shard)
);
"""

MIGRATIONS = (
    Migration(1, "checkpoints, runs, controls, canaries: the schema before versions", _BASELINE),
    Migration(
        2,
        "checkpoints.shape: what the job's batches do (update, copy, delete, archive)",
        f"ALTER TABLE {SCHEMA}.checkpoints ADD COLUMN IF NOT EXISTS shape text NOT NULL "
        "DEFAULT 'update'",
    ),
    Migration(
        3,
        "canaries.rate: the impact budget's rate in rows a second (duty is no longer written)",
        f"ALTER TABLE {SCHEMA}.canaries ADD COLUMN IF NOT EXISTS rate double precision",
    ),
    Migration(4, "lifecycle: each copy job's place in its table change (sync, cut-over)",
              LIFECYCLE),
    Migration(
        5,
        "checkpoints.recent dropped: a group's batches record themselves in the session "
        "(backfill.recent), never in the checkpoint's row",
        f"ALTER TABLE {SCHEMA}.checkpoints DROP COLUMN IF EXISTS recent",
    ),
)
LATEST = MIGRATIONS[-1].version

# The schema and its version table, before any migration (idempotent).
VERSIONED = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (
    version     integer     PRIMARY KEY,
    description text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
# Serialises concurrent `backfill init`s (a transaction-level advisory lock).
LOCK_MIGRATING = "SELECT pg_advisory_xact_lock(hashtext('backfill:schema'))"
# The highest migration applied (0 for none, or an install from before versions).
SCHEMA_VERSION = f"SELECT coalesce(max(version), 0) FROM {SCHEMA}.schema_version"
# Record a migration as applied.
APPLIED = f"INSERT INTO {SCHEMA}.schema_version (version, description) VALUES ($1, $2)"
# Every migration as one script, for a fresh database (tests, benchmarks).
INIT = ";\n".join(
    [VERSIONED]
    + [m.sql for m in MIGRATIONS]
    + [
        f"INSERT INTO {SCHEMA}.schema_version (version, description) "
        f"VALUES ({m.version}, {literal(m.description)}) ON CONFLICT DO NOTHING"
        for m in MIGRATIONS
    ]
)

# Whether the state schema exists (its checkpoints table).
STATE_EXISTS = f"SELECT to_regclass('{SCHEMA}.checkpoints') IS NOT NULL"
# Whether the state schema has its version table (an install from after versions).
VERSIONS_EXIST = f"SELECT to_regclass('{SCHEMA}.schema_version') IS NOT NULL"
# Both at once, when the version table is there (an error when it is not): one round trip.
STATE_AND_VERSION = f"SELECT ({STATE_EXISTS}) AS state, ({SCHEMA_VERSION}) AS version"

# An advisory lock per (job, shard); session-level, so it dies with the runner's connection.
TRY_LOCK = """
SELECT pg_try_advisory_lock(hashtext('backfill:' || $1), $2) AS locked, pg_backend_pid() AS pid
"""
# The backend serving this connection.
BACKEND_PID = "SELECT pg_backend_pid()"
# The array types the runner's statements use (keys, the catalog
# checks' flags), named in one statement right after connecting: asyncpg looks up each type it
# does not know at the first statement that uses it (a recursive catalog query, with JIT
# switched off and on around it), once per statement that brings new ones otherwise.
ARRAY_TYPES = "SELECT NULL::text[], NULL::int8[], NULL::bool[]"
# Who holds a job's lock: its backend, client and since when.
LOCK_HOLDER = """
SELECT a.pid, a.application_name, host(a.client_addr) AS client, a.backend_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid = hashtext('backfill:' || $1)::oid AND l.objid = $2::oid
"""

# A job's lock for this transaction: creating its checkpoints, changing its overrides.
LOCK_CREATING = "SELECT pg_advisory_xact_lock(hashtext('backfill:' || $1), $2)"
# How many shards a job's checkpoints were made for.
SHARD_COUNT = f"SELECT max(shards) FROM {SCHEMA}.checkpoints WHERE job = $1"
# A table's row and page estimates, by schema and name.
TABLE_SIZE = """
SELECT c.reltuples::float8, c.relpages::float8
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2
"""
# One shard's checkpoint.
LOAD = f"SELECT * FROM {SCHEMA}.checkpoints WHERE job = $1 AND shard = $2"
# One shard's checkpoint, locked (``plan`` runs a batch on it, rolled back).
LOAD_LOCKED = f"SELECT * FROM {SCHEMA}.checkpoints WHERE job = $1 AND shard = $2 FOR UPDATE"
# Every checkpoint (of one job, or all), in job and shard order.
LOAD_ALL = f"""
SELECT * FROM {SCHEMA}.checkpoints WHERE $1::text IS NULL OR job = $1 ORDER BY job, shard
"""
# A new shard checkpoint, with its fixed range and any pending overrides.
CREATE = f"""
INSERT INTO {SCHEMA}.checkpoints
    (job, shard, shards, fingerprint, target, state, range_lo, range_hi, cursor, control, shape)
VALUES ($1, $2, $3, $4, $5, 'running', $6, $7, $8,
        coalesce((SELECT control FROM {SCHEMA}.controls WHERE job = $1), '{{}}'), $9)
ON CONFLICT DO NOTHING
"""
# A shard's final state and error at the end of a run.
FINISH = f"""
UPDATE {SCHEMA}.checkpoints
SET state = $3, error = $4, updated_at = now(),
    finished_at = CASE WHEN $3 = 'succeeded' THEN now() ELSE finished_at END
WHERE job = $1 AND shard = $2
"""
# A finished table change is forgotten with it (one still under way is kept: its triggers are
# in place, and `cutover`, `rollback` and `finish` go on from its phase).
RESET = f"""
WITH forgotten AS (DELETE FROM {SCHEMA}.controls WHERE job = $1),
     changed AS (DELETE FROM {SCHEMA}.lifecycle WHERE job = $1 AND phase = 'finished')
DELETE FROM {SCHEMA}.checkpoints WHERE job = $1
"""

# Runs: a row per execution. A run killed without a goodbye is closed by the next one from the
# checkpoint's counters, so the audit trail stays exact without a write per batch.
#
# A session's start, in one statement (one round trip, one transaction): the run goes on ($6,
# this process's run, unless another runner closed it meanwhile: a reconnection is not a
# killed run), or else the job's abandoned runs are closed and a new one is opened from the
# checkpoint's counters; and the checkpoint is marked running under its holder ($3; a
# succeeded one stays succeeded) with the job file's speed settings ($7), in one UPDATE (a
# statement changes a row once). Every part reads the statement's snapshot, which is what each
# saw when they were sent one after another in a transaction. Returns the run's id and the
# checkpoint as it now stands; no row when the checkpoint is gone.
# Parameters: $1 job, $2 shard, $3 holder, $4 fingerprint, $5 version, $6 run id (or NULL),
# $7 settings.
BEGIN_RUN = f"""
WITH backfill_kept AS (
    SELECT id FROM {SCHEMA}.runs WHERE id = $6::int8 AND outcome = 'running'
), backfill_abandoned AS (
    UPDATE {SCHEMA}.runs r
    SET outcome = 'killed', ended_at = c.updated_at,
        rows_updated = c.rows_updated - r.rows_at_start, batches = c.batches - r.batches_at_start
    FROM {SCHEMA}.checkpoints c
    WHERE NOT EXISTS (SELECT FROM backfill_kept)
      AND r.job = $1 AND r.shard = $2 AND r.outcome = 'running'
      AND c.job = r.job AND c.shard = r.shard
), backfill_opened AS (
    INSERT INTO {SCHEMA}.runs
        (job, shard, fingerprint, version, host, rows_at_start, batches_at_start, cursor_at_start)
    SELECT $1, $2, $4, $5, $3, rows_updated, batches, cursor FROM {SCHEMA}.checkpoints
    WHERE job = $1 AND shard = $2 AND NOT EXISTS (SELECT FROM backfill_kept)
    RETURNING id
), backfill_started AS (
    UPDATE {SCHEMA}.checkpoints
    SET state = CASE WHEN state = 'succeeded' THEN state ELSE 'running' END,
        holder = $3, error = NULL, started_at = coalesce(started_at, now()), updated_at = now(),
        settings = $7::jsonb
    WHERE job = $1 AND shard = $2
    RETURNING *
)
SELECT coalesce((SELECT id FROM backfill_kept), (SELECT id FROM backfill_opened)) AS run_id,
       backfill_started.*
FROM backfill_started
"""
# Close this process's run with its outcome and what it did.
CLOSE_RUN = f"""
UPDATE {SCHEMA}.runs r
SET outcome = $2, ended_at = now(), error = $3,
    rows_updated = c.rows_updated - r.rows_at_start, batches = c.batches - r.batches_at_start
FROM {SCHEMA}.checkpoints c
WHERE r.id = $1 AND c.job = r.job AND c.shard = r.shard
"""
# A job's latest runs, newest first.
HISTORY = f"""
SELECT * FROM {SCHEMA}.runs WHERE job = $1 ORDER BY id DESC LIMIT $2
"""
# Each shard's latest run, for the rate and ETA in `status`.
LATEST_RUNS = f"""
SELECT DISTINCT ON (job, shard) * FROM {SCHEMA}.runs
WHERE $1::text IS NULL OR job = $1 ORDER BY job, shard, id DESC
"""
# The server's clock.
NOW = "SELECT clock_timestamp()"
# Move the cursor past a poison row, recording its key.
SKIP = f"""
UPDATE {SCHEMA}.checkpoints
SET cursor = $3, rows_skipped = rows_skipped + 1, batches = batches + 1,
    skipped_keys = skipped_keys || jsonb_build_array(to_jsonb($3::text[])),
    updated_at = clock_timestamp()
WHERE job = $1 AND shard = $2
RETURNING control
"""
