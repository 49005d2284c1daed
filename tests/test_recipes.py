"""The recipes in docs/recipes/ work as written: every fenced block of a page runs in order on a
real database, as a user would run it (``sql`` blocks through one connection, ``backfill``
lines of ``sh`` blocks as the CLI in a process, each exiting 0), while an application writes to
the table by name between the steps (through the sync trigger, the cut-over, the way back); a
block that starts with ``-- returns no rows`` must return none; each ``toml`` block is the
example job file in jobs/ that the page's commands run, byte for byte; a ``plpgsql`` block is
the sync trigger ``backfill plan`` shows for it, as it shows it."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, Database, cli

RECIPES = REPO / "docs" / "recipes"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)
EMPTY = "-- returns no rows"


@dataclass(frozen=True)
class Application:
    """What the application writes while the old table is live (after ``starts_after``, until
    the cut-over renames it), and what it writes to the new table afterwards."""

    starts_after: str
    writes: str
    after_cut_over: str | None = None


APPLICATIONS = {
    "partition-a-table.md": Application(
        starts_after="backfill run",
        writes="""
            INSERT INTO public.orders (customer_id, total_cents) VALUES (1, 100), (2, 200);
            UPDATE public.orders SET total_cents = total_cents + 1 WHERE id % 997 = 0;
            UPDATE public.orders SET created_at = created_at + interval '1 day'
            WHERE id % 1009 = 0;
            DELETE FROM public.orders WHERE id IN (
                SELECT id FROM public.orders WHERE id % 13 = 0 ORDER BY id LIMIT 3);""",
        after_cut_over="INSERT INTO public.orders (customer_id, total_cents) VALUES (3, 300)",
    ),
    "split-a-table.md": Application(
        starts_after="backfill run",
        writes="""
            INSERT INTO public.profiles (email, name) VALUES ('new' || clock_timestamp(), 'n');
            UPDATE public.profiles SET name = name || '+' WHERE id % 997 = 0;
            DELETE FROM public.profiles WHERE id IN (
                SELECT id FROM public.profiles WHERE id % 13 = 0 ORDER BY id LIMIT 3);""",
        after_cut_over="INSERT INTO public.profiles (email, name) VALUES ('after', 'a')",
    ),
    "bigint-key.md": Application(
        starts_after="backfill run",
        writes="""
            INSERT INTO public.accounts (email) VALUES ('new' || clock_timestamp());
            UPDATE public.accounts SET balance = balance + 1 WHERE id % 997 = 0;
            DELETE FROM public.accounts WHERE id IN (
                SELECT id FROM public.accounts WHERE id % 13 = 0 ORDER BY id LIMIT 3);""",
        after_cut_over="INSERT INTO public.accounts (email) VALUES ('after@example.com')",
    ),
    "retention-with-archive.md": Application(
        starts_after="CREATE TABLE public.events (",
        writes="""
            INSERT INTO public.events (kind) VALUES ('fresh'), ('fresh');
            UPDATE public.events SET payload = '{"seen": true}'
            WHERE id % 997 = 0 AND created_at > now() - interval '30 days';
            DELETE FROM public.events WHERE id IN (SELECT id FROM public.events
                WHERE created_at > now() - interval '30 days' ORDER BY id LIMIT 3);""",
    ),
}


def blocks(page: Path) -> list[tuple[str, str]]:
    """The page's fenced blocks, in order, as (language, text)."""
    return _BLOCK.findall(page.read_text())


def commands(text: str) -> list[list[str]]:
    """The ``backfill`` command lines of an ``sh`` block, comments dropped."""
    found = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "backfill":
            found.append(words[1:])
    return found


def test_every_recipe_is_tested() -> None:
    assert {p.name for p in RECIPES.glob("*.md")} == set(APPLICATIONS)


@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_the_job_file_shown_is_the_example_in_jobs(name: str) -> None:
    found = blocks(RECIPES / name)
    (shown,) = [text for lang, text in found if lang == "toml"]
    paths = {args[1] for lang, text in found if lang == "sh" for args in commands(text)
             if args[0] in ("plan", "run", "verify")}
    (path,) = paths
    assert (REPO / path).read_text() == shown, f"{name}: its job file differs from {path}"


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(APPLICATIONS))
async def test_a_recipe_works_as_written(name: str, db: Database) -> None:
    app = APPLICATIONS[name]
    live = False
    found = blocks(RECIPES / name)
    jobs = {args[1] for lang, text in found if lang == "sh" for args in commands(text)
            if args[0] == "run"}
    conn = await db.connect()
    try:
        for lang, text in found:
            if live:
                await conn.execute(app.writes)
            if lang == "sql" and text.startswith(EMPTY):
                rows = await conn.fetch(text)
                assert rows == [], f"{name}: {text.splitlines()[1]}... returned {rows[:5]}"
            elif lang == "sql":
                await conn.execute(text)
            elif lang == "sh":
                for args in commands(text):
                    done = cli(*args, env=db.env())
                    assert done.returncode == 0, (
                        f"{name}: backfill {' '.join(args)} exited {done.returncode}\n"
                        f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
                    )
            elif lang == "plpgsql":  # the sync trigger, as `plan` shows it before the run
                (path,) = jobs
                shown = cli("plan", path, env=db.env())
                assert text.strip() in shown.stdout, f"{name}: plan shows another trigger"
            if app.starts_after in text:
                live = True
        if app.after_cut_over is not None:  # the new table takes the application's writes
            await conn.execute(app.after_cut_over)
    finally:
        await conn.close()
