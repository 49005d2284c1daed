"""``python3 -m benchmarks``: the whole benchmark in one run (see docs/performance.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

import anyio

from benchmarks import report, report_frontier, report_shapes
from benchmarks.options import ALIASES, DEFAULT_SECTIONS, RESULTS, SECTIONS, Options, override
from benchmarks.suite import run_suite

# Where --readme pastes the tables (the name stays: it is what the docs and habits call it).
PAGE = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
START, END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


def parse(argv: list[str]) -> tuple[Options, bool]:
    defaults = Options()
    p = argparse.ArgumentParser(prog="python3 -m benchmarks", description=__doc__)
    p.add_argument("--rows", type=int, default=defaults.rows,
                   help="rows in the users table (default 1M)")
    p.add_argument("--big-rows", type=int, default=defaults.big_rows,
                   help="rows of the larger table for RSS at scale; 0 skips it (default 5M)")
    p.add_argument("--repeat", type=int, default=defaults.repeat,
                   help="repetitions of each throughput scenario (default 3)")
    p.add_argument("--load-seconds", type=float, default=defaults.load_seconds,
                   help="length of each effect-on-others window (default 6)")
    p.add_argument("--pairs", type=int, default=defaults.pairs,
                   help="paired repetitions of the fast path (default 5)")
    p.add_argument("--step-rows", type=int, default=defaults.step_rows,
                   help="rows of the load step's table (default 8M: outlasts the step)")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated sections to run: {', '.join(SECTIONS)}; "
                        + "; ".join(f"{k} = {','.join(v)}" for k, v in ALIASES.items()))
    p.add_argument("--scenarios", default="",
                   help="comma-separated scenario names to run (default: all), e.g. "
                        "procedure-1000,runner-1000")
    p.add_argument("--out", type=Path, default=None,
                   help="where the JSON goes (default results/latest.json; for --only frontier "
                        "a new results/frontier-<UTC date-time>.json, with its .md and .png)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override any Options field (repeatable; typed by the field, tuples "
                        "comma-separated), e.g. --set frontier_rounds=4 --set "
                        "frontier_window=25; applied after --smoke")
    p.add_argument("--smoke", action="store_true",
                   help="tiny tables, one repetition: checks the code, numbers mean nothing")
    p.add_argument("--readme", action="store_true",
                   help="also paste the tables into docs/performance.md between the benchmark "
                        "markers")
    a = p.parse_args(argv)
    sections = _sections(p, a.only)
    out = a.out or (fresh(RESULTS, "frontier") if sections == ("frontier",) else defaults.out)
    if a.repeat < 1 or a.rows < 1 or a.big_rows < 0 or a.pairs < 1 or a.step_rows < 1:
        p.error("--repeat, --pairs, --rows and --step-rows must be positive, --big-rows at least 0")
    opts = Options(rows=a.rows, big_rows=a.big_rows, repeat=a.repeat, pairs=a.pairs,
                   step_rows=a.step_rows,
                   load_seconds=a.load_seconds, sections=sections, out=out,
                   scenarios=tuple(s.strip() for s in a.scenarios.split(",") if s.strip()))
    if a.smoke:
        opts = opts.smoked()
    try:
        opts = override(opts, a.set)
    except ValueError as error:
        p.error(str(error))
    if a.readme and a.smoke:
        p.error("--readme with --smoke would publish meaningless numbers")
    return opts, a.readme


def fresh(directory: Path, stem: str) -> Path:
    """``directory/stem-<UTC date-time>.json``, a name no earlier result has (its .md and
    .png neither)."""
    now = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"{stem}-{now}.json"
    n = 1
    while any(path.with_suffix(s).exists() for s in (".json", ".md", ".png")):
        n += 1
        path = directory / f"{stem}-{now}-{n}.json"
    return path


def _sections(p: argparse.ArgumentParser, only: str) -> tuple[str, ...]:
    """The sections ``--only`` names (aliases expanded), in the order of SECTIONS."""
    names = {s.strip() for s in only.split(",") if s.strip()}
    expanded = set().union(*(ALIASES.get(n, (n,)) for n in names)) if names else set()
    if unknown := expanded - set(SECTIONS):
        p.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    return tuple(s for s in SECTIONS if s in expanded)


def paste(page: Path, table: str, markers: tuple[str, str] = (START, END)) -> bool:
    start, end = markers
    text = page.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{start}\n{table}{end}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    opts, readme = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("backfill").setLevel(logging.WARNING)  # in-process runs: no chatter
    results = anyio.run(run_suite, opts, backend="asyncio")
    if opts.sections == ("frontier",):
        table = report_frontier.markdown(results)
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.with_suffix(".md").write_text(table)
    else:
        results["targets"] = report.targets(results)
        table = report.markdown(results)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = opts.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(opts.out)
    shapes = report_shapes.markdown(results)  # issue 17: under its own heading
    print(table + shapes)
    pastes = [(table, (START, END))] if set(opts.sections) - {"shapes", "frontier"} else []
    pastes += [(shapes, (report_shapes.START, report_shapes.END))] if shapes else []
    for text, markers in pastes if readme else []:
        if not paste(PAGE, text, markers):
            print(f"{PAGE} has no {' ... '.join(markers)} markers: not pasted", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
