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


def frontier(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """The frontier as a picture: the application's p99 and mean (over their baselines)
    against rows/s, the fixed ceilings' line and every window, the budgets' points."""
    if "configurations" not in result:
        return {"unavailable": result.get("unavailable", "not measured")}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"unavailable": "matplotlib is not installed (pip install -e '.[bench]')"}
    configs, windows = result["configurations"], result["windows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    budgets = {"budget-typical": f"max_impact {result['typical']}",
               "budget-typical-canary": f"max_impact {result['typical']}, canary only",
               "budget-tail": f"max_tail_impact {result['tail']}",
               "budget-tail-canary": f"max_tail_impact {result['tail']}, canary only"}
    for ax, stat in zip(axes, ("p99", "mean"), strict=True):
        fixed = sorted((c["rows_per_second"], c[f"{stat}_ratio"]) for n, c in configs.items()
                       if n.startswith("fixed-") and c[f"{stat}_ratio"] is not None)
        ax.plot([r for r, _ in fixed], [i for _, i in fixed], "o-", color="C0",
                label="fixed max_rows_per_second (median)")
        each = [(w["rows_per_second"], w["ratio"][stat]) for w in windows
                if w["name"].startswith("fixed-") and w["ratio"][stat] is not None]
        ax.plot([r for r, _ in each], [i for _, i in each], ".", color="C0", alpha=0.35,
                label="fixed, each window")
        for n, (name, label) in enumerate(budgets.items()):
            c = configs.get(name)
            if c is None or c[f"{stat}_ratio"] is None:
                continue
            color = f"C{n + 1}"
            ax.plot([c["rows_per_second"]], [c[f"{stat}_ratio"]], "*", markersize=16,
                    color=color, label=f"{label} (median)")
            mine = [(w["rows_per_second"], w["ratio"][stat]) for w in windows
                    if w["name"] == name and w["ratio"][stat] is not None]
            ax.plot([r for r, _ in mine], [i for _, i in mine], "x", color=color, alpha=0.6)
        base = [w["ratio"][stat] for w in windows
                if w["name"] == "baseline" and w["ratio"][stat] is not None]
        if base:
            ax.axhspan(min(base), max(base), color="grey", alpha=0.15,
                       label="baseline windows' spread")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlim(left=0)
        ax.set_xlabel("backfill rows/s (window)")
        ax.set_ylabel(f"application {stat} latency / baseline")
        ax.set_title(f"The application's {stat} against the runner's speed")
        ax.legend(fontsize="small", loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"path": str(path)}
