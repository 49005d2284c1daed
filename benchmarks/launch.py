"""Run one command and write its exit code, wall seconds, peak RSS (KB), the epoch second it
was started at and the CPU seconds it used (user + system, from its rusage) to a file.

Usage: ``python3 -S launch.py OUT COMMAND...``. SIGTERM is passed on to the command.

Why a launcher: Linux counts the memory of the process that forked a child in the child's peak
RSS (the forked copy's high-water mark survives ``exec``). Forked from the benchmark, which holds
tens of MB of measurements, the runner would look as big as the benchmark; forked from this
small process it is measured alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def main() -> int:
    out, command = sys.argv[1], sys.argv[2:]
    child: list[subprocess.Popen[bytes]] = []
    stop = []

    def forward(signum: int, frame: object) -> None:
        if child:
            child[0].send_signal(signum)
        else:
            stop.append(signum)

    signal.signal(signal.SIGTERM, forward)
    started = time.time()  # the same clock as the server's clock_timestamp() on this machine
    t0 = time.perf_counter()
    proc = subprocess.Popen(command)
    child.append(proc)
    if stop:
        proc.send_signal(stop[0])
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    child.clear()  # reaped: never signal its pid again
    proc.returncode = os.waitstatus_to_exitcode(status)
    with open(out, "w") as f:
        cpu = usage.ru_utime + usage.ru_stime
        f.write(f"{proc.returncode} {seconds} {usage.ru_maxrss} {started} {cpu}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
