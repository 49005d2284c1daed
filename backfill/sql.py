"""Every SQL statement the runner sends, built in one place.

Identifiers go through ``ident``; values are always ``$n`` parameters. Key values travel as
``text[]`` and are cast back to the key's type on the server, so any key type whose text form
round-trips (integers, numeric, uuid, text, timestamps, dates) works without client-side codecs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEMA = "backfill"


def ident(name: str) -> str:
    """Quote one identifier."""
    return '"' + name.replace('"', '""') + '"'


_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def fragment_problem(text: str) -> str | None:
    """Why a ``set``/``where`` fragment could break out of its place in a statement, or None.

    A fragment is pasted into the batch statement; if it closed a parenthesis it did not open,
    or left a quote or comment open for the text after it, it could swallow the batch's own
    key range (an UPDATE of the whole table). So: parentheses balanced, every string, quoted
    identifier and ``/* */`` comment closed, no ``--`` comment (it would run to the end of the
    statement's line), no ``;``. Lexical only; the server checks the rest.
    """
    depth, i, n = 0, 0, len(text)
    while i < n:
        c, pair = text[i], text[i : i + 2]
        if c in "'\"":  # 'string', E'string' (backslash escapes), "identifier"; doubled quotes
            backslash = c == "'" and i > 0 and text[i - 1] in "eE" and (
                i < 2 or not (text[i - 2].isalnum() or text[i - 2] == "_"))
            i += 1
            while (i < n and text[i] != c) or text[i : i + 2] == c * 2:
                i += 2 if text[i] == c or (backslash and text[i] == "\\") else 1
            if i >= n:
                return "has an unterminated quote"
        elif c == "$" and (m := _DOLLAR.match(text, i)) and not (i and text[i - 1].isalnum()):
            end = text.find(m.group(0), m.end())
            if end < 0:
                return "has an unterminated dollar-quoted string"
            i = end + len(m.group(0)) - 1
        elif pair == "/*":
            nested, i = 1, i + 2
            while i < n and nested:
                nested += {"/*": 1, "*/": -1}.get(text[i : i + 2], 0)
                i += 2 if text[i : i + 2] in ("/*", "*/") else 1
            if nested:
                return "has an unterminated /* comment"
            continue
        elif pair == "*/":
            return "closes a comment it did not open"
        elif pair == "--":
            return "must not contain a -- comment (use /* */)"
        elif c == ";":
            return "must be a single SQL expression without ';'"
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return "closes a parenthesis it did not open"
        i += 1
    return "has an unclosed parenthesis" if depth else None


@dataclass(frozen=True, slots=True)
class KeyColumn:
    name: str
    sql_type: str  # as format_type() prints it, e.g. "bigint", "character varying(20)"


@dataclass(frozen=True, slots=True)
class Target:
    """The resolved table and key a job works on."""

    schema: str
    table: str
    key: tuple[KeyColumn, ...]

    @property
    def relation(self) -> str:
        return f"{ident(self.schema)}.{ident(self.table)}"

    def columns(self, prefix: str = "") -> str:
        return ", ".join(prefix + ident(k.name) for k in self.key)

    def row(self, prefix: str = "") -> str:
        cols = self.columns(prefix)
        return f"({cols})" if len(self.key) > 1 else cols

    def param_row(self, n: int) -> str:
        """The key value in text[] parameter ``$n``, cast back to the key's types."""
        casts = ", ".join(f"(${n}::text[])[{i}]::{k.sql_type}" for i, k in enumerate(self.key, 1))
        return f"({casts})" if len(self.key) > 1 else casts

    def as_text(self, prefix: str = "") -> str:
        return "ARRAY[" + ", ".join(f"{prefix}{ident(k.name)}::text" for k in self.key) + "]"

    def order(self, direction: str = "") -> str:
        return ", ".join(f"{ident(k.name)} {direction}".rstrip() for k in self.key)


# --- state schema -------------------------------------------------------------------------------

INIT = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
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

STATE_EXISTS = f"SELECT to_regclass('{SCHEMA}.checkpoints') IS NOT NULL"
# Everything a later version added to INIT is there (else `backfill init` upgrades it).
STATE_CURRENT = f"""
SELECT to_regclass('{SCHEMA}.controls') IS NOT NULL
   AND to_regclass('{SCHEMA}.canaries') IS NOT NULL
   AND (SELECT count(*) FROM pg_attribute WHERE attrelid = '{SCHEMA}.checkpoints'::regclass
        AND attname IN ('settings', 'recent', 'dense') AND NOT attisdropped) = 3
"""

# An advisory lock per (job, shard); session-level, so it dies with the runner's connection.
TRY_LOCK = """
SELECT pg_try_advisory_lock(hashtext('backfill:' || $1), $2) AS locked, pg_backend_pid() AS pid
"""
BACKEND_PID = "SELECT pg_backend_pid()"
UNLOCK = "SELECT pg_advisory_unlock(hashtext('backfill:' || $1), $2)"
LOCK_HOLDER = """
SELECT a.pid, a.application_name, host(a.client_addr) AS client, a.backend_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid = hashtext('backfill:' || $1)::oid AND l.objid = $2::oid
"""

LOCK_CREATING = "SELECT pg_advisory_xact_lock(hashtext('backfill:' || $1), $2)"
SHARD_COUNT = f"SELECT max(shards) FROM {SCHEMA}.checkpoints WHERE job = $1"
TABLE_SIZE = """
SELECT c.reltuples::float8, c.relpages::float8
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2
"""
LOAD = f"SELECT * FROM {SCHEMA}.checkpoints WHERE job = $1 AND shard = $2"
LOAD_ALL = f"""
SELECT * FROM {SCHEMA}.checkpoints WHERE $1::text IS NULL OR job = $1 ORDER BY job, shard
"""
CREATE = f"""
INSERT INTO {SCHEMA}.checkpoints
    (job, shard, shards, fingerprint, target, state, range_lo, range_hi, cursor, control)
VALUES ($1, $2, $3, $4, $5, 'running', $6, $7, $8,
        coalesce((SELECT control FROM {SCHEMA}.controls WHERE job = $1), '{{}}'))
ON CONFLICT DO NOTHING
"""
START = f"""
UPDATE {SCHEMA}.checkpoints
SET state = CASE WHEN state = 'succeeded' THEN state ELSE 'running' END,
    holder = $3, error = NULL, started_at = coalesce(started_at, now()), updated_at = now()
WHERE job = $1 AND shard = $2
"""
FINISH = f"""
UPDATE {SCHEMA}.checkpoints
SET state = $3, error = $4, updated_at = now(),
    finished_at = CASE WHEN $3 = 'succeeded' THEN now() ELSE finished_at END
WHERE job = $1 AND shard = $2
"""
RESET = f"""
WITH forgotten AS (DELETE FROM {SCHEMA}.controls WHERE job = $1)
DELETE FROM {SCHEMA}.checkpoints WHERE job = $1
"""

# Runs: a row per execution. A run killed without a goodbye is closed by the next one from the
# checkpoint's counters, so the audit trail stays exact without a write per batch.
CLOSE_ABANDONED = f"""
UPDATE {SCHEMA}.runs r
SET outcome = 'killed', ended_at = c.updated_at,
    rows_updated = c.rows_updated - r.rows_at_start, batches = c.batches - r.batches_at_start
FROM {SCHEMA}.checkpoints c
WHERE r.job = $1 AND r.shard = $2 AND r.outcome = 'running' AND c.job = r.job AND c.shard = r.shard
"""
OPEN_RUN = f"""
INSERT INTO {SCHEMA}.runs
    (job, shard, fingerprint, version, host, rows_at_start, batches_at_start, cursor_at_start)
SELECT $1, $2, $3, $4, $5, rows_updated, batches, cursor FROM {SCHEMA}.checkpoints
WHERE job = $1 AND shard = $2
RETURNING id
"""
# A runner that reconnects keeps its run: one row per run, not per connection.
RUN_OPEN = f"SELECT id FROM {SCHEMA}.runs WHERE id = $1 AND outcome = 'running'"
CLOSE_RUN = f"""
UPDATE {SCHEMA}.runs r
SET outcome = $2, ended_at = now(), error = $3,
    rows_updated = c.rows_updated - r.rows_at_start, batches = c.batches - r.batches_at_start
FROM {SCHEMA}.checkpoints c
WHERE r.id = $1 AND c.job = r.job AND c.shard = r.shard
"""
HISTORY = f"""
SELECT * FROM {SCHEMA}.runs WHERE job = $1 ORDER BY id DESC LIMIT $2
"""
# Each shard's latest run, for the rate and ETA in `status`.
LATEST_RUNS = f"""
SELECT DISTINCT ON (job, shard) * FROM {SCHEMA}.runs
WHERE $1::text IS NULL OR job = $1 ORDER BY job, shard, id DESC
"""
NOW = "SELECT clock_timestamp()"
SKIP = f"""
UPDATE {SCHEMA}.checkpoints
SET cursor = $3, rows_skipped = rows_skipped + 1, batches = batches + 1,
    skipped_keys = skipped_keys || jsonb_build_array(to_jsonb($3::text[])),
    updated_at = clock_timestamp()
WHERE job = $1 AND shard = $2
RETURNING control
"""

# --- catalog ------------------------------------------------------------------------------------

RELATION = """
SELECT c.oid::int8 AS oid, c.relkind::text AS relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2
"""
COLUMNS = """
SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS sql_type,
       t.typname::text AS type_name, a.attnotnull AS not_null, a.attnum::int AS attnum
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = $1::oid AND a.attname = ANY($2::text[]) AND a.attnum > 0 AND NOT a.attisdropped
"""
# A valid, non-partial unique btree index on exactly the key columns, in the key's order.
UNIQUE_INDEX = """
SELECT 1 FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
WHERE i.indrelid = $1::oid AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
  AND i.indexprs IS NULL AND am.amname = 'btree' AND i.indnkeyatts = cardinality($2::int2[])
  AND (string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality($2::int2[])] = $2::int2[]
LIMIT 1
"""
PRIVILEGES = """
SELECT has_any_column_privilege($1::oid, 'UPDATE') AS can_update,
       has_any_column_privilege($1::oid, 'SELECT') AS can_select, current_user::text AS role
"""


def lowest(t: Target) -> str:
    return f"SELECT {t.as_text()} FROM {t.relation} ORDER BY {t.order()} LIMIT 1"


def highest(t: Target) -> str:
    return f"SELECT {t.as_text()} FROM {t.relation} ORDER BY {t.order('DESC')} LIMIT 1"


def quantiles(t: Target) -> str:
    """The keys that cut a page sample of $1 percent of [$2, $3] into $4 parts of equal row
    count: $4 - 1 keys in key order (fewer when the sample is smaller). The sample is sorted on
    the server; only the cuts travel."""
    return f"""
SELECT keys FROM (
    SELECT {t.as_text()} AS keys, row_number() OVER (ORDER BY {t.order()}) AS rn,
           count(*) OVER () AS n
    FROM {t.relation} TABLESAMPLE SYSTEM ($1::float4)
    WHERE {t.row()} >= {t.param_row(2)} AND {t.row()} <= {t.param_row(3)}
) s
WHERE rn IN (SELECT 1 + (s.n * i) / $4::int FROM generate_series(1, $4::int - 1) i)
ORDER BY rn"""


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
        ) backfill_slice ORDER BY {t.order('DESC')} LIMIT 1"""


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


def batch(t: Target, *, set_: str, where: str, first: bool) -> str:
    """One batch as one statement: claim, slice, UPDATE, checkpoint, in one transaction.

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
    # The UPDATE's rows are counted once (backfill_count), not once per reader.
    return f"""
WITH backfill_from AS (
    SELECT {typed}, dense, clock_timestamp() AS started FROM {SCHEMA}.checkpoints
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


def literal(value: str) -> str:
    """Quote one string literal (for ``EXECUTE`` in a group, where no parameters exist)."""
    return "'" + value.replace("'", "''") + "'"


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


ESTIMATED_ROWS = "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = $1::oid"

# Pages of a table (all partitions of a partitioned one), to size a page sample.
TABLE_PAGES = """
SELECT coalesce(sum(pg_relation_size(relid)), 0)::int8 / current_setting('block_size')::int8
FROM pg_partition_tree($1::oid::regclass)
"""


def sample_counts(t: Target) -> str:
    """Keys in a page sample of $1 percent that lie in the range [$2, $3] (all keys when $2 is
    NULL), those of them at or below the cursor $4 (none when NULL), and the pages sampled.
    Comparisons run on the server, in the key's type and collation, so they agree with the order
    batches follow."""
    row, lo, hi, cursor = t.row(), t.param_row(2), t.param_row(3), t.param_row(4)
    return f"""
