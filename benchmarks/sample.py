"""One measured run of one scenario."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Sample:
    """What one run did and how long it took.

    ``seconds`` is the wall time a user waits (for the CLI: the whole process, start-up
    included). ``longest_tx`` is the longest single transaction: the whole run for a
    one-transaction scenario, else the longest batch statement the server reports.
    ``batch_ms`` is wall time per batch inside the run, ``statement_ms`` the server's mean
    execution time of one batch statement, and their difference ``overhead_ms`` is what a batch
    costs beyond its statement (commit, round trip, client). For a process, ``cpu_seconds`` is
    its user + system CPU and ``started_at`` the epoch second it was started at.
    """

    scenario: str
    rows: int
    seconds: float
    batches: int | None = None
    longest_tx: float | None = None
    run_seconds: float | None = None
    batch_ms: float | None = None
    statement_ms: float | None = None
    rss_mb: float | None = None
    completed: bool = True
    exit_code: int | None = None
    cpu_seconds: float | None = None
    started_at: float | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def overhead_ms(self) -> float | None:
        if self.batch_ms is None or self.statement_ms is None:
            return None
        return self.batch_ms - self.statement_ms

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "rows_per_second": self.rows_per_second,
            "overhead_ms": self.overhead_ms,
        }
