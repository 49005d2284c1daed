"""The names of the settings ``backfill set`` can change while a job runs.

Apart from ``control`` (which validates them), so that the CLI can list them in its help
without importing pydantic.
"""

from __future__ import annotations

LIVE_KEYS = (
    "batch.size",
    "batch.max_size",
    "batch.target_seconds",
    "batch.sleep_seconds",
    "batch.sleep_ratio",
    "limits.max_rows_per_second",
    "throttle.check_every",
    "throttle.max_replication_lag",
    "throttle.max_slot_lag_bytes",
    "throttle.max_active_sessions",
    "throttle.on_check_error",
    "throttle.max_impact",
    "throttle.max_tail_impact",
)
