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


def test_benchmark_smoke(tmp_path: Path) -> None:
    try:
        find_bindir()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    out = tmp_path / "latest.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
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

    growth = results["growth"]
    assert growth["dense"]["rows"] == rows
    assert growth["sparse"]["rows"] == rows
    assert growth["where_1pct"]["rows"] == rows // 100
    assert growth["big"]["rows"] == results["meta"]["options"]["big_rows"]

    assert {t["target"] for t in results["targets"]}
    assert "| scenario | rows/s |" in done.stdout and "| target | measured | met |" in done.stdout


def test_readme_option_pastes_into_the_performance_page(tmp_path: Path) -> None:
    """``--readme`` replaces what is between the markers of docs/performance.md, nothing else."""
    page = tmp_path / "performance.md"
    page.write_text(PAGE.read_text())
    assert paste(page, "| new | table |\n")
    text = page.read_text()
    head, rest = PAGE.read_text().split(START, 1)
    assert text == f"{head}{START}\n| new | table |\n{END}{rest.split(END, 1)[1]}"
