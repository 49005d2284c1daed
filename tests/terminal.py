"""The CLI on a real terminal for the tests: a process on a pseudo-terminal (``pty``) of a given
size, everything it draws collected as it comes, and what was drawn read back as lines."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # SGR: colours and styles, inside a line
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")  # moves, erases: line ends


def lines(drawn: str) -> list[str]:
    """Every line drawn at some point, in order: a cursor move or an erase ends a line."""
    text = _CONTROL.sub("\n", _COLOUR.sub("", drawn))
    return [line.rstrip() for line in text.split("\n") if line.strip()]


class Terminal:
    """``python -m backfill ARGS`` with stdin, stdout and stderr on one pseudo-terminal."""

    def __init__(
        self, *args: str | Path, env: Mapping[str, str], columns: int = 140, rows: int = 30
    ) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = {k: v for k, v in env.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backfill", *map(str, args)],
            stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
            env=env | {"TERM": "xterm-256color"},
        )
        os.close(slave)
        self._master = master
        self._drawn: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the other side is closed
                data = b""
            with self._changed:
                if not data:
                    self._drawn.append("")
                    self._changed.notify_all()
                    return
                self._drawn.append(data.decode(errors="replace"))
                self._changed.notify_all()

    @property
    def drawn(self) -> str:
        with self._changed:
            return "".join(self._drawn)

    def wait_for(self, pattern: str, *, within: float) -> re.Match[str]:
        """The first drawn line matching ``pattern``, waiting for it at most ``within`` s."""
        deadline = time.monotonic() + within
        with self._changed:
            while True:
                for line in lines("".join(self._drawn)):
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                closed = bool(self._drawn) and self._drawn[-1] == ""
                if left <= 0 or closed:
                    shown = "\n".join(lines("".join(self._drawn))[-15:])
                    raise AssertionError(f"never drew {pattern!r}; last lines:\n{shown}")
                self._changed.wait(left)

    def interrupt(self) -> None:
        """Ctrl-C."""
        self.proc.send_signal(signal.SIGINT)

    def wait(self, *, within: float) -> int:
        code = self.proc.wait(timeout=within)
        self._reader.join(timeout=within)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        os.close(self._master)
