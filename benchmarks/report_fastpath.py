"""The fast path's table and bars (issues 11 and 20), next to the other tables of the report."""

from __future__ import annotations

from typing import Any

from benchmarks.bars import bar, num, span

# Runner / procedure rows/s, whole process, batches not waiting for the flush (the default).
GOALS = {1000: 1.05, 10_000: 1.1}
HELP_SECONDS, FIRST_BATCH_SECONDS, CPU_MS = 0.2, 0.3, 0.2  # issue 26: the first batch <= 0.3 s


def markdown(results: dict[str, Any]) -> list[str]:
    section = results.get("fastpath")
    if not section:
        return []
    lines = [
        f"Fast path: {section['pairs']} paired, interleaved whole-process repetitions; ratios "
        "are the median of the pairs' ratios (their range, over how many pairs); CPU is the "
        "`backfill run` process's user + system time a batch, without start-up less a 1-row "
        "run's:",
        "",
        "| batch | procedure rows/s | runner rows/s | runner / procedure | without start-up | "
        "runner CPU ms a batch: whole / without start-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, paired in section["paired"].items():
        size, _, mode = key.partition("-")  # "1000", or "1000-flush": wait_for_flush = true
        rates = paired["rows_per_second"]
        label = f"{size}, waits for the flush" if mode else size
        lines.append(
            f"| {label} | {num(rates[f'procedure-{size}']['median'], 0)} | "
            f"{num(rates[f'runner-{key}']['median'], 0)} | {span(paired['whole'])} | "
            f"{span(paired['in_run'])} | {_cpu(section, f'runner-{key}')} |"
        )
    lines += [*_uvloop(section), "", _startup(section), ""]
    return lines


def _cpu(section: dict[str, Any], name: str) -> str:
    cpu = section["cpu_ms_per_batch"].get(name)
    if cpu is None:
        return ""
    return f"{num(cpu['whole']['median'], 3)} / {num(cpu['without_startup']['median'], 3)}"


def _uvloop(section: dict[str, Any]) -> list[str]:
    uv = section["uvloop"]
    if "unavailable" in uv:
        return [f"| uvloop (`BACKFILL_UVLOOP=1`) | not available: {uv['unavailable']} | | | | |"]
    size = uv["batch_size"]
    rate = uv["rows_per_second"][f"runner-{size}-uvloop"]["median"]
    return [
        f"| {size}, runner on uvloop (ratio: against the runner without) | | {num(rate, 0)} | "
        f"{span(uv['whole'])} | {span(uv['in_run'])} | {_cpu(section, f'runner-{size}-uvloop')} |"
    ]


def _startup(section: dict[str, Any]) -> str:
    s = section["startup"]
    return (
        f"Start-up: `python -m backfill --help` takes {span(s['help_seconds'], 3, ' s')}. A run "
        f"on a 1-row table starts its first batch {span(s['first_batch_seconds'], 3, ' s')} "
        "after the process starts (the server's clock when the batch saved the checkpoint, "
        "less the batch's own duration, against the launcher's clock), has recorded its run "
        f"in `backfill.runs` at {num(s['run_opened_seconds']['median'], 3)} s, and ends at "
        f"{num(s['one_row_process_seconds']['median'], 3)} s, using "
        f"{num(s['one_row_cpu_seconds']['median'], 3)} s of CPU (medians)."
    )


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    section = results.get("fastpath")
    if not section:
        return []
    out = []
    for size, paired in section["paired"].items():
        limit = GOALS.get(int(size)) if size.isdigit() else None
        if limit is None:
            continue
        whole = paired["whole"]
        out.append(bar(
            f"fast path: runner >= {limit:.2f}x procedure rows/s, batch {size} (median of pairs)",
            whole["median"], limit, at_most=False,
            text=f"{span(whole)} whole process; {span(paired['in_run'])} without start-up",
        ))
    s = section["startup"]
    out.append(bar(
        f"fast path: `backfill --help` <= {HELP_SECONDS} s", s["help_seconds"]["median"],
        HELP_SECONDS, at_most=True, text=span(s["help_seconds"], 3, " s"),
    ))
    out.append(bar(
        f"fast path: first batch starts <= {FIRST_BATCH_SECONDS} s after the process",
        s["first_batch_seconds"]["median"], FIRST_BATCH_SECONDS, at_most=True,
        text=f"{span(s['first_batch_seconds'], 3, ' s')} (1-row runs)",
    ))
    small = min(int(size) for size in section["paired"] if size.isdigit())
    cpu = section["cpu_ms_per_batch"].get(f"runner-{small}")
    if cpu is not None:
        without = cpu["without_startup"]["median"]
        text = (f"{span(cpu['without_startup'], 3, ' ms')} without start-up; "
                f"{num(cpu['whole']['median'], 3)} ms with it")
        # The run's CPU less a 1-row run's: below zero, the two differ by less than their
        # noise, and the figure measures nothing.
        noise = without is not None and without < 0
        row = bar(f"fast path: runner CPU per batch <= {CPU_MS} ms, batch {small}",
                  None if noise else without, CPU_MS, at_most=True, text=text)
        if noise:
            row["text"] = ("not measurable in this run (the run's CPU less a 1-row run's is "
                           f"within their noise): {text}")
        out.append(row)
    return out
