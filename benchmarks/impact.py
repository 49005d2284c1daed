"""Issue 10's impact budget in the benchmark: the job it runs, and the runs it is compared with.

The budget's scenarios run only where this version of the runner accepts ``[throttle]
max_impact`` (``runner.supported``); elsewhere they are reported as unavailable, with why.
"""

from __future__ import annotations

from typing import Any

from benchmarks import runner

BUDGET = "runner-impact"
UNTHROTTLED = "unthrottled"


def budget_fields(size: int, max_impact: str) -> dict[str, Any]:
    """The runner at batch ``size`` with nothing but an impact budget to pace it."""
    return runner.job_fields(size=size, throttle={"max_impact": max_impact})


def label(max_impact: str) -> str:
    return f"runner, max_impact {max_impact}"


def compared(size: int, max_impact: str) -> dict[str, dict[str, Any]]:
    """The runs of the load step and the open loop: unthrottled, and with the budget."""
    return {UNTHROTTLED: runner.job_fields(size=size), BUDGET: budget_fields(size, max_impact)}

# Issue 10's bars.
P99_LIMIT = 1.3
"""The foreground's p99 may be at most this multiple of its baseline."""
SPEEDUP = 1.5
"""Steady load: the budget's rows/s over the fastest fixed configuration within P99_LIMIT."""
OFF_RATIO = 0.8
"""Load step: rows/s while the load is off, over an unthrottled run's."""
RECOVERY_SECONDS = 3.0
"""Load step: how soon after the load comes on its p99 must be back within P99_LIMIT."""
