"""``backfill status`` for people: the table, and ``--watch`` redrawing it in place on a
(pseudo-)terminal until Ctrl-C."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import anyio
import pytest

from backfill.cli import _watch_seconds
from tests.conftest import Database, cli, popen, seed_users, users_job, write_job
from tests.terminal import Terminal, lines
from tests.throttle_support import poll

pytestmark = pytest.mark.anyio

NAME = "users-display-name"
ROW = rf"^{NAME} +- +(?P<state>\w+) +(?P<done>[\d.]+)% +(?P<rows>[\d,]+) +(?P<batches>[\d,]+) "


async def test_watch_redraws_in_place_until_ctrl_c(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 4000)")
    job = write_job(tmp_path, users_job(batch={"size": 100, "sleep_seconds": 0.1}))
    runner = popen("run", job, env=db.env())
    await poll(lambda: db.fetchval("SELECT batches > 0 FROM backfill.checkpoints"), within=30)
    term = Terminal("status", "--watch", "0.3", NAME, env=db.env())
    try:
        with anyio.fail_after(60):
            first = await anyio.to_thread.run_sync(
                lambda: term.wait_for(ROW.replace(r"(?P<state>\w+)", "running"), within=30)
            )
            rows = int(first["rows"].replace(",", ""))
            later = rf"^{NAME} +- +running +[\d.]+% +(?!{first['rows']} )[\d,]+ "
            await anyio.to_thread.run_sync(lambda: term.wait_for(later, within=30))
            await anyio.to_thread.run_sync(lambda: term.wait_for(r"Ctrl-C to stop", within=5))
            term.interrupt()
            code = await anyio.to_thread.run_sync(lambda: term.wait(within=20))
    finally:
        term.close()
        runner.send_signal(signal.SIGTERM)
        runner.communicate(timeout=30)
    assert code == 0, "\n".join(lines(term.drawn)[-20:])
    drawn = lines(term.drawn)
    shown = [int(m["rows"].replace(",", "")) for line in drawn if (m := re.search(ROW, line))]
    assert len(set(shown)) >= 2 and shown == sorted(shown) and shown[0] == rows
    # Redrawn in place: the cursor goes back up over the last view, it does not scroll.
    assert re.search(r"\x1b\[\d*A", term.drawn)
    assert [line for line in drawn if line.startswith("JOB ")], "the table's header"
    assert "Traceback" not in term.drawn


async def test_status_table_with_a_name_shows_live_settings_and_runs(
    db: Database, tmp_path: Path
) -> None:
    await seed_users(db, "generate_series(1, 300)")
    assert cli("run", write_job(tmp_path, users_job()), env=db.env()).returncode == 0
    assert cli("set", NAME, "batch.size=50", env=db.env()).returncode == 0
    out = cli("status", NAME, env=db.env())
    assert out.returncode == 0, out.stderr
    text = out.stdout.splitlines()
    assert re.search(ROW.replace(r"(?P<state>\w+)", "succeeded"), text[2])
    assert f"{NAME}:" in text
    assert f"  {'batch.size':<30} 50  (live; job file: 100)" in text
    runs = text.index(next(line for line in text if line.startswith("RUN ")))
    assert text[runs].split() == ["RUN", "OUTCOME", "STARTED", "ENDED", "ROWS", "BATCHES", "HOST",
                                  "VERSION", "FINGERPRINT"]
    assert text[runs + 2].split()[1] == "succeeded"


def test_watch_takes_an_optional_number_of_seconds() -> None:
    assert _watch_seconds(["status", "--watch"]) == ["status", "--watch", "2"]
    assert _watch_seconds(["status", "--watch", NAME]) == ["status", "--watch", "2", NAME]
    assert _watch_seconds(["status", "--watch", "5", NAME]) == ["status", "--watch", "5", NAME]
    assert _watch_seconds(["status", "--watch=0.5"]) == ["status", "--watch=0.5"]
    assert _watch_seconds(["run", "job.toml"]) == ["run", "job.toml"]


async def test_watch_and_json_do_not_go_together(db: Database) -> None:
    out = cli("status", "--watch", "--json", env=db.env())
    assert out.returncode == 2 and "--json and --watch" in out.stderr
