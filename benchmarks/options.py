"""What one benchmark run measures, as plain frozen values (the command line fills them in)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("throughput", "effect", "growth", "fastpath", "step", "open-loop", "shapes", "frontier")
# What a run measures unless ``--only`` says otherwise: the frontier takes ~45 minutes of its
# own and writes its own files (``--only frontier``: results/frontier-<UTC date-time>.json,
# .md and .png).
DEFAULT_SECTIONS = SECTIONS[:-1]
# Names for several sections: issue 10's impact budget is measured by the effect table's
# steady loads (its row next to the fixed configurations), the load step and the open loop.
ALIASES = {"impact": ("effect", "step", "open-loop")}


@dataclass(frozen=True, slots=True)
class Options:
    rows: int = 1_000_000
    """Rows in the users table every scenario backfills."""
    big_rows: int = 5_000_000
    """Rows of the second, larger table for runner RSS and rows/s at scale (0: skip)."""
    repeat: int = 3
    """Repetitions of each throughput scenario (median and spread are reported)."""
    batch_sizes: tuple[int, ...] = (1000, 10_000)
    load_seconds: float = 6.0
    """How long each "effect on everyone else" window runs the backfill under load."""
    idle_seconds: float = 3.0
    """The same load without a backfill, just before each window: that window's baseline."""
    load_kinds: tuple[str, ...] = ("select-only", "tpcb-like")
    pgbench_scale: int = 10
    pgbench_clients: int = 4
    pgbench_segment: tuple[str, str] = ("-T", "2")
    """pgbench runs in back-to-back segments until the backfill ends; each segment's length."""
    warmup: float = 1.0
    """Seconds of load before a window opens: connections made, caches settled."""
    writer_pause: float = 0.01
    """Pause between two writes of the single-row writer."""
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    scenarios: tuple[str, ...] = ()
    """Only the scenarios with these names (all when empty)."""
    loaded_scenarios: tuple[str, ...] = ()
    """Only these of them under load (all that apply when empty)."""
    pairs: int = 5
    """Paired, interleaved whole-process repetitions of the fast path (runner and procedure,
    uvloop and not, and a run with nothing to do)."""
    help_runs: int = 7
    """``backfill --help`` timings (the median is reported)."""
    max_impact: str = "20%"
    """The impact budget (``[throttle] max_impact``) of the budget's scenarios."""
    step_rows: int = 8_000_000
    """Rows of the load step's table: enough that an unthrottled run outlasts the step."""
    step_phases: tuple[float, float, float] = (10.0, 15.0, 10.0)
    """The load step: pgbench off, on (closed loop), off, while one run goes on (seconds)."""
    step_baseline: float = 5.0
    """pgbench alone before each load step: the p99 it must come back within 1.3x of."""
    step_sample: float = 0.25
    """The load step's progress series: the rows every ``step_sample`` seconds."""
    capacity_seconds: float = 5.0
    """The closed-loop pgbench run that measures the server's capacity for the open loop."""
    open_fraction: float = 0.5
    """The open loop's fixed arrival rate, as a fraction of the measured capacity."""
    open_kind: str = "tpcb-like"
    frontier_rates: tuple[int, ...] = (2000, 5000, 10_000, 20_000)
    """The frontier's fixed ceilings (``max_rows_per_second``)."""
    frontier_typical: str = "20%"
    """The frontier's budget on the typical latency (``max_impact``)."""
    frontier_tail: str = "50%"
    """The frontier's budget on the tail (``max_tail_impact``)."""
    frontier_configs: tuple[str, ...] = ()
    """Only the frontier's configurations with these names, and the baselines (all when
    empty)."""
    frontier_clients: int = 8
    """The frontier's open-loop application's clients (its capacity is measured closed-loop
    with ``pgbench_clients``)."""
    frontier_fraction: float = 0.4
    """The frontier's application: its arrival rate, as a fraction of the measured capacity.
    At 0.4 with four clients it had no headroom left (a runner made pgbench's schedule lag grow
    without bound, docs/performance.md): ``frontier_clients`` gives it eight."""
    frontier_settle: float = 20.0
    """Seconds of each configuration before its window (reported apart)."""
    frontier_window: float = 30.0
    """Seconds of each configuration's window."""
    frontier_rounds: int = 3
    """Rounds of every configuration (medians over the valid rounds are reported)."""
    frontier_baselines: int = 4
    """Baseline windows (no runner) spread in each round, the first window of a round one."""
    frontier_seed: int = 24
    """The seed of the rounds' shuffled orders (``random.Random``)."""
    frontier_rows: int = 2_000_000
    """Rows of the frontier's table: enough for the fastest ceiling's settle and window."""
    frontier_wal_prefill_mb: int = 2048
    """WAL segments created once before the frontier (``min_wal_size`` keeps them), so that
    windows recycle segments instead of creating them."""
    out: Path = RESULTS / "latest.json"
    smoke: bool = False

    def smoked(self) -> Options:
        """A tiny, single-repetition run that exercises every code path in seconds."""
        return replace(
            self,
            rows=min(self.rows, 3000),
            big_rows=min(self.big_rows, 6000),
            repeat=1,
            batch_sizes=self.batch_sizes[:1],
            # Long enough for a runner's start-up on a loaded machine (~1 s at a load of 5):
            # a window that ends before its first batch measures nothing.
            load_seconds=3.0,
            idle_seconds=0.5,
            load_kinds=self.load_kinds[-1:],
            # The other runner scenarios take the same code path under load.
            loaded_scenarios=(
                "update", "do-block", f"runner-{self.batch_sizes[0]}", "runner-impact",
            ),
            warmup=0.1,
            pgbench_scale=1,
            pgbench_segment=("-t", "20"),
            pairs=1,
            help_runs=2,
            step_rows=min(self.step_rows, 20_000),
            step_phases=(1.0, 1.0, 1.0),
            step_baseline=0.5,
            step_sample=0.1,
            capacity_seconds=1.0,
            frontier_rates=self.frontier_rates[:1],
            frontier_clients=2,
            frontier_settle=0.5,
            frontier_window=1.0,
            frontier_rounds=1,
            frontier_baselines=2,
            frontier_rows=min(self.frontier_rows, 30_000),
            frontier_wal_prefill_mb=min(self.frontier_wal_prefill_mb, 32),
            smoke=True,
        )


