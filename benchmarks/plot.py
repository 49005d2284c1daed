"""The load step as a picture: rows/s and pgbench's p99 over time, with and without the impact
budget (a PNG; matplotlib comes with the ``bench`` extra: ``pip install -e '.[bench]'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import impact

LABELS = {impact.UNTHROTTLED: "unthrottled", impact.BUDGET: "max_impact {}"}


def load_step(step: dict[str, Any], path: Path) -> dict[str, Any]:
    """Draw the load step's runs into ``path``; ``{"path": ...}``, or why there is no plot."""
    runs = {n: r for n, r in step["runs"].items() if "series" in r}
    if not runs:
        return {"unavailable": "no run of the load step was measured"}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return {"unavailable": "matplotlib is not installed (pip install -e '.[bench]')"}
    fig, (rows, p99) = plt.subplots(2, 1, sharex=True, figsize=(9, 6), constrained_layout=True)
    for n, (name, run) in enumerate(runs.items()):
        color = f"C{n}"
        label = LABELS.get(name, name).format(step["max_impact"])
        rows.plot(*_xy(run["series"]["rows_per_second"]), color=color, label=label)
        p99.plot(*_xy(run["series"]["p99_ms"]), color=color, label=label)
        if run["limit_ms"] is not None:
            p99.axhline(run["limit_ms"], color=color, linestyle="--", linewidth=0.8,
                        label=f"{impact.P99_LIMIT}x its baseline ({label})")
        seconds = run["seconds"]
        for ax in (rows, p99):
            ax.axvspan(seconds["on"], seconds["off"], color=color, alpha=0.06)
    rows.set_ylabel("backfill rows/s (1 s)")
    p99.set_ylabel("pgbench p99 ms (1 s window)")
    p99.set_xlabel(f"seconds since the run's first batch (shaded: pgbench {step['kind']} on, "
                   f"{step['clients']} clients)")
    rows.set_title("Load step: pgbench off, on, off while one backfill runs")
    rows.legend(loc="upper right", fontsize="small")
    p99.legend(loc="upper right", fontsize="small")
    rows.set_ylim(bottom=0)
    p99.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    p99.yaxis.set_major_formatter(plain)
    p99.yaxis.set_minor_formatter(plain)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"path": str(path)}


def _xy(points: list[list[float | None]]) -> tuple[list[float | None], list[float | None]]:
    return [p[0] for p in points], [p[1] for p in points]
