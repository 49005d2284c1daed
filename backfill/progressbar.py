"""The live progress bar on a terminal (rich): one bar per shard the process runs.

Each bar shows the percent of the fixed key range done, rows updated, rows per second and ETA
(both from the run's ``Tracker``: committed batches only, never estimates), the batch size, and
what holds the run right now: the reason of the wait under way (``sleep``, ``rate_limit``, a
health gate, ``paused``, ``backoff``, or any other pause reason) with how long it has lasted.
The loop reports a pause's reason when one of its slices ends (a long wait comes in slices of
at most ``check_every``), so a new kind of wait shows the previous reason for at most one slice.

Off a terminal nothing here is used: the log lines (``observers.LogLines``) say it all.
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

from backfill.checkpoint import (
    FAILED,
    INTERRUPTED,
    PAUSED,
    RUNNING,
    SUCCEEDED,
    THROTTLED,
    BatchResult,
    Checkpoint,
    Key,
)
from backfill.errors import BatchFailure
from backfill.observers import Progress as Watched
from backfill.observers import summary
from backfill.progress import human_seconds
from backfill.protocols import Pause, Reason

ENDED = (SUCCEEDED, FAILED, INTERRUPTED)
RECENT = 1.0  # a wait that ended this recently still holds the run (a sleep between batches)
REFRESH = 0.1  # at most this often the bar's numbers are recomputed from the tracker


class _Field(ProgressColumn):
    """One of the numbers an observer computed (``task.fields["shown"]``), right-aligned."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def render(self, task: Task) -> RenderableType:
        return Text(" " + task.fields["shown"].get(self.key, ""), justify="right")


class _Holds(ProgressColumn):
    """What holds the run, as of each redraw (so a long wait's duration keeps counting)."""

    def render(self, task: Task) -> RenderableType:
        bar: ProgressBar = task.fields["bar"]
        text = bar.holds()
        style = "green" if text == RUNNING or text == SUCCEEDED else (
            "red" if text == FAILED else "yellow")
        return Text(" " + text, style=style)


@dataclass
class Board:
    """The rich display on one stream, shared by the bars of every shard this process runs."""

    stream: TextIO
    progress: Progress = field(init=False)
    bars: int = 0

    def __post_init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            _Field("percent"), _Field("rows"), _Field("rate"), _Field("eta"), _Field("batch"),
            _Holds(),
            console=Console(file=self.stream),
            refresh_per_second=5,
        )

    def join(self) -> None:
        if self.bars == 0:
            self.progress.start()
            atexit.register(self.progress.stop)  # never leave the cursor hidden
        self.bars += 1

    def leave(self) -> None:
        self.bars -= 1
        if self.bars == 0:
            self.progress.stop()
            atexit.unregister(self.progress.stop)
            _boards.pop(id(self.stream), None)


_boards: dict[int, Board] = {}


def board(stream: TextIO) -> Board:
    return _boards.setdefault(id(stream), Board(stream))


@dataclass
class ProgressBar:
    """An observer drawing one bar; ``label`` names the job (and shard) on the left."""

    stream: TextIO
    watched: Watched
    label: str
    clock: Callable[[], float] = time.monotonic
    done: str = ""  # what the rows became ("copied", "deleted"), shown after their count
    current: str = ""  # the run's state
    reason: str = ""  # of the latest wait the loop reported
    holding_since: float | None = None  # a wait under way started then
    waited_at: float = -RECENT  # the latest wait ended then
    _board: Board | None = None
    _task: TaskID | None = None
    _drawn: float = -REFRESH

    def holds(self) -> str:
        """``running``, ``waiting: <reason>`` (with its duration once it lasts), or the end.
        Called by the display's own thread, at each redraw."""
        now = self.clock()
        if self.current in ENDED:
            return self.current
        if self.holding_since is not None:
            reason = Reason.PAUSED if self.current == PAUSED else self.reason
            held = now - self.holding_since
            return "waiting" + (f": {reason}" if reason else "") + (
                f" {human_seconds(held)}" if held >= 1 else "")
        if self.reason and now - self.waited_at < RECENT:
            return f"waiting: {self.reason}"
        return self.current or "starting"

    def _draw(self, *, force: bool = False) -> None:
        if self._board is None or self._task is None:
            return
        now = self.clock()
        if not force and now - self._drawn < REFRESH:
            return
        self._drawn = now
        s = summary(self.watched)
        percent = s["percent"]
        rate = s["rows_per_second"]
        shown = {
            "percent": "?" if percent is None else f"{percent:.1f}%",
            "rows": f"{s['rows']:,} rows" + (f" {self.done}" if self.done else ""),
            "rate": f"{rate:,.0f} rows/s" if isinstance(rate, float) else "",
            # Paused by an operator: when it ends is theirs to say.
            "eta": "ETA " + ("?" if self.current == PAUSED else human_seconds(
                self.watched.tracker.eta_seconds())),
            "batch": f"batch {s['batch_size']:,}" if s["batch_size"] else "",
        }
        self._board.progress.update(
            self._task,
            total=None if percent is None else 100.0,
            completed=0.0 if not isinstance(percent, float | int) else float(percent),
            shown=shown,
            refresh=force,
        )

    def started(self, checkpoint: Checkpoint) -> None:
        if self._board is None:
            self._board = board(self.stream)
            self._board.join()
            self._task = self._board.progress.add_task(self.label, total=None, shown={}, bar=self)
        self._draw(force=True)

    def committed(self, result: BatchResult) -> None:
        self.holding_since = None
        self._draw()

    def failed(self, failure: BatchFailure, *, cursor: Key | None, size: int) -> None:
        self._draw()

    def skipped(self, key: Key) -> None:
        self._draw()

    def throttled(self, pause: Pause) -> None:
        self.reason, self.waited_at = pause.reason, self.clock()
        self._draw()

    def state(self, state: str) -> None:
        if state in (THROTTLED, PAUSED):
            if self.holding_since is None:
                self.holding_since = self.clock()
        elif state == RUNNING and self.holding_since is not None:
            self.holding_since, self.waited_at = None, self.clock()
        self.current = state
        self._draw(force=True)
        if state in ENDED and self._board is not None:
            self._board.leave()
            self._board = None
