"""What ``backfill status`` shows: the JSON document (``--json``) and the table for people.

Both come from the same entries, one per shard checkpoint (``entries``). The table has a row per
shard; below it, per shard, the lines that do not fit a column (``details``: skipped keys, the
last error, live control), then jobs not started yet, totals of sharded jobs, and with a job
name its runs. ``--watch`` redraws the same view in place.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

import anyio
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from backfill import commands, control
from backfill.checkpoint import FAILED, PAUSED, RUNNING, SUCCEEDED, THROTTLED, show_key
from backfill.commands import Rate, Status
from backfill.conninfo import ConnectParams
from backfill.errors import BackfillError, ConfigError
from backfill.job import DONE_WORDS
from backfill.live import LIVE_KEYS
from backfill.progress import fraction, human_seconds
from backfill.throttling.impact import describe

STALE = 60.0  # a running shard whose last commit is older than this: is its runner alive?
_STYLES = {SUCCEEDED: "green", FAILED: "red", PAUSED: "yellow", THROTTLED: "yellow",
           RUNNING: "cyan"}


def entries(st: Status) -> list[dict[str, Any]]:
    """One plain dict per shard checkpoint: its fields, progress, and pace (the JSON's jobs)."""
    out = []
    for c in st.checkpoints:
        entry = {k: _plain(v) for k, v in asdict(c).items()}
        entry["progress"] = 1.0 if c.state == SUCCEEDED else fraction(
            c.range_lo, c.range_hi, c.cursor)
        impact = st.impact.get((c.job, c.shard))
        entry["impact"] = None if impact is None else asdict(impact)
        entry["change"] = change_state(st.changes.get(c.job), c.state)
        out.append(entry | _rate(st.rates.get((c.job, c.shard))))
    return out


def document(st: Status) -> dict[str, Any]:
    """``status --json``."""
    jobs = entries(st)
    runs = [{k: _plain(v) for k, v in r.items()} for r in st.history]
    return {"jobs": jobs, "totals": totals(jobs), "runs": runs, "pending": st.pending}


def totals(jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each job's sum over its shards."""
    out: dict[str, dict[str, Any]] = {}
    for e in jobs:
        t = out.setdefault(
            e["job"], {"shards": 0, "succeeded": 0, "rows_updated": 0, "rows_skipped": 0,
                       "batches": 0}
        )
        t["shards"] += 1
        t["succeeded"] += e["state"] == SUCCEEDED
        for k in ("rows_updated", "rows_skipped", "batches"):
            t[k] += e[k]
    return out


async def fetch(params: ConnectParams, name: str | None) -> Status:
    """``commands.status``; a name that has no checkpoint (nor pending control) is an error."""
    st = await commands.status(params, name)
    if name is not None and not st.checkpoints and name not in st.pending:
        raise ConfigError(f"no checkpoint for job {name}")
    return st


async def watch(params: ConnectParams, name: str | None, *, every: float, out: Console) -> None:
    """Redraw the view every ``every`` seconds until cancelled (Ctrl-C). On a terminal it is
    redrawn in place; elsewhere each refresh is printed after the last. A refresh that fails
    after the first is shown, and retried."""
    st = await fetch(params, name)
    note, style = _fetched(every), "dim"
    with Live(console=out, auto_refresh=False) if out.is_terminal else _Printed(out) as live:
        while True:
            live.update(Group(Text(note, style=style), view(st, name)), refresh=True)
            await anyio.sleep(every)
            try:
                st = await fetch(params, name)
                note, style = _fetched(every), "dim"
            except BackfillError as error:
                note, style = f"refresh failed ({error}); retrying every {every:g}s", "red"


def _fetched(every: float) -> str:
    return f"every {every:g}s, as of {datetime.now().astimezone():%H:%M:%S}; Ctrl-C to stop"


class _Printed:
    """``Live``'s interface off a terminal: every update is printed."""

    def __init__(self, out: Console) -> None:
        self.out = out

    def __enter__(self) -> _Printed:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, renderable: RenderableType, *, refresh: bool = False) -> None:
        self.out.print(renderable)
        self.out.print()


def view(st: Status, name: str | None) -> RenderableType:
    """The table and the lines below it."""
    jobs = entries(st)
    parts: list[RenderableType] = []
    if jobs:
        parts.append(_table(jobs))
    lines: list[str] = []
    for e in jobs:
        more = details(e, every=name is not None)
        if more:
            lines.append(f"{_label(e)}:")
            lines += more
    for job_name, overrides in st.pending.items():
        lines.append(f"{job_name}: not started yet; its first run starts with:")
        lines += _live_lines(job_name, {}, overrides, every=False)
    last = {e["job"]: e for e in jobs}
    for job_name, t in totals(jobs).items():
        if t["shards"] > 1:
            lines.append(
                f"{job_name} total: {t['succeeded']}/{t['shards']} shards succeeded, "
                f"rows {t['rows_updated']:,}{_done(last[job_name])}, batches {t['batches']:,}"
            )
    if not jobs and not st.pending:
        lines.append("no jobs yet: `backfill run JOBFILE` starts one")
    parts += [Text(line) for line in lines]
    if st.history:
        parts.append(_runs(st.history))
    return Group(*parts)


# A copy job's table change (backfill.lifecycle), as `status` says it, and the next step.
_CHANGES = {
    "cut over": "cut over (the old table kept in sync: `backfill finish` or `rollback`)",
    "rolled back": "rolled back (the copy kept in sync: `backfill cutover` again)",
    "finished": "finished (no sync trigger left; the old table is yours to drop)",
}


def change_state(phase: str | None, state: str) -> str | None:
    """copying / copied / cut over / rolled back / finished, or None for a job without
    ``sync = "trigger"``."""
    if phase is None:
        return None
    if phase == "syncing":
        return "copied (sync trigger in place: `backfill cutover`)" if state == SUCCEEDED \
            else "copying (sync trigger in place)"
    return _CHANGES.get(phase, phase)


def details(e: dict[str, Any], *, every: bool) -> list[str]:
    """A shard's lines under the table: skipped keys, the last error, live control (every live
    setting with ``every``, else only the overrides)."""
    lines = []
    if e.get("change") and e["shard"] == 0:
        lines.append(f"  table change: {e['change']}")
    if e["impact"] is not None and (every or e["state"] in (RUNNING, THROTTLED)):
        lines.append("  " + impact_line(e["impact"]))
    if e["rows_skipped"]:
        skipped = ", ".join(map(show_key, e["skipped_keys"]))
        lines.append(f"  skipped {e['rows_skipped']}: {skipped}")
    if e["error"]:
        lines.append(f"  last error: {e['error']}")
    if every or e["control"]:
        lines += _live_lines(e["job"], e["settings"], e["control"], every=every)
    return lines


def impact_line(i: dict[str, Any]) -> str:
    """What the shard's impact budget measured last (see ``commands.Impact``), and how long
    ago when that is a while."""
    age = i["age_seconds"]
    when = f" ({human_seconds(age)} ago)" if age >= 5 else ""
    return describe(i["ratio"], i["limit"], i["rate"], i["current_seconds"],
                    i["baseline_seconds"], i["deciding"]) + when


def pace(e: dict[str, Any]) -> tuple[str, str]:
    """``("1,234/s", "5m20s")`` from the run history; ETA ``5m20s?`` when the last commit is
    over a minute old (is the runner alive?), ``?`` while paused by an operator (when it goes
    on is theirs to say); blank when unknown."""
    rate = "" if e["rows_per_second"] is None else f"{e['rows_per_second']:,.0f}/s"
    eta = ""
    if e["eta_seconds"] is not None and e.get("state") == PAUSED:
        eta = "?"
    elif e["eta_seconds"] is not None:
        age = e["last_commit_age_seconds"]
        eta = human_seconds(e["eta_seconds"]) + ("?" if age is not None and age >= STALE else "")
    return rate, eta


def _table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for header, justify in (
        ("JOB", "left"), ("SHARD", "right"), ("STATE", "left"), ("DONE", "right"),
        ("ROWS", "right"), ("BATCHES", "right"), ("RATE", "right"), ("ETA", "right"),
        ("CURSOR", "left"), ("UPDATED", "right"),
    ):
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for e in jobs:
        done = "?" if e["progress"] is None else f"{100 * e['progress']:.1f}%"
        rate, eta = pace(e)
        age = e["last_commit_age_seconds"]
        table.add_row(
            e["job"],
            f"{e['shard']}/{e['shards']}" if e["shards"] > 1 else "-",
            Text(e["state"], style=_STYLES.get(e["state"], "")),
            done,
            f"{e['rows_updated']:,}" + _done(e),
            f"{e['batches']:,}",
            rate,
            eta,
            show_key(e["cursor"]),
            "" if age is None else f"{human_seconds(age)} ago",
        )
    return table


def _done(e: dict[str, Any]) -> str:
    """What the rows became, but for an update (the column's plain meaning)."""
    return "" if e.get("shape", "update") == "update" else f" {DONE_WORDS[e['shape']]}"


def _runs(history: list[dict[str, Any]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title_justify="left")
    for header in ("RUN", "OUTCOME", "STARTED", "ENDED", "ROWS", "BATCHES", "HOST", "VERSION",
                   "FINGERPRINT"):
        table.add_column(header, no_wrap=True)
    for r in history:
        ended = r["ended_at"]
        table.add_row(
            str(r["id"]),
            Text(r["outcome"], style=_STYLES.get(r["outcome"], "")),
            _when(r["started_at"]),
            _when(ended),
            "" if ended is None else f"{r['rows_updated'] or 0:,}",
            "" if ended is None else f"{r['batches'] or 0:,}",
            r["host"] or "",
            f"v{r['version']}",
            r["fingerprint"] or "",
        )
    return table


def _live_lines(
    job: str, settings: dict[str, Any], overrides: dict[str, Any], *, every: bool
) -> list[str]:
    """Live control: a pause, and each setting's job-file and live value (all live settings
    with ``every``, else only the overridden ones)."""
    lines = [f"  paused by an operator: `backfill resume {job}` to go on"] if overrides.get(
        control.PAUSE_KEY
    ) else []
    for key in LIVE_KEYS:
        if key in overrides:
            was = control.show(settings.get(key, "?"))
            lines.append(f"  {key:<30} {control.show(overrides[key])}  (live; job file: {was})")
        elif every and key in settings:
            lines.append(f"  {key:<30} {control.show(settings[key])}")
    return lines


def _label(e: dict[str, Any]) -> str:
    return f"{e['job']} [{e['shard']}/{e['shards']}]" if e["shards"] > 1 else str(e["job"])


def _rate(rate: Rate | None) -> dict[str, Any]:
    if rate is None:
        return {"rows_per_second": None, "eta_seconds": None, "last_commit_age_seconds": None}
    return {
        "rows_per_second": None if rate.rows_per_second is None else round(rate.rows_per_second, 1),
        "eta_seconds": None if rate.eta_seconds is None else round(rate.eta_seconds),
        "last_commit_age_seconds": rate.last_commit_age_seconds,
    }


def _plain(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _when(value: datetime | None) -> str:
    return "" if value is None else f"{value:%Y-%m-%d %H:%M:%S}"
