"""The slice: the keys one batch (or one look of ``plan``/``verify``) covers.

A slice starts at a key (included for a range's first slice, excluded after), holds at most
``size`` keys and never goes past the range's end. Its last key is read with an index range
scan (never OFFSET), or, with one integer key after a dense slice, computed. Every statement
that walks a job's range takes its slices from here: the batch of each shape, ``plan``,
``verify``, naming a poison row.
"""

from __future__ import annotations

from dataclasses import dataclass

from backfill.sql.target import Target
from backfill.sql.text import ident

INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})


def spannable(t: Target) -> bool:
    """Whether the slice end can be computed instead of read (one integer key column)."""
    return len(t.key) == 1 and t.key[0].sql_type in INTEGER_TYPES


def slice_end(t: Target, *, lower: str, upper: str, size: str) -> str:
    """The last key of the next slice: at most ``size`` keys that satisfy the condition
    ``lower``, none beyond the key ``upper`` (an index range scan: never OFFSET)."""
    return f"""
        SELECT {t.columns()} FROM (
            SELECT {t.columns()} FROM {t.relation}
            WHERE {lower} AND {t.row()} <= {upper}
            ORDER BY {t.order()} LIMIT {size}
        ) backfill_slice ORDER BY {t.order("DESC")} LIMIT 1"""


@dataclass(frozen=True, slots=True)
class Slice:
    """The slice after ``start`` (SQL for a key value; from it when ``first``), at most
    ``size`` keys, none beyond ``end``. Its last key is the CTE ``backfill_last``
    (``last()``); ``keys()`` is the condition a row of the slice meets once it is known.

    A batch's slice (``claimed``: its start, end and ``dense`` come from the claimed checkpoint
    row ``backfill_from``) with one integer key decides for itself how it ends: after a dense
    slice, ``size`` key values after the start (computed, sparing the index-only scan whose
    cost grows with the size), else after ``size`` keys; a computed slice is dense when all
    its rows changed (``backfill_count``), a read one when it is ``size`` values wide. The end
    not chosen is never run (a one-time filter).
    """

    t: Target
    start: str
    end: str
    size: str
    first: bool
    claimed: bool = True

    def lower(self) -> str:
        return f"{self.t.row()} {'>=' if self.first else '>'} {self.start}"

    def keys(self) -> str:
        """The rows of the slice: after its start, up to its last key (``backfill_last``)."""
        t = self.t
        ends = ", ".join(f"(SELECT {ident(k.name)} FROM backfill_last)" for k in t.key)
        upto = f"({ends})" if len(t.key) > 1 else ends
        return f"{self.lower()} AND {t.row()} <= {upto}"

    def _dense(self) -> bool:
        return self.claimed and spannable(self.t)

    def last(self) -> str:
        """The query of the slice's last key (no row: the range is exhausted)."""
        t = self.t
        read = slice_end(t, lower=self.lower(), upper=self.end, size=self.size)
        if not self._dense() or self.first:
            return read
        # Unique integers in a span of ``size`` values are at most that many keys: work stays
        # bounded by the size without reading the index; on gaps the slice holds fewer keys.
        key = ident(t.key[0].name)
        return f"""
        SELECT least(a1::numeric + {self.size}, z1)::{t.key[0].sql_type} AS {key}
        FROM backfill_from WHERE dense AND a1 < z1
        UNION ALL
        SELECT {key} FROM ({read}) backfill_read WHERE NOT (SELECT dense FROM backfill_from)"""

    def dense(self) -> str:
        """The checkpoint's new ``dense``, once the batch is done (unchanged without one
        integer key)."""
        if not self._dense():
            return "dense"
        key = ident(self.t.key[0].name)
        width = f"(SELECT {key} FROM backfill_last)::numeric - (SELECT a1 FROM backfill_from)"
        if self.first:  # the first slice includes its start
            return f"{width} = {self.size} - 1"
        return f"""CASE WHEN (SELECT dense FROM backfill_from)
                THEN (SELECT n FROM backfill_count) = {self.size} ELSE {width} = {self.size} END"""


def param_slice(t: Target, *, first: bool) -> Slice:
    """A slice in parameters, for looks at the range: at most $3 keys after $1, none
    beyond $2 (read, never computed)."""
    return Slice(t, start=t.param_row(1), end=t.param_row(2), size="$3", first=first,
                 claimed=False)


def key_of_next_row(t: Target, *, first: bool) -> str:
    """The key of the single row after $1, none beyond $2 (used to name a poison row)."""
    s = param_slice(t, first=first)
    return (
        f"SELECT {t.as_text()} FROM {t.relation} WHERE {s.lower()} "
        f"AND {t.row()} <= {s.end} ORDER BY {t.order()} LIMIT 1"
    )
