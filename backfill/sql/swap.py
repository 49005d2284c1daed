"""What the cut-over (and its reverse) asks the catalog, and the statements of the swap.

Table arguments are oids (``$1::oid``); names built into statements go through ``ident``.
"""

from __future__ import annotations

from backfill.sql.text import ident

# Objects that depend on table $1 and would keep pointing at it after a rename (views,
# materialized views, SQL-standard function bodies), and publications that list it, each as
# "kind name".
DEPENDENTS = """
SELECT DISTINCT CASE v.relkind WHEN 'm' THEN 'materialized view ' ELSE 'view ' END
       || format('%I.%I', n.nspname, v.relname) AS what
FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
JOIN pg_namespace n ON n.oid = v.relnamespace
WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = $1::oid AND v.oid <> $1::oid
UNION
SELECT 'function ' || d.objid::regprocedure::text
FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.refobjid = $1::oid
UNION
SELECT 'publication ' || p.pubname::text
FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid WHERE pr.prrelid = $1::oid
ORDER BY 1
"""
# Foreign keys that reference table $1 ($2: the table that takes its name), each with its
# definition (names schema-qualified), whether $2 has a unique index on exactly the referenced
# columns, and whether the current role owns the referencing table.
REFERENCES = """
SELECT c.conname::text AS name, c.conrelid::regclass::text AS referencing,
       c.conrelid = c.confrelid AS self,
       pg_get_constraintdef(c.oid) AS definition,
       pg_has_role(r.relowner, 'USAGE') AS owns,
       EXISTS (
           SELECT FROM pg_index i WHERE i.indrelid = $2::oid AND i.indisunique
             AND i.indpred IS NULL AND i.indexprs IS NULL
             AND (SELECT array_agg(a.attname ORDER BY a.attname) FROM pg_attribute a
                  WHERE a.attrelid = $2::oid AND a.attnum = ANY (i.indkey))
               = (SELECT array_agg(a.attname ORDER BY a.attname) FROM pg_attribute a
                  WHERE a.attrelid = $1::oid AND a.attnum = ANY (c.confkey))
             AND i.indnkeyatts = cardinality(c.confkey)
       ) AS fits
FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid
WHERE c.contype = 'f' AND c.confrelid = $1::oid
ORDER BY 2, 1
"""
# Whether the current role owns table $1.
OWNS = "SELECT pg_has_role(relowner, 'USAGE') FROM pg_class WHERE oid = $1::oid"
# Column defaults of table $1 that table $2 lacks on its column of the same name, with the
# sequence a default's column owns (serial, OWNED BY) or its identity's, and the types.
DEFAULTS = """
SELECT a.attname::text AS name, pg_get_expr(d.adbin, d.adrelid) AS expr,
       a.attidentity::text AS identity, b.attidentity::text AS their_identity,
       b.atthasdef AS they_have, format_type(b.atttypid, b.atttypmod) AS their_type,
       pg_get_serial_sequence(a.attrelid::regclass::text, a.attname) AS seq
FROM pg_attribute a
JOIN pg_attribute b ON b.attrelid = $2::oid AND b.attname = a.attname AND NOT b.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped
  AND (d.oid IS NOT NULL OR a.attidentity <> '')
ORDER BY a.attnum
"""
# Privileges granted on table $1 to roles other than its owner: (privilege, grantee or
# PUBLIC, grantable).
GRANTS = """
SELECT g.privilege_type AS privilege, g.is_grantable AS grantable,
       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee
FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) g
LEFT JOIN pg_roles r ON r.oid = g.grantee
WHERE c.oid = $1::oid AND g.grantee <> c.relowner
ORDER BY 3, 1
"""
# Who holds (or waits for) a lock on table $1 besides this session: for the message of a
# cut-over that gave up.
HOLDERS = """
SELECT DISTINCT a.pid, a.state, a.xact_start, left(a.query, 60) AS query
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.relation = $1::oid AND l.granted AND l.pid <> pg_backend_pid()
ORDER BY a.xact_start NULLS LAST LIMIT 3
"""
# Session settings for one attempt, local to its transaction ($1 lock_timeout, $2
# statement_timeout, both as text with units); the search_path makes every name the catalog
# prints schema-qualified.
ATTEMPT = """
SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true),
       set_config('search_path', 'pg_catalog', true)
"""


def lock(tables: list[str]) -> str:
    """Lock the (quoted) tables for the swap, in this order."""
    return f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE"


def rename(table: str, to: str) -> str:
    return f"ALTER TABLE {table} RENAME TO {ident(to)}"


def next_value(sequence: str) -> str:
    """The value the sequence (a name as ``pg_get_serial_sequence`` prints it) gives next."""
    return (
        f"SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM {sequence}"
    )
