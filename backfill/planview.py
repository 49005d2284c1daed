"""What ``backfill plan`` prints: the job, its key range and where a run resumes, the planner's
row estimates, the batches and their duration from one batch measured and rolled back, the
warnings, then the batch statement and its EXPLAIN ANALYZE."""

from __future__ import annotations

from backfill.checkpoint import show_key
from backfill.commands import Plan
from backfill.job import Job
from backfill.progress import human_seconds


def view(plan: Plan, job: Job) -> str:
    """The plan as text for people, one ``label  value`` line per fact."""
    lines = [
        f"job       {plan.job}",
        f"table     {plan.table}",
        f"key       {plan.key}",
        f"range     {show_key(plan.range_lo)} .. {show_key(plan.range_hi)}",
    ]
    if plan.cursor is not None:
        lines.append(f"resumes   after {show_key(plan.cursor)}")
    lines += [
        f"rows      ~{plan.rows_in_table:,} in table, "
        f"~{plan.rows_matching:,} matching where (planner estimates)",
        f"batches   ~{plan.batches:,} of {job.batch.size}",
        *(f"warning   {warning}" for warning in plan.warnings),
        f"duration  ~{human_seconds(plan.estimated_seconds)} "
        f"(one batch took {plan.batch_seconds * 1000:.1f} ms, measured and rolled back, "
        f"plus {job.batch.sleep_seconds}s sleep)",
        "",
        "batch statement:",
        plan.statement,
        "",
        "EXPLAIN ANALYZE of one batch (rolled back):",
        plan.explain,
    ]
    if plan.sync:
        lines += ["", "sync trigger (the first run installs it with the key range):", plan.sync]
    return "\n".join(lines)
