"""The benchmark suite in smoke mode (tiny tables, one repetition), so its code never rots.

Only the shape of the results is checked, and that every scenario did all of its work: speed is
never asserted here (see docs/performance.md for the numbers and how to get them).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from backfill.pgtemp import ServerUnavailable, find_bindir
from benchmarks import frontier
from benchmarks import frontier_judge as judge
from benchmarks.__main__ import END, PAGE, START, paste
from benchmarks.options import Options, override

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
    # Per shape: its rows/s at the one batch size of a smoke run, and its server time.
    assert len(shapes["bars"]) == 3 * 2 and "| shape | batch |" in done.stdout

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
    """The frontier (``--only frontier``): its own files, every configuration in its round, the
    void rule applied, the bars and the report's tables."""
    out = tmp_path / "frontier.json"
    done = smoke(out, "--only", "frontier", "--set", "frontier_seed=7", timeout=120)
    f = json.loads(out.read_text())["frontier"]
    if "unavailable" in f:
        pytest.skip(f["unavailable"])
    names = {c.name for c in frontier.configurations(Options().smoked())}
    assert {"baseline", "fixed-2k", "budget-typical", "budget-typical-canary",
            "budget-typical-app", "budget-tail", "budget-tail-canary",
            "budget-measuring"} == names == set(f["configurations"])
    assert f["seed"] == 7 and f["rounds"] == 1 and set(f["void"]) == {"0"}
    assert [w["name"] for w in f["windows"]] == f["plan"][0]
    assert f["baseline"]["windows"] == 2 == f["plan"][0].count("baseline")
    assert all(w["app"]["transactions"] > 0 for w in f["windows"])
    assert not [(w["name"], w["error"]) for w in f["windows"] if w["error"]]  # every run ran
    assert all(w["rows_per_second"] is not None for w in f["windows"])
    assert all(w["hide_statements"] == w["name"].endswith("-canary") for w in f["windows"])
    assert all(isinstance(w["paces"], list) for w in f["windows"])
    for c in f["configurations"].values():  # void rounds are kept, marked, out of the medians
        assert [r["void"] for r in c["rounds"]] == [f["void"]["0"] is not None] * c["windows"]
    assert {b["target"].split(":")[0] for b in f["bars"]} == names - {"baseline", "fixed-2k"}
    assert "**Void rule**" in done.stdout and "| budget-typical-canary |" in done.stdout
    assert "| target | measured | bar | met |" in done.stdout
    assert out.with_suffix(".md").read_text() in done.stdout
    assert "path" in f["plot"] or "matplotlib" in f["plot"]["unavailable"]


def _window(name: str, r: int, t: float, mean: float, p99: float, rows: float = 0.0
            ) -> dict[str, Any]:
    """A synthetic frontier window centred on ``t`` (10 s long, its settle before it)."""
    app = {"transactions": 100, "mean_ms": mean, "p99_ms": p99}
    return {"name": name, "round": r, "window": [t - 5, t + 5], "settle": [t - 10, t - 5],
            "app": app, "settle_app": app, "rows_per_second": rows,
            "settle_rows_per_second": rows}


def test_frontier_interpolates_the_baseline_in_time() -> None:
    points = [(10.0, 2.0), (0.0, 1.0)]
    assert judge.interpolate(points, 5.0) == 1.5
    assert judge.interpolate(points, -3.0) == 1.0 and judge.interpolate(points, 99.0) == 2.0
    assert judge.interpolate([], 1.0) is None
    windows = [_window("baseline", 0, 0.0, 1.0, 2.0), _window("fixed-2k", 0, 5.0, 3.0, 6.0),
               _window("baseline", 0, 10.0, 2.0, 4.0), _window("fixed-5k", 0, 20.0, 4.0, 4.0)]
    judge.judge(windows)
    assert windows[1]["ratio"] == {"mean": 2.0, "p99": 2.0}  # over 1.5 and 3.0
    assert windows[3]["ratio"] == {"mean": 2.0, "p99": 1.0}  # past the last: the nearest
    assert windows[1]["settle_ratio"]["mean"] == 3.0  # its settle, before the first baseline
    assert windows[0]["ratio"]["mean"] == 0.5  # a baseline against the others


