"""``backfill manifest``: the overlays in k8s/jobs/ are exactly what it writes for the example
jobs, and bad input is refused before anything is written. (Rendering and validating what it
writes: tests/test_k8s.py.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from backfill import manifest
from backfill.errors import ConfigError
from backfill.job import load_job
from tests.conftest import REPO, cli

EXAMPLES = sorted((REPO / "jobs").glob("*.toml"))


def _name(path: Path) -> str:
    return str(tomllib.loads(path.read_text())["name"])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_example_overlays_are_what_manifest_writes(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    out = f"k8s/jobs/{_name(path)}"
    made = manifest.overlay(f"jobs/{path.name}", out)
    for name, text in made.files.items():
        committed = REPO / out / name
        assert committed.exists() and committed.read_text() == text, (
            f"{committed.relative_to(REPO)} differs from what `backfill manifest` writes: "
            f"regenerate it with `backfill manifest jobs/{path.name} --out {out}`"
        )
    assert {p.name for p in (REPO / out).iterdir()} == set(made.files)


def test_the_examples_cover_every_shape() -> None:
    """An example of each shape (an update, a copy, a delete with an archive), so that the test
    above checks ``backfill manifest`` for each, and tests/test_k8s.py renders and validates
    their overlays."""
    shapes = {load_job(path).shape for path in EXAMPLES}
    assert shapes == {"update", "copy", "archive"}


def test_the_base_image_is_the_placeholder_manifest_replaces() -> None:
    text = (manifest.BASE / "job.yaml").read_text()
    assert re.search(rf"^\s+image: {re.escape(manifest.BASE_IMAGE)}:[\w.-]+$", text, re.M)


def test_a_clone_finds_its_base() -> None:
    assert manifest.find_base(None) == (REPO / "k8s" / "base").resolve()


BAD = {
    "no tag": (["--image", "registry.example.com/backfill"], "--image: "),
    "upper case": (["--image", "Registry/Backfill:1"], "--image: "),
    "latest": (["--image", "registry.example.com/backfill:latest"], "not :latest"),
    "too many shards": (["--shards", "2000"], "--shards: "),
    "no base there": (["--base", "nowhere"], "--base: no kustomization.yaml in nowhere"),
    "the base itself": (["--base", "{out}"], "the overlay cannot be the base itself"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_writes_nothing(case: str, tmp_path: Path) -> None:
    args, message = BAD[case]
    out = tmp_path / "overlay"
    if "{out}" in args:
        out.mkdir()
        (out / "kustomization.yaml").write_text(manifest.HEADER + "\n")
        args = [a.replace("{out}", str(out)) for a in args]
    done = cli("manifest", REPO / "jobs" / "users_display_name.toml", "--out", out, *args, env={})
    assert done.returncode == 78, done.stderr
    assert done.stderr.startswith("backfill: error: ") and message in done.stderr, done.stderr
    assert not (out / "job.toml").exists()


def test_a_bad_job_file_or_name_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((REPO / "jobs" / "users_display_name.toml").read_text().replace(
        'name  = "users-display-name"', 'name  = "' + "x" * 55 + '"'))
    done = cli("manifest", bad, "--out", tmp_path / "o", env={})
    assert done.returncode == 78 and "cannot name a Kubernetes Job" in done.stderr, done.stderr
    bad.write_text(bad.read_text().replace("size          = 1000", "size = 0"))
    with pytest.raises(ConfigError, match=r"batch\.size"):
        manifest.overlay(str(bad), str(tmp_path / "o"))


def test_a_hand_written_overlay_is_replaced_only_with_force(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "kustomization.yaml").write_text("resources: [../base]\n")
    job = REPO / "jobs" / "users_display_name.toml"
    refused = cli("manifest", job, "--out", out, env={})
    assert refused.returncode == 78 and "--force" in refused.stderr
    assert (out / "kustomization.yaml").read_text() == "resources: [../base]\n"
    forced = cli("manifest", job, "--out", out, "--force", env={})
    assert forced.returncode == 0, forced.stderr
    assert (out / "kustomization.yaml").read_text().startswith(manifest.HEADER)
    again = cli("manifest", job, "--out", out, env={})  # its own file: replaced without --force
    assert again.returncode == 0 and f"kubectl apply -k {out}" in again.stdout
