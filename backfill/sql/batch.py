"""The batch statement: claim the checkpoint, take the next slice, change it, save the checkpoint.

Three pieces, each readable alone:

* ``Slice`` (``backfill.sql.slices``): which keys the next slice holds, between a start and an
  end, at most a size; with one integer key, a dense slice's end is computed;
* the shape's change (``backfill.sql.shapes``): one CTE, ``backfill_changed``, that changes the
  slice's rows (UPDATE, INSERT into the target, DELETE with an optional archive) and returns a
  row per row it counts;
* the claim and the save here, the same for every shape.
"""

from __future__ import annotations

from backfill.sql.shapes import UPDATE, Change
from backfill.sql.slices import Slice, param_slice
from backfill.sql.target import Target
from backfill.sql.text import SCHEMA, ident, literal

# A batch whose claim matched nothing fails with this in its message (a cast error, the one way
# plain SQL can raise; the sub-select keeps the planner from folding it early): so the rest of
# its group never runs, and ``pg.translate`` knows it.
MOVED = "backfill: the checkpoint moved"

# What the batches of the last group did, ``rows,microseconds`` each, space-separated: a
# setting of the session's own (a group's statements return nothing to the client).
RECENT = "backfill.recent"

# The batch statement's parameters, typed where they first appear so that PREPARE (the
# grouped form) and the driver's prepared statement agree: size, version, job, shard, and
# whether the batch starts a group.
BATCH_TYPES = ("int8", "int8", "text", "int4", "bool")


def claimed_slice(t: Target, *, first: bool) -> Slice:
    """The slice of a batch: from the claimed checkpoint row (``backfill_from``: typed start
    ``a1..n``, range end ``z1..n``), at most ``$1`` keys."""

    def claimed(prefix: str) -> str:
        cols = [f"(SELECT {prefix}{i} FROM backfill_from)" for i in range(1, len(t.key) + 1)]
        return f"({', '.join(cols)})" if len(t.key) > 1 else cols[0]

    return Slice(t, start=claimed("a"), end=claimed("z"), size="$1::int8", first=first)


def _claim(t: Target, *, first: bool, flush: bool) -> str:
    """The checkpoint row, locked, while its version has not passed ``$2`` (the swap). Unless
    ``flush``, reading it also sets ``synchronous_commit`` off for the batch's transaction
    (``set_config(..., true)``: ``SET LOCAL``), first, before anything is written."""
    unflushed = "" if flush else "set_config('synchronous_commit', 'off', true) AS unflushed, "
    typed = ", ".join(
        f"{'range_lo' if first else 'cursor'}[{i}]::{k.sql_type} AS a{i}, "
        f"range_hi[{i}]::{k.sql_type} AS z{i}"
        for i, k in enumerate(t.key, 1)
    )
    return f"""
    SELECT {typed}, dense, {unflushed}clock_timestamp() AS started FROM {SCHEMA}.checkpoints
    WHERE job = $3::text AND shard = $4::int4 AND batches <= $2::int8
      AND cursor IS {"" if first else "NOT "}NULL FOR UPDATE"""


def batch(t: Target, change: Change, *, first: bool, flush: bool = True) -> str:
    """One batch as one statement: claim, slice, change, checkpoint, in one transaction.

    ``change`` is the shape (``backfill.sql.shapes``); its CTEs, written over
    ``claimed_slice``, end in ``backfill_changed``, a row per row changed.

    Unless ``flush``, the statement sets ``synchronous_commit`` off for its own transaction
    (``set_config(..., true)``: ``SET LOCAL``, which the statement's implicit transaction, or a
    group's ``BEGIN ... COMMIT``, ends), so its commit does not wait for the WAL flush nor for
    synchronous standbys. A crash can then lose the last batches, but each with its checkpoint.

    The batch takes its start from the checkpoint row itself, which it claims ``FOR UPDATE``
    only while the row's version (``batches``, which every batch and skip moves with the
    cursor) has not passed ``$2``, the version this runner expects: a compare-and-swap. (In a
    group the i-th batch expects the group's first version plus i; it finds less only when
    batches before it found the range exhausted, and then it has nothing to do either.) A claim
    that matches nothing (another runner moved the checkpoint on, or it was reset) leaves the
    slice empty, so the statement writes nothing at all, data included, and then fails
    (``MOVED``). Needing no value from the client but the version, the same statement can run
    several times in one round trip (``group``).

    Parameters: $1 size, $2 version, $3 job, $4 shard, $5 whether it starts a group
    (``BATCH_TYPES``): it appends its rows and its duration (microseconds, measured by the
    server from its claim to its save) to the session's ``RECENT``, which the first of a group
    empties. Returns one row: ``cursor`` (the slice's last key, NULL when the range is
    exhausted), ``rows`` (rows the change reported), ``saved`` (1 when the checkpoint moved),
    ``control`` (live overrides, read for free), ``recorded`` and ``pid`` (the backend that
    ran it).
    """
    s = claimed_slice(t, first=first)
    # The change's rows are counted once (backfill_count), not once per reader.
    return f"""
WITH backfill_from AS ({_claim(t, first=first, flush=flush)}
), backfill_last AS ({s.last()}
), {change.cte(t, s)}, backfill_count AS (
    SELECT count(*) AS n FROM backfill_changed
), backfill_saved AS (
    UPDATE {SCHEMA}.checkpoints
    SET cursor = (SELECT {t.as_text()} FROM backfill_last),
        rows_updated = rows_updated + (SELECT n FROM backfill_count),
        batches = batches + 1, updated_at = clock_timestamp(),
        dense = {s.dense()}
    WHERE job = $3 AND shard = $4 AND EXISTS (SELECT FROM backfill_last)
    RETURNING control
)
SELECT CASE WHEN NOT EXISTS (SELECT FROM backfill_from)  -- the swap lost: fail, loudly
            THEN (SELECT '{MOVED} (expected version ' || $2::text || ')')::int4 END AS lost,
       (SELECT {t.as_text()} FROM backfill_last) AS cursor,
       (SELECT n FROM backfill_count) AS rows,
       (SELECT count(*) FROM backfill_saved) AS saved,
       (SELECT control FROM backfill_saved) AS control,
       {_record()} IS NOT NULL AS recorded,
       pg_backend_pid() AS pid"""


