"""What every report module shares: a bar (target, measured, met) and number formats."""

from __future__ import annotations

from typing import Any


def bar(name: str, measured: float | None, limit: float, *, at_most: bool, text: str
        ) -> dict[str, Any]:
    """One row of the targets table; ``met`` is None when nothing was measured."""
    met = None if measured is None else (measured <= limit if at_most else measured >= limit)
    return {"target": name, "measured": measured, "limit": limit, "met": met,
            "text": text if measured is not None else "not measured"}


def x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def span(s: dict[str, Any], digits: int = 2, unit: str = "x") -> str:
    """A summary as ``median (min..max over n)``."""
    if s.get("median") is None:
        return "n/a"
    f = f"{{:,.{digits}f}}{unit}"
    return (f"{f.format(s['median'])} ({f.format(s['min'])}..{f.format(s['max'])} "
            f"over {s['n']})")
