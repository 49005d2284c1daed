"""The benchmark suite in smoke mode (tiny tables, one repetition), so its code never rots.

Only the shape of the results is checked, and that every scenario did all of its work: speed is
never asserted here (see docs/performance.md for the numbers and how to get them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backfill.pgtemp import ServerUnavailable, find_bindir
from benchmarks.__main__ import END, PAGE, START, paste

REPO = Path(__file__).resolve().parent.parent


def smoke(out: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python3 -m benchmarks --smoke ARGS --out OUT``, which must succeed (skipped where no
    PostgreSQL can be started)."""
    try:
        find_bindir()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", *args, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    done = smoke(out)
    results = json.loads(out.read_text())
    assert results["meta"]["options"]["smoke"] is True
    rows = results["meta"]["options"]["rows"]

    throughput = results["throughput"]
    expected = {"update", "procedure-1000", "do-block", "runner-1000", "runner-sleep-0.05"}
    assert expected <= set(throughput["samples"])
    for name, samples in throughput["samples"].items():
        assert [(s["rows"], s["completed"]) for s in samples] == [(rows, True)], name

    effect = results["effect"]
    if "unavailable" not in effect:
        (kind,) = results["meta"]["options"]["load_kinds"]
        assert {"baseline", "update", "do-block", "runner-1000"} <= set(effect[kind])
        assert effect[kind]["baseline"]["pgbench"]["transactions"] > 0
        assert effect[kind]["runner-1000"]["writer"]["writes"] > 0
        assert "runner-impact" in effect[kind] or "runner-impact" in results["unavailable"]

    growth = results["growth"]
    assert growth["dense"]["rows"] == rows
    assert growth["sparse"]["rows"] == rows
    assert growth["where_1pct"]["rows"] == rows // 100
    assert growth["big"]["rows"] == results["meta"]["options"]["big_rows"]

    fastpath = results["fastpath"]
    for name, samples in fastpath["samples"].items():
        assert [(s["rows"], s["completed"]) for s in samples] == [
            (1 if name == "runner-1-row" else rows, True)
        ], name
    assert {"procedure-1000", "runner-1000", "runner-1-row"} <= set(fastpath["samples"])
    startup = fastpath["startup"]
    assert startup["help_seconds"]["n"] == results["meta"]["options"]["help_runs"]
    assert 0 < startup["run_opened_seconds"]["median"] < startup["first_batch_seconds"]["median"]
    assert startup["first_batch_seconds"]["median"] < startup["one_row_process_seconds"]["median"]
    assert fastpath["cpu_ms_per_batch"]["runner-1000"]["whole"]["median"] > 0
    assert "unavailable" in fastpath["uvloop"] or fastpath["uvloop"]["whole"]["n"] == 1

    shapes = results["shapes"]  # issue 17: every arm copied or deleted every row
    for name, samples in shapes["samples"].items():
        assert [(s["rows"], s["complete"]) for s in samples] == [(rows, True)], name
    for shape in ("copy", "delete", "archive"):
        assert {f"procedure-{shape}-1000", f"statement-{shape}"} <= set(shapes["samples"])
        assert f"runner-{shape}-1000" in shapes["samples"] or "runner_unavailable" in shapes
    assert len(shapes["bars"]) == 3 and "| shape | batch |" in done.stdout

    step = results["step"]
    if "unavailable" not in step:
        unthrottled = step["runs"]["unthrottled"]
        assert unthrottled["baseline"]["transactions"] > 0
        assert unthrottled["pgbench_on"]["transactions"] > 0
        assert unthrottled["backfill"]["rows"] > 0 and unthrottled["series"]["rows_per_second"]
        assert unthrottled["rows_per_second"]["off_before"] > 0
        assert "path" in step["plot"] or "matplotlib" in step["plot"]["unavailable"]
        if "path" in step["plot"]:
            assert Path(step["plot"]["path"]).read_bytes().startswith(b"\x89PNG")
    loop = results["open_loop"]
    if "unavailable" not in loop:
        assert loop["capacity"]["tps"] > 0 and loop["rate"] > 0
        measured = loop["runs"]["unthrottled"]
        assert measured["pgbench"]["transactions"] > 0
        assert measured["pgbench"]["lag_p99_ms"] is not None
        assert measured["backfill"]["rows"] > 0
    for section in (step, loop):  # the budget: measured (a window this short may end while it
        # still measures its baseline), or unavailable with why
        budget = section.get("runs", {}).get("runner-impact", {"unavailable": "n/a"})
        assert "unavailable" in budget or budget["backfill"]["exit_code"] in (0, 75, -15), budget

    assert {t["target"] for t in results["targets"]}
    assert any(t["target"].startswith("fast path:") for t in results["targets"])
    assert "| scenario | rows/s |" in done.stdout and "| target | measured | met |" in done.stdout


def test_readme_option_pastes_into_the_performance_page(tmp_path: Path) -> None:
    """``--readme`` replaces what is between the markers of docs/performance.md, nothing else."""
    page = tmp_path / "performance.md"
    page.write_text(PAGE.read_text())
    assert paste(page, "| new | table |\n")
    text = page.read_text()
    head, rest = PAGE.read_text().split(START, 1)
    assert text == f"{head}{START}\n| new | table |\n{END}{rest.split(END, 1)[1]}"


def test_frontier_smoke(tmp_path: Path) -> None:
    """The frontier (``--only frontier``): its own file and plot, every window measured."""
    out = tmp_path / "frontier.json"
    done = smoke(out, "--only", "frontier", timeout=240)
    f = json.loads(out.read_text())["frontier"]
    if "unavailable" in f:
        pytest.skip(f["unavailable"])
    assert {"baseline", "fixed-2k", "budget-typical", "budget-tail"} <= set(f["configurations"])
    assert f["baseline"]["windows"] == 2
    assert all(w["app"]["transactions"] > 0 for w in f["windows"])
    assert all(w["rows_per_second"] is not None for w in f["windows"])
    assert "| budget-typical |" in done.stdout
    assert "path" in f["plot"] or "matplotlib" in f["plot"]["unavailable"]
