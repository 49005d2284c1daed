"""What a batch does to its slice's rows, one CTE per shape, and how ``verify`` counts what is
left to do.

Each shape writes ``backfill_changed``: a row per row it counts (updated, inserted into the
target, deleted). The claim, the slice and the checkpoint around it are the same for all.
"""

from __future__ import annotations

from dataclasses import dataclass

from backfill.sql.slices import Slice
from backfill.sql.target import Target
from backfill.sql.text import ident

UPDATE, COPY, DELETE, ARCHIVE = "update", "copy", "delete", "archive"


@dataclass(frozen=True, slots=True)
class Change:
    """A resolved shape. ``into``: the target (copy) or archive relation, quoted;
    ``columns``: (target column, SQL over the source row) for copy and archive."""

    kind: str
    where: str
    set_: str = ""
    into: str = ""
    columns: tuple[tuple[str, str], ...] = ()
    on_conflict: str = "nothing"
    conflict: tuple[str, ...] = ()  # the target's unique columns ON CONFLICT names (copy)

    def cte(self, t: Target, s: Slice) -> str:
        """The CTEs that change the slice ``s``, ending in ``backfill_changed``."""
        rows = f"{s.keys()} AND ({self.where})"
        if self.kind == UPDATE:
            return f"""backfill_changed AS (
    UPDATE {t.relation} SET {self.set_}
    WHERE {rows}
    RETURNING 1
)"""
        if self.kind == COPY:
            # FOR SHARE: the copy takes each row's latest committed version (waiting for an
            # application write in flight), and a write to a copied row waits for the batch to
            # commit: a sync trigger's change is never overwritten by an older copy of the row.
            return f"""backfill_changed AS (
    INSERT INTO {self.into} AS backfill_target ({self._targets()}) OVERRIDING SYSTEM VALUE
    SELECT {self._sources()} FROM {t.relation}
    WHERE {rows}
    ORDER BY {t.order()} FOR SHARE
    ON CONFLICT ({", ".join(ident(c) for c in self.conflict)}) {self._on_conflict()}
    RETURNING 1
)"""
        if self.kind == DELETE:
            return f"""backfill_changed AS (
    DELETE FROM {t.relation} WHERE {rows}
    RETURNING 1
)"""
        # Archive: the rows the DELETE returns go into the archive in the same statement.
        return f"""backfill_moved AS (
    DELETE FROM {t.relation} WHERE {rows}
    RETURNING {self._sources()}
), backfill_changed AS (
    INSERT INTO {self.into} ({self._targets()}) OVERRIDING SYSTEM VALUE
    SELECT {self._targets()} FROM backfill_moved
    RETURNING 1
)"""

    def _targets(self) -> str:
        return ", ".join(ident(c) for c, _ in self.columns)

    def _sources(self) -> str:
        return ", ".join(
            expr if expr == ident(c) else f"({expr}) AS {ident(c)}" for c, expr in self.columns
        )

    def _on_conflict(self) -> str:
        others = [ident(c) for c, _ in self.columns if c not in self.conflict]
        if self.on_conflict != "update" or not others:
            return "DO NOTHING"
        # Only rows that differ are written: a no-op update would rewrite every row.
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in others)
        mine = ", ".join(f"backfill_target.{c}" for c in others)
        theirs = ", ".join(f"EXCLUDED.{c}" for c in others)
        return f"DO UPDATE SET {sets} WHERE ({mine}) IS DISTINCT FROM ({theirs})"

    def left(self, t: Target, s: Slice) -> str:
        """The rows of slice ``s`` still to do: matching ``where`` (update, delete), or, for a
        copy, matching it and missing or different in the target."""
        rows = f"{s.keys()} AND ({self.where})"
        if self.kind != COPY:
            return f"SELECT count(*) FROM {t.relation} WHERE {rows}"
        same_key = " AND ".join(
            f"backfill_target.{ident(k.name)} = backfill_source.{ident(k.name)}" for k in t.key
        )
        cols = [ident(c) for c, _ in self.columns]
        mine = ", ".join(f"backfill_target.{c}" for c in cols)
        theirs = ", ".join(f"backfill_source.{c}" for c in cols)
        return f"""SELECT count(*) FROM (
            SELECT {self._sources()} FROM {t.relation} WHERE {rows}) backfill_source
        WHERE NOT EXISTS (SELECT FROM {self.into} backfill_target
                          WHERE {same_key} AND ROW({mine}) IS NOT DISTINCT FROM ROW({theirs}))"""


def archived_still_in_source(t: Target, archive: str) -> str:
    """Archived rows with a key in [$1, $2] that are still in the source: a move that did not
    happen exactly once (for ``verify``)."""
    same_key = " AND ".join(
        f"backfill_source.{ident(k.name)} = backfill_archive.{ident(k.name)}" for k in t.key
    )
    row = t.row("backfill_archive.")
    return f"""
SELECT count(*) FROM {archive} backfill_archive
WHERE {row} >= {t.param_row(1)} AND {row} <= {t.param_row(2)}
  AND EXISTS (SELECT FROM {t.relation} backfill_source WHERE {same_key})"""