SELECT count(*) FILTER (WHERE $2::text[] IS NULL OR ({row} >= {lo} AND {row} <= {hi})) AS in_range,
       count(*) FILTER (WHERE $4::text[] IS NOT NULL AND {row} >= {lo} AND {row} <= {cursor})
           AS done,
       count(DISTINCT (tableoid, (ctid::text::point)[0])) AS pages
FROM {t.relation} TABLESAMPLE SYSTEM ($1::float4)"""


def explain(statement: str, *, analyze: bool = False) -> str:
    return f"EXPLAIN (ANALYZE {str(analyze).upper()}, COSTS TRUE) {statement}"


# --- live control and health gates --------------------------------------------------------------

SAVE_SETTINGS = f"UPDATE {SCHEMA}.checkpoints SET settings = $3 WHERE job = $1 AND shard = $2"
# `pause`, `resume`, `set`: under the job's creation lock, so a first run that is creating the
# checkpoints either sees the pending overrides or has already created the rows they go to.
CONTROL_ROWS = f"""
SELECT shard, settings, control FROM {SCHEMA}.checkpoints WHERE job = $1 ORDER BY shard FOR UPDATE
"""
CONTROL_PENDING = f"SELECT control FROM {SCHEMA}.controls WHERE job = $1 FOR UPDATE"
CONTROL_UPDATE = f"UPDATE {SCHEMA}.checkpoints SET control = $2 WHERE job = $1"
CONTROL_SAVE_PENDING = f"""
INSERT INTO {SCHEMA}.controls (job, control) VALUES ($1, $2)
ON CONFLICT (job) DO UPDATE SET control = EXCLUDED.control, updated_at = now()
"""
CONTROL_FORGET_PENDING = f"DELETE FROM {SCHEMA}.controls WHERE job = $1"
# Jobs that have overrides but no checkpoint yet (never run), for `status`.
PENDING_CONTROLS = f"""
SELECT p.job, p.control, p.updated_at FROM {SCHEMA}.controls p
WHERE ($1::text IS NULL OR p.job = $1)
  AND NOT EXISTS (SELECT FROM {SCHEMA}.checkpoints c WHERE c.job = p.job)
