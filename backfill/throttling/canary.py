"""The impact budget's measurements, taken for as long as a run lasts and fed to its
``Controller``: the canary, a small transaction like an application's (a read and a write of
the shard's own row, committed: four round trips) fifty times a second while someone else is
at work (ten while nobody is); whether other sessions are at work
(every ``ACTIVITY_EVERY`` seconds); and ``pg_stat_statements`` (every ``STATEMENTS_EVERY``),
the last two on the probe connection. While the job sets no budget it only waits for one.

The canary beats from a process of its own (``python -m backfill.throttling.canary``), on a
connection of its own: inside the runner's event loop its beats would wait for the runner's
own work and miss what the application waits for, in a thread for the interpreter's lock.
Its configuration (the connection's parameters, secrets included) goes in on its stdin, never
on a command line; its beats come back as JSON lines; it ends when its stdin closes.

A canary that cannot be taken (the role may not write ``backfill.canaries``, the connection is
gone) is said once and marks the budget broken: the governor then holds the run or ignores the
budget, as ``on_check_error`` says. Sessions of other roles that the runner's role may not see
(no ``pg_monitor``) are said once too, and assumed to be at work.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from subprocess import PIPE
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from pydantic import SecretStr

from backfill.conninfo import ConnectParams
from backfill.control import LiveControl
from backfill.errors import one_line
from backfill.pg import Budget
from backfill.protocols import Probe
from backfill.throttling.impact import Controller

if TYPE_CHECKING:
    from backfill.throttling.probe import PgProbe

log = logging.getLogger(__name__)

ACTIVITY_EVERY = 0.1  # seconds between looks at other sessions (a load that arrives is seen
# within a few of them: the runner backs off within a fraction of a second) ...
RECENT = 0.1  # ... which see a session at work when it ran a statement since the last look
STATEMENTS_EVERY = 0.25  # seconds between reads of pg_stat_statements (a heavier query) ...
STATEMENTS_WINDOW = 0.1  # ... and during an idle window (short: the baseline wants chunks)
TELL_EVERY = 0.25  # seconds between updates to the canary (its pace, what to show)
ROOT = Path(__file__).resolve().parents[2]  # where ``backfill`` is imported from


@dataclass(frozen=True, slots=True)
class Canary:
    """How to start the canary's process for a shard of a job."""

    params: ConnectParams
    job: str
    shard: int
    budget: Budget
    application_name: str

    @classmethod
    def like(cls, probe: PgProbe) -> Canary:
        """The canary of the run ``probe`` measures for, on a connection like the probe's."""
        return cls(probe.params, probe.job.name, probe.shard, probe.budget,
                   probe.application_name)

    def config(self) -> dict[str, Any]:
        plain = {f.name: getattr(self.params, f.name) for f in fields(self.params)}
        return {
            "params": {k: v.get_secret_value() if isinstance(v, SecretStr) else
                       str(v) if isinstance(v, Path) else v for k, v in plain.items()},
            "job": self.job, "shard": self.shard, "application_name": self.application_name,
            "budget": [self.budget.statement_timeout, self.budget.lock_timeout,
                       self.budget.connect_timeout],
        }

    async def beats(self, budget: Controller, job: str) -> None:
        """Run the process and feed its beats to ``budget`` until cancelled."""
        command = [sys.executable, "-m", "backfill.throttling.canary"]
        process = await anyio.open_process(command, stdin=PIPE, stdout=PIPE, cwd=ROOT)
        try:
            await _tell(process, self.config())
            async with anyio.create_task_group() as tg:
                tg.start_soon(_listen, process, budget, job)
                told: tuple[Any, ...] = ()
                while True:
                    now = (budget.beat_every, *budget.report())
                    if now != told:
                        told = now
                        await _tell(process, {"every": now[0], "report": list(now[1:])})
                    await anyio.sleep(TELL_EVERY)
        finally:
            with anyio.CancelScope(shield=True):
                await _end(process)


async def _tell(process: Process, message: dict[str, Any]) -> None:
    assert process.stdin is not None
    await process.stdin.send((json.dumps(message) + "\n").encode())


async def _listen(process: Process, budget: Controller, job: str) -> None:
    assert process.stdout is not None
    lines = BufferedByteReceiveStream(process.stdout)
    while True:
        message = json.loads(await lines.receive_until(b"\n", 65536))
        if "error" in message:
            if budget.broken is None:
                log.warning("the impact budget cannot measure",
                            extra={"job": job, "error": message["error"]})
            budget.broken = message["error"]
            continue
        if budget.broken is not None:
            log.info("the impact budget measures again", extra={"job": job})
            budget.broken = None
        budget.beat(message["at"], message["s"])


async def _end(process: Process) -> None:
    if process.stdin is not None:
        await process.stdin.aclose()
    with anyio.move_on_after(2):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