def override(opts: Options, assignments: list[str]) -> Options:
    """``opts`` with ``NAME=VALUE`` assignments applied, each value typed by its field's type
    (a tuple: comma-separated items; a bool: true/false, yes/no, 1/0). ValueError names what
    is wrong."""
    hints = get_type_hints(Options)
    names = {f.name for f in fields(Options)}
    changes: dict[str, Any] = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in names:
            raise ValueError(f"--set {assignment!r}: expected NAME=VALUE with NAME one of "
                             f"{', '.join(sorted(names))}")
        try:
            changes[name] = _typed(hints[name], text.strip())
        except (TypeError, ValueError) as error:
            raise ValueError(f"--set {assignment!r}: {error}") from error
    return replace(opts, **changes)


def _typed(kind: Any, text: str) -> Any:
    """``text`` as a value of ``kind`` (int, float, str, bool, Path or a tuple of them)."""
    if get_origin(kind) is tuple:
        args = get_args(kind)
        items = [t.strip() for t in text.split(",") if t.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], t) for t in items)
        if len(items) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values")
        return tuple(_typed(a, t) for a, t in zip(args, items, strict=True))
    if kind is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            raise ValueError(f"not a boolean: {text!r}")
        return lowered in ("true", "yes", "1", "on")
    if kind in (int, float, str, Path):
        return kind(text)
    raise TypeError(f"cannot set a field of type {kind}")
