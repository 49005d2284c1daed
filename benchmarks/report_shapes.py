"""The copy and delete jobs' table and bars (issue 17), pasted into docs/performance.md under
"Copy and delete jobs" between their own markers."""

from __future__ import annotations

from typing import Any

from benchmarks.bars import num, span
from benchmarks.shapes import LABELS
from benchmarks.stats import summary

START, END = "<!-- shapes:start -->", "<!-- shapes:end -->"


def markdown(results: dict[str, Any]) -> str:
    """The section's tables, or "" when it did not run."""
    section = results.get("shapes")
    if not section:
        return ""
    lines = [
        f"{section['pairs']} paired, interleaved repetitions on {section['rows']:,} rows; "
        "rows/s are medians; ratios are the median of the pairs' ratios (their range, over how "
        "many pairs); the runner's is its whole process, start-up included, and \"without "
        "start-up\" its run as the server recorded it:",
        "",
        "| shape | batch | one statement rows/s | procedure rows/s | runner rows/s | "
        "runner / procedure | without start-up | runner / one statement |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    samples = section["samples"]
    for shape, sizes in section["paired"].items():
        one = _rate(samples, f"statement-{shape}")
        for size, paired in sizes.items():
            runner = f"runner-{shape}-{size}"
            lines.append(
                f"| {LABELS[shape]} | {size} | {one} | "
                f"{_rate(samples, f'procedure-{shape}-{size}')} | {_rate(samples, runner)} | "
                f"{span(paired['procedure']['whole'])} | {span(paired['procedure']['in_run'])} | "
                f"{span(paired['statement']['whole'])} |"
            )
    if "runner_unavailable" in section:
        lines += ["", f"The runner: not measured ({section['runner_unavailable']})."]
    if section["incomplete"]:
        missed = ", ".join(section["incomplete"])
        lines += ["", f"Runs that did not do all of their work: {missed}."]
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for b in section["bars"]:
        met = "n/a" if b["met"] is None else ("yes" if b["met"] else "**no**")
        lines.append(f"| {b['target']} | {b['text']} | {met} |")
    return "\n".join(lines) + "\n"


def _rate(samples: dict[str, list[dict[str, Any]]], name: str) -> str:
    return num(summary([s["rows_per_second"] for s in samples.get(name, [])])["median"], 0)
