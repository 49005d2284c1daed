"""How many keys the next batch covers.

``Sizer`` keeps a fixed size: it shrinks fast after a statement timeout (halve) and while a data
error is being bisected, and grows back gradually after successes, always within
``min_size .. max_size``.

``AdaptiveSizer`` (``[batch] target_seconds``) sizes each batch so that it takes about
``target_seconds``: from a smoothed measure of keys per second (an EWMA), growing by at most
``growth`` per batch, shrinking at once after a slow batch or a timeout. Without a target it is
a ``Sizer``. The loop talks to both through the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass

from backfill.protocols import Sizing


@dataclass(slots=True)
class Sizer:
    target: int
    min_size: int
    max_size: int
    size: int = 0
    # A ceiling on the next batches (the impact budget's short transactions while it holds
    # the pace back: ``limit``); None: none. ``batch`` is what the next batch takes.
    cap: int | None = None

    def __post_init__(self) -> None:
        self.size = self.size or self.target

    def _clamp(self, value: int) -> int:
        return max(self.min_size, min(self.max_size, value))

    @property
    def batch(self) -> int:
        return self.size if self.cap is None else max(1, min(self.size, self.cap))

    @property
    def settled(self) -> bool:
        """The size stays as it is after a success: no decision is due between batches."""
        return self.size == self.target and self.batch == self.size

    def succeeded(self, seconds: float, keys: int | None = None) -> None:
        """A batch of ``keys`` keys (the next batch's, by default) committed in ``seconds``."""
        if self.size < self.target:
            self.size = min(self.target, max(self.size + 1, self.size * 3 // 2))
        elif self.size > self.target:
            self.size = self.target

    def timed_out(self) -> None:
        self.size = self._clamp(self.batch // 2)

    def split(self) -> bool:
        """Halve the batch to narrow down a failing row; False when already a single row."""
        if self.batch <= 1:
            return False
        self.size = self.batch // 2
        return True

    def retarget(self, target: int) -> None:
        self.target = self._clamp(target)

    def limit(self, ceiling: int | None) -> None:
        """Cap the next batches at ``ceiling`` keys (None: no cap)."""
        self.cap = None if ceiling is None else max(1, ceiling)

    def tune(self, sizing: Sizing) -> None:
        """Apply live settings. A new ``size`` takes effect on the next batch (in adaptive
        mode it is where the sizing restarts from)."""
        self.max_size = max(self.min_size, sizing.max_size)
        if sizing.size != self.target:
            self.retarget(sizing.size)
            self.size = self.target
        self.target = self._clamp(self.target)
        self.size = self._clamp(self.size)


@dataclass(slots=True)
class AdaptiveSizer(Sizer):
    """Aims each batch at ``target_seconds`` (None: behave as a fixed-size ``Sizer``).

    The measure is keys per second, not rows: the size is counted in keys, and a sparse
    ``where`` still costs the scan of every key in the slice.
    """

    target_seconds: float | None = None
    growth: float = 1.5  # at most this factor bigger than the last batch
    smoothing: float = 0.3  # weight of the newest batch in the EWMA
    slow: float = 1.5  # a batch slower than slow x target resizes from itself alone
    rate: float | None = None  # EWMA of keys per second; None until measured

    @property
    def settled(self) -> bool:
        # Aiming at a duration sizes every batch from the one before it.
        return self.target_seconds is None and self.size == self.target

    def succeeded(self, seconds: float, keys: int | None = None) -> None:
        if self.target_seconds is None:
            Sizer.succeeded(self, seconds, keys)
            return
        sample = (self.batch if keys is None else keys) / max(seconds, 1e-6)
        if self.rate is None or seconds > self.slow * self.target_seconds:
            # First measure, or a slow batch: trust this batch alone so the next one is right
            # at once instead of after the average catches up.
            self.rate = sample
        else:
            self.rate += self.smoothing * (sample - self.rate)
        ideal = self.rate * self.target_seconds
        # Shrinking is never limited; growing is, so one fast batch cannot make a huge one.
        self.size = self._clamp(max(1, int(min(ideal, self.size * self.growth))))

    def timed_out(self) -> None:
        Sizer.timed_out(self)
        self.rate = None  # the old measure was wrong; start over from the next batch

    def tune(self, sizing: Sizing) -> None:
        self.target_seconds = sizing.target_seconds
        Sizer.tune(self, sizing)