def test_frontier_void_rule() -> None:
    """A round is void when a baseline is off its neighbours' line by > 1.3x (mean) or > 1.6x
    (p99), or with fewer than two measured baselines; void rounds leave the medians."""
    steady = [_window("baseline", 0, t, 1.0 + t / 100, 2.0) for t in (0.0, 20.0, 40.0)]
    off_p99 = [_window("baseline", 1, 60.0, 1.0, 2.0), _window("baseline", 1, 80.0, 1.0, 3.5),
               _window("baseline", 1, 100.0, 1.0, 2.0)]
    alone = [_window("baseline", 2, 120.0, 1.0, 2.0)]
    fixed = [_window("fixed-2k", r, 10.0 + 60 * r, 1.1, 2.2, rows=2000.0 + r) for r in range(3)]
    windows = steady + off_p99 + alone + fixed
    void = judge.void_rounds(windows)
    assert void[0] is None and "p99 at 1.75x" in str(void[1]) and "1 measured" in str(void[2])
    assert judge.void_rounds([*steady[:2], _window("baseline", 0, 40.0, 1.4, 2.0)])[0] is None
    for mean in (2.0, 0.9):  # 1.43x and 0.64x the last one's (at the end: the nearest)
        assert judge.void_rounds([*steady, _window("baseline", 0, 60.0, mean, 2.0)])[0]
    judge.judge(windows)
    c = judge.per_config(windows, void)["fixed-2k"]
    assert [r["void"] for r in c["rounds"]] == [False, True, True]
    assert c["rows_per_second"] == 2000.0 and c["valid_windows"] == 1


def test_frontier_rounds_are_shuffled_with_baselines_spread() -> None:
    configs = frontier.configurations(Options())
    names = [c.name for c in configs]
    assert len(names) == 11 and names[0] == "baseline" and "fixed-40k" not in names
    assert [c.name for c in configs if c.hide_statements] == [
        "budget-typical-canary", "budget-tail-canary"]
    plan = frontier.schedule(names, 4, 3, 24)
    assert plan == frontier.schedule(names, 4, 3, 24) and len(plan) == 3
    assert len({tuple(r) for r in plan}) == 3  # a new order every round
    for one in plan:
        assert one[0] == "baseline" and one.count("baseline") == 4
        assert sorted(n for n in one if n != "baseline") == sorted(names[1:])
        at = [i for i, name in enumerate(one) if name == "baseline"]
        assert max(b - a for a, b in itertools.pairwise(at)) <= 4  # spread, not bunched


def test_frontier_bars_and_pace_lines() -> None:
    opts = Options()
    rounds = [{"void": False, "rows_per_second": v} for v in (5000.0, 6000.0)]
    configs = {
        "fixed-2k": {"rows_per_second": 2000.0, "mean_ratio": 1.05, "p99_ratio": 1.2},
        "fixed-10k": {"rows_per_second": 10_000.0, "mean_ratio": 1.25, "p99_ratio": 2.0},
        "budget-typical": {"rows_per_second": 5500.0, "mean_ratio": 1.14, "p99_ratio": 1.5,
                           "rounds": rounds},
    }
    found = {b["target"].split(" (")[0]: b["met"] for b in frontier.bars(configs, opts)}
    assert found == {
        "budget-typical: rows/s per valid round, max / min": True,  # 1.2
        "budget-typical: mean ratio": True,
        "budget-typical: rows/s over the fixed paces' at a mean of 1.15x": True,  # 5500 / 6000
        "budget-typical: p99 over a fixed pace's as fast": True,  # 1.5 / 1.55
    }
    stderr = "\n".join([
        json.dumps({"ts": "2026-12-07T08:00:01.500+00:00", "level": "info", "logger": "x",
                    "msg": "impact budget 20%: 6,200 rows/s, typical 1.14 <= 1.20", "rate": 6200}),
        json.dumps({"ts": "2026-12-07T08:00:02+00:00", "msg": "batch committed"}),
        "info    full speed, nobody else at work", "Traceback: not json", "",
    ])
    t0 = datetime(2026, 12, 7, 8, 0, 0, tzinfo=UTC).timestamp()
    assert frontier.pace_lines(stderr, t0) == [
        {"t": 1.5, "msg": "impact budget 20%: 6,200 rows/s, typical 1.14 <= 1.20", "rate": 6200},
        {"t": None, "msg": "full speed, nobody else at work"},
    ]


def test_set_overrides_any_option() -> None:
    opts = override(Options(), ["frontier_rounds=4", "frontier_window=25",
                                "frontier_rates=1000, 3000", "smoke=yes",
                                "pgbench_segment=-t,20"])
    assert (opts.frontier_rounds, opts.frontier_window) == (4, 25.0)
    assert opts.frontier_rates == (1000, 3000) and opts.smoke is True
    assert opts.pgbench_segment == ("-t", "20")
    for wrong in ("nope=1", "frontier_rounds", "frontier_rounds=x", "smoke=maybe"):
        with pytest.raises(ValueError, match="--set"):
            override(Options(), [wrong])