async def measure(
    probe: Probe,
    canary: Canary | None,
    live: LiveControl,
    budget: Controller,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run until cancelled: the canary's process while the job sets a budget, the looks at
    other sessions and at ``pg_stat_statements`` on the probe."""
    while True:
        t = live.knobs.throttle
        if not t.impact_budget:
            budget.broken = None
            await anyio.sleep(t.check_every)
            continue
        async with anyio.create_task_group() as tg:
            if canary is not None:
                tg.start_soon(_beating, canary, budget, live.job)
            await _look(probe, live, budget, clock)
            tg.cancel_scope.cancel()


async def _beating(canary: Canary, budget: Controller, job: str) -> None:
    """The canary's process; restarted (after a second) if it ends."""
    while True:
        try:
            await canary.beats(budget, job)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError, ValueError) as exc:
            budget.broken = f"the canary's process ended: {one_line(exc)}"
            log.warning("the impact budget's canary ended; restarting it",
                        extra={"job": job, "error": one_line(exc)})
        await anyio.sleep(1.0)


async def _look(probe: Probe, live: LiveControl, budget: Controller,
                clock: Callable[[], float]) -> None:
    """Look at other sessions and the statements until the job sets no budget."""
    read_at = -STATEMENTS_EVERY
    hidden_said = statements_said = failing = False
    while (t := live.knobs.throttle).impact_budget:
        budget.retune(*t.impact_limits())
        now = clock()
        try:
            active, hidden = await probe.others(RECENT)
            if hidden and not hidden_said:
                hidden_said = True
                log.warning(
                    "the impact budget cannot see other roles' sessions (grant the runner's "
                    "role pg_monitor); it assumes they are at work",
                    extra={"job": live.job, "hidden": hidden},
                )
            budget.activity(clock(), True if active else None if hidden else False)
            every = STATEMENTS_WINDOW if budget.measuring else STATEMENTS_EVERY
            if not statements_said and now - read_at >= every:
                read_at = now
                statements_said = await _statements(probe, budget, live.job, clock)
            failing = False
        except Exception as exc:
            if not failing:
                log.warning("the impact budget cannot look at other sessions",
                            extra={"job": live.job, "error": one_line(exc),
                                   "on_check_error": t.on_check_error})
            failing = True
            budget.activity(clock(), None)
        await anyio.sleep(max(0.0, now + ACTIVITY_EVERY - clock()))


async def _statements(
    probe: Probe, budget: Controller, job: str, clock: Callable[[], float]
) -> bool:
    """Feed a snapshot of ``pg_stat_statements`` to the budget; True once there is something
    to say for good (it is not installed, or hides other roles' statements, or fails): from
    then on the canary goes on alone."""
    try:
        found = await probe.statements()
    except Exception as exc:
        log.warning("the impact budget cannot read pg_stat_statements; the canary decides alone",
                    extra={"job": job, "error": one_line(exc)})
        return True
    if found is None:
        log.info("pg_stat_statements is not installed; the impact budget's canary decides alone",
                 extra={"job": job})
        return True
    snapshot, hidden = found
    if hidden and not snapshot:
        log.warning("pg_stat_statements hides other roles' statements from the runner's role "
                    "(grant it pg_read_all_stats); the impact budget's canary decides alone",
                    extra={"job": job, "hidden": hidden})
        return True
    budget.statements(clock(), snapshot)
    return False


# --- the canary's process ---------------------------------------------------------------------


@dataclass(slots=True)
class _Told:
    every: float = 0.1
    report: tuple[Any, ...] = (None, None, None, None, None, None)


async def _main() -> None:
    """The process: beat until stdin ends."""
    from backfill import sql  # the process's own imports, not the runner's
    from backfill.pg import connect
    from backfill.throttling.probe import timed

    config = json.loads(sys.stdin.readline())
    p: dict[str, Any] = config["params"]
    for secret in ("dsn", "password"):
        p[secret] = None if p[secret] is None else SecretStr(p[secret])
    p["dsn_file"] = None if p["dsn_file"] is None else Path(p["dsn_file"])
    params = ConnectParams(**p)
    budget = Budget(*config["budget"])
    told = _Told()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hear, told, tg.cancel_scope)
        conn = None
        while True:
            start = time.monotonic()
            try:
                if conn is None or conn.is_closed():
                    conn = await connect(params, budget=budget,
                                         application_name=config["application_name"])
                ids = (config["job"], config["shard"])
                took = await timed(conn, budget.statement_timeout, [
                    (sql.CANARY_READ, ids), (sql.CANARY_WRITE, (*ids, *told.report))])
                _say({"at": start, "s": took})
            except Exception as exc:
                _say({"error": one_line(exc)})
                if conn is not None:
                    conn.terminate()
                conn = None
                await anyio.sleep(1.0)
            await anyio.sleep(told.every)


async def _hear(told: _Told, scope: anyio.CancelScope) -> None:
    while line := await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
        message = json.loads(line)
        told.every, told.report = message["every"], tuple(message["report"])
    scope.cancel()  # the runner is gone


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    anyio.run(_main, backend="asyncio")
