"""The live progress bar, on a real (pseudo-)terminal: what it draws while a run goes, waits,
is paused and ends; and that off a terminal the log stays JSON lines."""

from __future__ import annotations

import json
import os
import re
import threading
from functools import partial
from pathlib import Path

import anyio
import pytest

from backfill import commands
from backfill.job import parse_job
from backfill.ranges import Shard
from tests.conftest import Database, cli, seed_users, users_job, write_job
from tests.terminal import Terminal, lines

pytestmark = pytest.mark.anyio

NAME = "users-display-name"
# name, bar, percent, rows, rows/s, ETA, batch size, what holds the run
BAR = (
    rf"^{NAME} +[━╸╺ ]+ +(?P<percent>\d+\.\d)% +(?P<rows>[\d,]+) rows +(?P<rate>[\d,]+) rows/s"
    r" +ETA (?P<eta>\S+) +batch (?P<batch>[\d,]+) +(?P<holds>.+)$"
)


async def test_the_bar_shows_progress_and_what_holds_the_run(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 3000)")
    job = write_job(tmp_path, users_job(
        batch={"size": 100, "sleep_seconds": 0.1}, throttle={"check_every": 0.2},
    ))
    term = Terminal("run", job, env=db.env())
    try:
        with anyio.fail_after(60):
            sleeping = await anyio.to_thread.run_sync(
                lambda: term.wait_for(BAR.replace("(?P<holds>.+)", "waiting: sleep"), within=30)
            )
            assert sleeping["batch"] == "100" and int(sleeping["rows"].replace(",", "")) > 0
            await commands.pause(db.params, NAME)
            await anyio.to_thread.run_sync(
                lambda: term.wait_for(r"waiting: paused \d+s$", within=20)
            )
            await commands.resume(db.params, NAME)
            code = await anyio.to_thread.run_sync(lambda: term.wait(within=40))
    finally:
        term.close()
    drawn = lines(term.drawn)
    assert code == 0, "\n".join(drawn[-20:])
    bars = [m for line in drawn if (m := re.search(BAR, line))]
    assert len(bars) >= 5, "\n".join(drawn)
    percents = [float(m["percent"]) for m in bars]
    assert percents == sorted(percents), "progress only goes forward"
    final = bars[-1]
    assert (final["percent"], final["rows"], final["holds"]) == ("100.0", "3,000", "succeeded")
    assert any(m["holds"] == "running" or m["holds"] == "waiting: sleep" for m in bars[:-1])
    assert any(m["eta"] not in ("?", "0s") for m in bars), "a measured ETA while it ran"
    assert not [line for line in drawn if line.startswith("{")], "no JSON on a terminal"
    assert f"job {NAME} done: 3,000 rows updated in 30 batches" in drawn[-1]
    assert await db.fetchval("SELECT count(*) FROM users WHERE touched <> 1") == 0


async def test_off_a_terminal_the_log_stays_json_lines(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 300)")
    out = cli("run", write_job(tmp_path, users_job()), env=db.env())
    assert out.returncode == 0, out.stderr
    *logged, done = out.stderr.splitlines()
    assert "\x1b" not in out.stderr and "━" not in out.stderr
    entries = [json.loads(line) for line in logged]
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    assert {"run started", "state"} <= {e["msg"] for e in entries}
    assert done == f"job {NAME} done: 300 rows updated in 3 batches"


async def test_one_bar_per_shard_when_a_process_runs_several(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shards run by the programmatic API in one process draw two bars on one terminal."""
    await seed_users(db, "generate_series(1, 2000)")
    job = parse_job(users_job(batch={"size": 100, "sleep_seconds": 0.02}))
    monkeypatch.setenv("COLUMNS", "140")
    master, slave = os.openpty()
    drawn: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(master, drawn), daemon=True)
    reader.start()
    with os.fdopen(slave, "w", encoding="utf-8") as tty:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for index in range(2):
                    tg.start_soon(partial(
                        commands.run, job, db.params, shard=Shard(index, 2), stream=tty
                    ))
    reader.join(timeout=10)
    shown = lines(b"".join(drawn).decode())
    for index in range(2):
        bar = BAR.replace(f"^{NAME}", rf"^{NAME} \[{index}/2\]")
        ends = [m for line in shown if (m := re.search(bar, line))]
        assert ends and ends[-1]["holds"] == "succeeded", "\n".join(shown[-10:])
    assert await db.fetchval("SELECT count(*) FROM users WHERE touched <> 1") == 0


def _drain(fd: int, into: list[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if not data:
            os.close(fd)
            return
        into.append(data)
