"""The resolved table and key a statement works on, and how its key is written."""

from __future__ import annotations

from dataclasses import dataclass

from backfill.sql.text import ident


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
