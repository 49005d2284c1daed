"""What the runner asks the catalog, and the statements that measure a table and its keys."""

from __future__ import annotations

from backfill.sql.target import Target

# A table's oid and kind, by schema and name.
RELATION = """
SELECT c.oid::int8 AS oid, c.relkind::text AS relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2
"""


def _privileges(oid: str) -> str:
    """What the current role may do on the table ``oid`` (any column for SELECT and UPDATE)."""
    return f"""
SELECT has_any_column_privilege({oid}, 'UPDATE') AS can_update,
       has_any_column_privilege({oid}, 'SELECT') AS can_select,
       has_table_privilege({oid}, 'INSERT') AS can_insert,
       has_table_privilege({oid}, 'DELETE') AS can_delete, current_user::text AS role"""


PRIVILEGES = _privileges("$1::oid")
# A job's table ($1 schema, $2 name) and key ($3, its column names in order), checked in one
# round trip: the relation's oid and kind (no row when there is none); the key's columns that
# exist, in the key's order, each with its type as printed, type name, NOT NULL and number;
# whether a valid, non-partial unique btree index is on exactly these columns, in this order;
# and what the current role may do on the table.
RESOLVE = f"""
SELECT r.oid, r.relkind, k.names, k.sql_types, k.type_names, k.not_null,
       EXISTS (
           SELECT FROM pg_index i
           JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
           WHERE i.indrelid = r.oid::oid AND i.indisunique AND i.indisvalid
             AND i.indpred IS NULL AND i.indexprs IS NULL AND am.amname = 'btree'
             AND i.indnkeyatts = cardinality(k.attnums)
             AND (string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(k.attnums)]
                 = k.attnums
       ) AS key_unique,
       p.*
FROM ({RELATION}) r
CROSS JOIN LATERAL (
    SELECT array_agg(a.attname::text ORDER BY n.i) AS names,
           array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY n.i) AS sql_types,
           array_agg(t.typname::text ORDER BY n.i) AS type_names,
           array_agg(a.attnotnull ORDER BY n.i) AS not_null,
           array_agg(a.attnum ORDER BY n.i)::int2[] AS attnums
    FROM unnest($3::text[]) WITH ORDINALITY n(name, i)
    JOIN pg_attribute a ON a.attrelid = r.oid::oid AND a.attname = n.name AND a.attnum > 0
                           AND NOT a.attisdropped
    JOIN pg_type t ON t.oid = a.atttypid
) k
CROSS JOIN LATERAL ({_privileges("r.oid::oid")}) p
"""
# Every column of a table, in order: what a copy or an archive may write.
ALL_COLUMNS = """
SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS sql_type,
       a.atttypid::int8 AS type_oid, a.attgenerated <> '' AS generated,
       a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AS needs_value
FROM pg_attribute a
WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum
"""
# Whether a value of type $1 is assigned to a column of type $2 without a possible loss: the
# same type, or an implicit cast (a widening such as integer to bigint).
WIDENS = """
SELECT $1::oid = $2::oid OR EXISTS (
    SELECT FROM pg_cast WHERE castsource = $1::oid AND casttarget = $2::oid AND castcontext = 'i')
"""
# Foreign keys that reference table $1 with no index leading with their columns on the
# referencing side: each deleted row makes the server scan the referencing table.
UNINDEXED_REFERENCES = """
SELECT c.conname::text AS name,
       (SELECT n.nspname || '.' || r.relname FROM pg_class r
        JOIN pg_namespace n ON n.oid = r.relnamespace WHERE r.oid = c.conrelid) AS referencing,
       (SELECT string_agg(a.attname, ', ' ORDER BY k.i)
        FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n) AS columns
FROM pg_constraint c
WHERE c.contype = 'f' AND c.confrelid = $1::oid AND NOT EXISTS (
    SELECT FROM pg_index i WHERE i.indrelid = c.conrelid AND i.indpred IS NULL
      AND (string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(c.conkey)] @> c.conkey
      AND cardinality(c.conkey) <= i.indnkeyatts)
ORDER BY 2, 1
"""


def lowest(t: Target) -> str:
    return f"SELECT {t.as_text()} FROM {t.relation} ORDER BY {t.order()} LIMIT 1"


def highest(t: Target) -> str:
    return f"SELECT {t.as_text()} FROM {t.relation} ORDER BY {t.order('DESC')} LIMIT 1"


def key_bounds(t: Target) -> str:
    """The lowest and highest key in one statement (``lo``, ``hi``: NULL for an empty table)."""
    return f"SELECT ({lowest(t)}) AS lo, ({highest(t)}) AS hi"


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


# The planner's row estimate of a table (0 before its first ANALYZE).
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

# The columns of each valid, non-partial unique btree index of a table: the one on the fewest
# columns first, a primary key before others.
UNIQUE_INDEXES = """
SELECT array_agg(a.attname::text ORDER BY k.i) AS columns
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
CROSS JOIN LATERAL unnest(string_to_array(i.indkey::text, ' ')::int2[]) WITH ORDINALITY k(n, i)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
WHERE i.indrelid = $1::oid AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
  AND i.indexprs IS NULL AND am.amname = 'btree' AND k.i <= i.indnkeyatts
GROUP BY i.indexrelid, i.indisprimary
ORDER BY count(*), i.indisprimary DESC, i.indexrelid
"""
