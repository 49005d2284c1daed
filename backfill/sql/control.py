"""Live control: pause, resume and `set`, and the settings each run records."""

from __future__ import annotations

from backfill.sql.text import SCHEMA

# `pause`, `resume`, `set`: under the job's creation lock, so a first run that is creating the
# checkpoints either sees the pending overrides or has already created the rows they go to.
CONTROL_ROWS = f"""
SELECT shard, settings, control FROM {SCHEMA}.checkpoints WHERE job = $1 ORDER BY shard FOR UPDATE
"""
# The overrides set before a job's first run, locked.
CONTROL_PENDING = f"SELECT control FROM {SCHEMA}.controls WHERE job = $1 FOR UPDATE"
# Write a job's live overrides to each of its shards.
CONTROL_UPDATE = f"UPDATE {SCHEMA}.checkpoints SET control = $2 WHERE job = $1"
# Keep the overrides of a job that has no checkpoint yet.
CONTROL_SAVE_PENDING = f"""
INSERT INTO {SCHEMA}.controls (job, control) VALUES ($1, $2)
ON CONFLICT (job) DO UPDATE SET control = EXCLUDED.control, updated_at = now()
"""
# Drop a job's pending overrides once its checkpoints carry them.
CONTROL_FORGET_PENDING = f"DELETE FROM {SCHEMA}.controls WHERE job = $1"
# Jobs that have overrides but no checkpoint yet (never run), for `status`.
PENDING_CONTROLS = f"""
SELECT p.job, p.control, p.updated_at FROM {SCHEMA}.controls p
WHERE ($1::text IS NULL OR p.job = $1)
  AND NOT EXISTS (SELECT FROM {SCHEMA}.checkpoints c WHERE c.job = p.job)
ORDER BY p.job
"""