def _record() -> str:
    """Appends the batch's rows and duration to the session's ``RECENT`` (emptied first when
    ``$5``), once the save is done (it reads ``backfill_saved``): a session setting
    (``set_config(..., false)``) that the batch's commit keeps and its rollback undoes. Never
    the checkpoint's row: a record that grows with the group made every save rewrite it
    (~2-5 ms a batch at 600 entries, against ~0.1 ms for the rest of the save)."""
    mine = f"coalesce(current_setting('{RECENT}', true), '')"
    micros = (
        "(extract(epoch FROM clock_timestamp() - (SELECT started FROM backfill_from))"
        " * 1e6)::int8"
    )
    return f"""set_config('{RECENT}',
           CASE WHEN $5::bool THEN '' ELSE {mine} END
           || CASE WHEN EXISTS (SELECT FROM backfill_saved)
                   THEN (SELECT n FROM backfill_count) || ',' || {micros} || ' ' ELSE '' END,
           false)"""


def prepare(name: str, statement: str) -> str:
    """``PREPARE`` a batch statement under ``name``, for ``group``."""
    return f"PREPARE {name} ({', '.join(BATCH_TYPES)}) AS {statement}"


def group(name: str, *, size: int, version: int, count: int, job: str, shard: int) -> str:
    """``count`` batches of the prepared statement ``name`` in one simple-query string, each in
    its own transaction, the i-th expecting version ``version + i``. The server runs them one
    after the other and stops at the first error (the committed ones stay, the failed one
    rolls back, the rest never run); since PostgreSQL 13 each gets its own statement_timeout.
    Only integers the runner made and the job's name (a validated identifier) are inlined."""
    tail = f"{literal(job)}, {int(shard)}"
    # The record emptied first, in a transaction of its own (explicitly: a statement before
    # the first BEGIN would join the first batch's transaction), so that a first batch that
    # rolls back (a lost swap) cannot leave the group before's entries in it.
    return f"BEGIN; SELECT set_config('{RECENT}', '', false); COMMIT; " + "".join(
        f"BEGIN; EXECUTE {name}({int(size)}, {int(version) + i}, {tail}, {str(i == 0).lower()}); "
        "COMMIT; "
        for i in range(count)
    )


# After a group: where the checkpoint stands (its truth), and which backend answered.
AFTER_GROUP = f"""
SELECT cursor, rows_updated, batches, control, current_setting('{RECENT}', true) AS recent,
       pg_backend_pid() AS pid
FROM {SCHEMA}.checkpoints WHERE job = $1 AND shard = $2
"""


def count_slice(t: Target, change: Change, *, first: bool) -> str:
    """The rows of one slice still to do (``Change.left``), and the slice's last key (for
    ``verify``; parameters as ``param_slice``)."""
    s = param_slice(t, first=first)
    return f"""
WITH backfill_last AS ({s.last()}
)
SELECT (SELECT {t.as_text()} FROM backfill_last) AS cursor, ({change.left(t, s)}) AS rows"""


def fragment_checks(t: Target, change: Change, values: dict[str, str]) -> dict[str, str]:
    """The job's SQL fragments each in a statement of its own, to prepare (never run) before
    anything is written, so that a problem is reported against the right job-file field."""
    checks = {"where": f"SELECT FROM {t.relation} WHERE ({change.where}\n)"}
    if change.kind == UPDATE:
        checks["set"] = f"UPDATE {t.relation} SET {change.set_}\nWHERE false"
    for column, expression in values.items():  # as the target's column takes it
        checks[f"copy.values.{column}"] = (
            f"INSERT INTO {change.into} ({ident(column)})\n"
            f"SELECT ({expression}\n) FROM {t.relation} WHERE false"
        )
    return checks
