"""The batch: the slice it takes, the statement that changes and checkpoints it, groups of
batches, and the statements that look at a slice without changing it (plan, verify)."""

from __future__ import annotations

from backfill.sql.target import Target
from backfill.sql.text import SCHEMA, ident, literal


def _after(t: Target, *, first: bool) -> str:
    """The slice's lower bound: ``>= $1`` for a run's first batch, ``> $1`` after that."""
    return f"{t.row()} {'>=' if first else '>'} {t.param_row(1)}"


def slice_end(t: Target, *, lower: str, upper: str, size: str) -> str:
    """The last key of the next slice: at most ``size`` keys that satisfy the condition
    ``lower``, none beyond the key ``upper`` (an index range scan: never OFFSET)."""
    return f"""
        SELECT {t.columns()} FROM (
            SELECT {t.columns()} FROM {t.relation}
            WHERE {lower} AND {t.row()} <= {upper}
            ORDER BY {t.order()} LIMIT {size}
        ) backfill_slice ORDER BY {t.order("DESC")} LIMIT 1"""


def _next_slice(t: Target, *, first: bool) -> str:
    """``slice_end`` in parameters: at most $3 keys after $1, none beyond $2."""
    return slice_end(t, lower=_after(t, first=first), upper=t.param_row(2), size="$3")


INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})


def spannable(t: Target) -> bool:
    """Whether the slice end can be computed instead of read (one integer key column)."""
    return len(t.key) == 1 and t.key[0].sql_type in INTEGER_TYPES


def _upto_last(t: Target) -> str:
    ends = ", ".join(f"(SELECT {ident(k.name)} FROM backfill_last)" for k in t.key)
    return f"{t.row()} <= ({ends})" if len(t.key) > 1 else f"{t.row()} <= {ends}"


def _claimed(t: Target, prefix: str) -> str:
    """The key the claimed checkpoint row holds, from its typed columns ``prefix1..n`` (the
    start, ``a``, or the range's end, ``z``)."""
    cols = [f"(SELECT {prefix}{i} FROM backfill_from)" for i in range(1, len(t.key) + 1)]
    return f"({', '.join(cols)})" if len(t.key) > 1 else cols[0]


# A batch whose claim matched nothing fails with this in its message (a cast error, the one way
# plain SQL can raise; the sub-select keeps the planner from folding it early): so the rest of
# its group never runs, and ``pg.translate`` knows it.
MOVED = "backfill: the checkpoint moved"

# The batch statement's parameters, typed where they first appear so that PREPARE (the
# grouped form) and the driver's prepared statement agree: size, version, job, shard, and
# whether the batch starts a group.
BATCH_TYPES = ("int8", "int8", "text", "int4", "bool")


