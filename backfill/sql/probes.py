"""What the probe connection asks while a run goes: overrides, state, standbys, slots, the
canary, other sessions and the application's statements."""

from __future__ import annotations

from backfill.sql.text import SCHEMA

# The probe connection: the shard's overrides while no batch runs, and its visible state.
CONTROL = f"SELECT control FROM {SCHEMA}.checkpoints WHERE job = $1 AND shard = $2"
# Show the shard's state (running, paused, throttled) while a run goes.
SHOW_STATE = f"""
UPDATE {SCHEMA}.checkpoints SET state = $3
WHERE job = $1 AND shard = $2 AND state IN ('running', 'paused', 'throttled')
"""
# Any standby's replay lag; `hidden` counts standbys whose columns the role may not read.
REPLICATION_LAG = """
SELECT coalesce(max(extract(epoch FROM replay_lag)), 0)::float8 AS lag,
       count(*) FILTER (WHERE state IS NULL) AS hidden
FROM pg_stat_replication
"""
# WAL retained by the most lagging logical replication slot.
SLOT_LAG = """
SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)), 0)::int8
FROM pg_replication_slots WHERE slot_type = 'logical' AND restart_lsn IS NOT NULL
"""
# The canary: a read and a write of the shard's own row in one transaction; the write also
# keeps what the impact budget measured last (NULLs until it has), for `status`.
CANARY_READ = f"SELECT beats FROM {SCHEMA}.canaries WHERE job = $1 AND shard = $2"
# The canary's write.
CANARY_WRITE = f"""
INSERT INTO {SCHEMA}.canaries AS c
    (job, shard, beats, ratio, budget, rate, current_s, baseline_s, deciding)
VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8)
ON CONFLICT (job, shard) DO UPDATE
SET beats = c.beats + 1, ratio = $3, budget = $4, rate = $5, current_s = $6, baseline_s = $7,
    deciding = $8, at = now()
"""
# Each shard's canary row: what the impact budget measured last (for `status`).
CANARIES = f"""
SELECT * FROM {SCHEMA}.canaries WHERE $1::text IS NULL OR job = $1 ORDER BY job, shard
"""
# Whether anyone else is at work: client sessions in any database, other than the runner's own
# ($1: its application_name), active now or within the last $2 seconds; `hidden` counts the
# sessions whose state the role may not read.
OTHERS = """
SELECT count(*) FILTER (WHERE state <> 'idle' OR state_change > now() - make_interval(secs => $2))
           AS active,
       count(*) FILTER (WHERE state IS NULL) AS hidden
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
  AND application_name IS DISTINCT FROM $1
"""
# The application's statements, for the impact budget: pg_stat_statements where installed
# (PostgreSQL 14+ columns), but the runner's own ($1) and the rows of roles this one may not
# see (their queryid is NULL: `hidden` counts them).
STATEMENTS_INSTALLED = "SELECT to_regprocedure('pg_stat_statements(boolean)') IS NOT NULL"
# The application's statements, from pg_stat_statements.
STATEMENTS = """
SELECT queryid, sum(calls)::int8 AS calls, sum(total_exec_time)::float8 AS ms,
       sum(count(*) FILTER (WHERE queryid IS NULL)) OVER () AS hidden
FROM pg_stat_statements(false)
WHERE toplevel AND (queryid IS NULL OR queryid <> ALL($1::int8[]))
GROUP BY queryid
"""
# The runner's own statements in pg_stat_statements (left out of the app's).
OWN_STATEMENTS = """
SELECT DISTINCT queryid FROM pg_stat_statements(true)
WHERE queryid IS NOT NULL AND query ~ '(backfill[._]|pg_stat_statements|pg_stat_activity)'
"""
# Active client sessions on this database other than the runner's own ($1: its
# application_name); `hidden` counts sessions whose state the role may not read.
ACTIVE_SESSIONS = """
SELECT count(*) FILTER (WHERE state = 'active') AS active,
       count(*) FILTER (WHERE state IS NULL) AS hidden
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND datname = current_database()
  AND pid <> pg_backend_pid() AND application_name IS DISTINCT FROM $1
"""
