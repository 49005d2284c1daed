"""The command line's fast path: which argument lines it takes from typer, and that it reads
them as typer does (anything else goes to ``backfill.cli``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backfill.commands import argv


def test_run_with_every_option_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BACKFILL_SHARD", raising=False)
    fast = argv.parse(["--log-level", "debug", "run", "job.toml", "--shard=1/4",
                       "--metrics-port", "0", "--progress-every", "2.5"])
    assert fast is not None
    verb, level, values = fast
    assert (verb, level) == (argv.FAST["run"], "debug")
    assert values == {"path": Path("job.toml"), "shard": "1/4", "metrics_port": 0,
                      "progress_every": 2.5}


def test_the_shard_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKFILL_SHARD", "2/3")
    fast = argv.parse(["run", "job.toml"])
    assert fast is not None and fast[2]["shard"] == "2/3"
    fast = argv.parse(["run", "job.toml", "--shard", "0/3"])
    assert fast is not None and fast[2]["shard"] == "0/3"


@pytest.mark.parametrize("line", [
    [], ["--help"], ["--version"], ["run"], ["run", "--help"], ["run", "a.toml", "b.toml"],
    ["run", "a.toml", "--metrics-port", "65536"], ["run", "a.toml", "--metrics-port", "x"],
    ["run", "a.toml", "--progress-every", "0.05"], ["run", "a.toml", "--shard"],
    ["run", "a.toml", "--shard", "1/2", "--shard", "0/2"], ["run", "a.toml", "--"],
    ["--log-level", "loud", "run", "a.toml"], ["status"], ["plan", "a.toml"],
], ids=" ".join)
def test_anything_else_goes_to_typer(line: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BACKFILL_SHARD", raising=False)
    assert argv.parse(line) is None