def batch(t: Target, *, set_: str, where: str, first: bool, flush: bool = True) -> str:
    """One batch as one statement: claim, slice, UPDATE, checkpoint, in one transaction.

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
    (``MOVED``). Needing no value from the client
    but the version, the same statement can run several times in one round trip (``group``).

    Parameters: $1 size, $2 version, $3 job, $4 shard, $5 whether it starts a group
    (``BATCH_TYPES``): it appends its rows, its duration (microseconds, measured by the server
    from its claim to its save) and its backend's pid to the checkpoint's ``recent``, which the
    first of a group empties. Returns one row: ``cursor`` (the slice's last key, NULL when the
    range is exhausted), ``rows`` (rows the UPDATE reported), ``saved`` (1 when the checkpoint
    moved),
    ``control`` (live overrides, read for free) and ``pid`` (the backend that ran it). The
    first batch of a range starts at its lowest key (``>=``), later ones after the cursor.

    With one integer key, the statement decides for itself, from the checkpoint's ``dense``,
    how the slice ends: after a dense slice ``$1`` key values after the cursor (computed,
    sparing the index-only scan whose cost grows with the size), else after ``$1`` keys
    (``slice_end``); a computed slice is dense when all its rows matched, a read one when it
    is ``$1`` values wide. The end not chosen is never run (a one-time filter).
    """
    lower = f"{t.row()} {'>=' if first else '>'} {_claimed(t, 'a')}"
    end = slice_end(t, lower=lower, upper=_claimed(t, "z"), size="$1::int8")
    typed = ", ".join(
        f"{'range_lo' if first else 'cursor'}[{i}]::{k.sql_type} AS a{i}, "
        f"range_hi[{i}]::{k.sql_type} AS z{i}"
        for i, k in enumerate(t.key, 1)
    )
    dense = ""
    if spannable(t):
        key = ident(t.key[0].name)
        width = f"(SELECT {key} FROM backfill_last)::numeric - (SELECT a1 FROM backfill_from)"
        if first:  # the first slice includes its start
            dense = f"\n        dense = {width} = $1::int8 - 1,"
        else:
            # Unique integers in a span of $1 values are at most $1 keys: work stays bounded
            # by the size without reading the index; on gaps the slice just holds fewer keys.
            end = f"""
        SELECT least(a1::numeric + $1::int8, z1)::{t.key[0].sql_type} AS {key}
        FROM backfill_from WHERE dense AND a1 < z1
        UNION ALL
        SELECT {key} FROM ({end}) backfill_read WHERE NOT (SELECT dense FROM backfill_from)"""
            dense = f"""
        dense = CASE WHEN (SELECT dense FROM backfill_from)
                THEN (SELECT n FROM backfill_count) = $1::int8 ELSE {width} = $1::int8 END,"""
    # Set as the claim is read, first, so that it is in force before anything is written.
    unflushed = "" if flush else "set_config('synchronous_commit', 'off', true) AS unflushed, "
    # The UPDATE's rows are counted once (backfill_count), not once per reader.
    return f"""
WITH backfill_from AS (
    SELECT {typed}, dense, {unflushed}clock_timestamp() AS started FROM {SCHEMA}.checkpoints
    WHERE job = $3::text AND shard = $4::int4 AND batches <= $2::int8
      AND cursor IS {"" if first else "NOT "}NULL FOR UPDATE
), backfill_last AS ({end}
), backfill_changed AS (
    UPDATE {t.relation} SET {set_}
    WHERE {lower} AND {_upto_last(t)} AND ({where})
    RETURNING 1
), backfill_count AS (
    SELECT count(*) AS n FROM backfill_changed
), backfill_saved AS (
    UPDATE {SCHEMA}.checkpoints
    SET cursor = (SELECT {t.as_text()} FROM backfill_last),
        rows_updated = rows_updated + (SELECT n FROM backfill_count),
        batches = batches + 1, updated_at = clock_timestamp(),{dense}
        recent = CASE WHEN $5::bool THEN '{{}}' ELSE coalesce(recent, '{{}}') END || ARRAY[
            (SELECT n FROM backfill_count),
            (extract(epoch FROM clock_timestamp() - (SELECT started FROM backfill_from))
             * 1e6)::int8,
            pg_backend_pid()]
    WHERE job = $3 AND shard = $4 AND EXISTS (SELECT FROM backfill_last)
    RETURNING control
)
SELECT CASE WHEN NOT EXISTS (SELECT FROM backfill_from)  -- the swap lost: fail, loudly
            THEN (SELECT '{MOVED} (expected version ' || $2::text || ')')::int4 END AS lost,
       (SELECT {t.as_text()} FROM backfill_last) AS cursor,
       (SELECT n FROM backfill_count) AS rows,
       (SELECT count(*) FROM backfill_saved) AS saved,
       (SELECT control FROM backfill_saved) AS control,
       pg_backend_pid() AS pid"""


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
    return "".join(
        f"BEGIN; EXECUTE {name}({int(size)}, {int(version) + i}, {tail}, {str(i == 0).lower()}); "
        "COMMIT; "
        for i in range(count)
    )


# After a group: where the checkpoint stands (its truth), and which backend answered.
AFTER_GROUP = f"""
SELECT cursor, rows_updated, batches, control, recent, pg_backend_pid() AS pid
FROM {SCHEMA}.checkpoints WHERE job = $1 AND shard = $2
"""


def fragment_checks(t: Target, *, set_: str, where: str) -> dict[str, str]:
    """``set`` and ``where`` each in a statement of its own, to prepare (never run) before
    anything is written, so that a problem is reported against the right job-file field."""
    return {
        "set": f"UPDATE {t.relation} SET {set_}\nWHERE false",
        "where": f"SELECT FROM {t.relation} WHERE ({where}\n)",
    }


def dry_batch(t: Target, *, set_: str, where: str, first: bool) -> str:
    """The batch's UPDATE alone, for EXPLAIN in ``plan`` (same parameters, $4/$5 unused)."""
    return f"""
WITH backfill_last AS ({_next_slice(t, first=first)}
)
UPDATE {t.relation} SET {set_}
WHERE {_after(t, first=first)} AND {_upto_last(t)} AND ({where})
  AND $4::text IS NOT NULL AND $5::int IS NOT NULL"""


def count_slice(t: Target, *, where: str, first: bool) -> str:
    """Rows still matching ``where`` in one slice, and the slice's last key (for ``verify``)."""
    return f"""
WITH backfill_last AS ({_next_slice(t, first=first)}
)
SELECT (SELECT {t.as_text()} FROM backfill_last) AS cursor,
       (SELECT count(*) FROM {t.relation}
        WHERE {_after(t, first=first)} AND {_upto_last(t)} AND ({where})) AS rows"""


def key_of_next_row(t: Target, *, first: bool) -> str:
    """The key of the single row after $1 (used to name a poison row)."""
    return (
        f"SELECT {t.as_text()} FROM {t.relation} WHERE {_after(t, first=first)} "
        f"AND {t.row()} <= {t.param_row(2)} ORDER BY {t.order()} LIMIT 1"
    )
