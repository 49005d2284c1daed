"""The PostgreSQL versions the docs claim are the ones CI tests: README and docs/connections.md
name 15, 16 and 18; .ci/run runs the version tests on 16 and 18, and the table of what was tested
on which version lists, for those, exactly the test files .ci/run runs there."""

from __future__ import annotations

import re

from tests.conftest import REPO

CI = (REPO / ".ci" / "run").read_text()
DOC = (REPO / "docs" / "connections.md").read_text()


def _version_tests() -> set[str]:
    block = re.search(r"VERSION_TESTS=\((.*?)\)", CI, re.S)
    assert block, ".ci/run has no VERSION_TESTS"
    return set(block.group(1).split())


def test_ci_runs_the_readme_command_then_the_other_majors() -> None:
    assert "python3 -m pip install -q -e '.[test]' && python3 -m pytest\n" in CI
    majors = re.findall(r'"(\d+) [\w-]+==[\d.]+ \w+"', CI)
    assert majors == ["16", "18"]
    docs = " ".join(p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")])
    assert "Supported PostgreSQL versions: 15, 16 and 18" in " ".join(docs.split())
    assert "**15, 16 and 18.**" in DOC
    for path in _version_tests():
        assert (REPO / path).is_file(), path


def test_the_docs_table_is_what_ci_runs() -> None:
    rows = [line for line in DOC.splitlines() if line.startswith("| ") and "tests/" in line]
    tested: set[str] = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        files = set(re.findall(r"tests/[\w/]+\.py", cells[0]))
        assert files, row
        if cells[2] == "yes" or cells[3] == "yes":
            assert cells[2] == cells[3] == "yes", row
            tested |= files
    assert tested == _version_tests() - {"tests/faults/test_tls.py"}