ORDER BY p.job
"""
# The probe connection: the shard's overrides while no batch runs, and its visible state.
CONTROL = f"SELECT control FROM {SCHEMA}.checkpoints WHERE job = $1 AND shard = $2"
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
# The canary: a tiny read and a tiny committed write of the shard's own row, which also keeps
# what the impact budget measured last (NULLs until it has), for `status`.
CANARY_READ = f"SELECT beats FROM {SCHEMA}.canaries WHERE job = $1 AND shard = $2"
CANARY_WRITE = f"""
INSERT INTO {SCHEMA}.canaries AS c
    (job, shard, beats, ratio, budget, duty, current_s, baseline_s, deciding)
VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8)
ON CONFLICT (job, shard) DO UPDATE
SET beats = c.beats + 1, ratio = $3, budget = $4, duty = $5, current_s = $6, baseline_s = $7,
    deciding = $8, at = now()
"""
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
STATEMENTS = """
SELECT queryid, sum(calls)::int8 AS calls, sum(total_exec_time)::float8 AS ms,
       sum(calls * (stddev_exec_time ^ 2 + mean_exec_time ^ 2))::float8 AS squares,
       sum(count(*) FILTER (WHERE queryid IS NULL)) OVER () AS hidden
FROM pg_stat_statements(false)
WHERE toplevel AND (queryid IS NULL OR queryid <> ALL($1::int8[]))
GROUP BY queryid
"""
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
