"""How many keys the next batch covers.

The size shrinks fast after a statement timeout (halve) and while a data error is being
bisected, and grows back gradually after successes, always within ``min_size .. max_size``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Sizer:
    target: int
    min_size: int
    max_size: int
    size: int = 0

    def __post_init__(self) -> None:
        self.size = self.size or self.target

    def _clamp(self, value: int) -> int:
        return max(self.min_size, min(self.max_size, value))

    def succeeded(self, seconds: float) -> None:
        if self.size < self.target:
            self.size = min(self.target, max(self.size + 1, self.size * 3 // 2))
        elif self.size > self.target:
            self.size = self.target

    def timed_out(self) -> None:
        self.size = self._clamp(self.size // 2)

    def split(self) -> bool:
        """Halve the size to narrow down a failing row; False when already a single row."""
        if self.size <= 1:
            return False
        self.size //= 2
        return True

    def retarget(self, target: int) -> None:
        self.target = self._clamp(target)
