"""The package as others adopt and start it: its license, its version, and how quickly the CLI
starts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from backfill import __version__

REPO = Path(__file__).resolve().parent.parent


def test_licensed_apache_2() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
    # PEP 639: the SPDX expression replaces license classifiers (setuptools refuses both).
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY pyproject.toml README.md LICENSE ./" in dockerfile, "the image carries it"


def _backfill(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )


def test_version_is_the_one_runs_record() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "backfill.__version__"}
    out = _backfill("-m", "backfill", "--version")
    assert (out.returncode, out.stdout, out.stderr) == (0, f"backfill {__version__}\n", "")


# What `backfill --help` must not load: the database driver, the metrics client, the models, the
# help formatter. Each command imports what it needs when it runs.
HEAVY = {"asyncpg", "prometheus_client", "pydantic", "pydantic_core", "pydantic_settings", "rich",
         "anyio"}


def _imported(*args: str) -> set[str]:
    out = _backfill("-X", "importtime", "-m", "backfill", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \| +(\S+)$", out.stderr, re.M)
    assert "backfill.cli" in names, out.stderr[-2000:]
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("args", [["--help"], ["--version"]], ids=" ".join)
def test_help_and_version_import_nothing_heavy(args: list[str]) -> None:
    heavy = _imported(*args) & HEAVY
    assert not heavy, f"backfill {' '.join(args)} imports {sorted(heavy)}"


