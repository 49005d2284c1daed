"""The documentation holds together: every relative link in README.md and docs/*.md points at a
file that exists, every ``#anchor`` at a heading of that page (as GitHub names it), every page in
docs/ (recipes included) is linked from the README, and the README stays a page one reads first."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from backfill.job import parse_job

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
README_MAX_LINES = 250

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text outside fenced code blocks and code spans (where brackets are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation dropped
    (letters, digits, ``_`` and ``-`` kept), each space a ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor; a repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[str]:
    return _LINK.findall(prose(page.read_text()))


def test_slugs_follow_github() -> None:
    assert slug("`backfill status`: pace from anywhere") == "backfill-status-pace-from-anywhere"
    assert slug("Throttling and live control") == "throttling-and-live-control"
    assert slug("What to do on exit 75 (and 69)?") == "what-to-do-on-exit-75-and-69"
    assert slug("max_rows_per_second, the rate ceiling") == "max_rows_per_second-the-rate-ceiling"


def test_link_pattern_finds_what_markdown_links() -> None:
    text = "see [a](x.md#b), [`c`](docs/) and [d [e]](f.md), not `[g](h.md)` or\n```\n[i](j)\n```"
    assert _LINK.findall(prose(text)) == ["x.md#b", "docs/", "f.md"]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: {dest.relative_to(REPO)} does not exist")
        elif REPO not in dest.parents and dest != REPO:
            broken.append(f"{target}: outside the repository")
        elif anchor:
            if dest.suffix != ".md":
                broken.append(f"{target}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest):
                broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, "\n".join(broken)


def test_readme_links_every_docs_page_and_stays_short() -> None:
    readme = REPO / "README.md"
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(readme)}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    lines = len(readme.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move reference to docs/"


_TOML = re.compile(r"^```toml\n(.*?)^```$", re.M | re.S)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_job_file_shown_is_valid(page: Path) -> None:
    """A ``toml`` block with a ``name`` is a whole job file: it must pass validation as shown
    (the blocks without one are excerpts of a job file)."""
    for text in _TOML.findall(page.read_text()):
        data = tomllib.loads(text)
        if "name" in data:
            parse_job(data, source=f"{page.name}: job {data['name']}")
