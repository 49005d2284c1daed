"""The package as others adopt and start it: its license, its version, and how quickly the CLI
starts."""

from __future__ import annotations

import tomllib
from pathlib import Path

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
