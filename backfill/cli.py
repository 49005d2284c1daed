"""The command line: typer parses, ``anyio.run`` runs the matching function in
``backfill.commands``, and ``BackfillError`` becomes its exit code and a one-line message."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import typer
from pydantic import ValidationError

from backfill import commands, logs
from backfill.errors import BackfillError, ConfigError, ExitCode
from backfill.job import Job, load_job
from backfill.progress import fraction, human_seconds
from backfill.settings import ConnectParams, DatabaseSettings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Batched, resumable, gentle backfills for PostgreSQL.",
)
log = logging.getLogger("backfill.cli")
T = TypeVar("T")

JobPath = Annotated[Path, typer.Argument(help="Job file (TOML).", show_default=False)]
Name = Annotated[str, typer.Argument(help="Job name.", show_default=False)]


def _fail(error: BackfillError) -> typer.Exit:
    typer.echo(f"backfill: error: {error}", err=True)
    return typer.Exit(int(error.exit_code))


def _params() -> ConnectParams:
    try:
        return DatabaseSettings().params()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"connection settings: {first['loc'][-1]}: {first['msg']}") from exc


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return anyio.run(fn, backend="asyncio")
    except BackfillError as error:
        raise _fail(error) from None


def _job(path: Path) -> Job:
    try:
        return load_job(path)
    except BackfillError as error:
        raise _fail(error) from None


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    logs.setup(level=log_level)


@app.command()
def init() -> None:
    """Create the runner's state schema (needs CREATE; run once, e.g. by an admin)."""
    params = _params_or_exit()
    _run(lambda: commands.init(params))
    typer.echo("state schema 'backfill' is ready")


@app.command()
def plan(path: JobPath) -> None:
    """Validate, connect, and show the batch SQL, EXPLAIN of one batch, rows and duration."""
    job, params = _job(path), _params_or_exit()
    p = _run(lambda: commands.plan(job, params))
    typer.echo(f"job       {p.job}\ntable     {p.table}\nkey       {p.key}")
    typer.echo(f"range     {_key(p.range_lo)} .. {_key(p.range_hi)}")
    if p.cursor is not None:
        typer.echo(f"resumes   after {_key(p.cursor)}")
    typer.echo(
        f"rows      ~{p.rows_in_table:,} in table, "
        f"~{p.rows_matching:,} matching where (planner estimates)"
    )
    typer.echo(f"batches   ~{p.batches:,} of {job.batch.size}")
    typer.echo(
        f"duration  ~{human_seconds(p.estimated_seconds)} "
        f"(one batch took {p.batch_seconds * 1000:.1f} ms, measured and rolled back, "
        f"plus {job.batch.sleep_seconds}s sleep)"
    )
    typer.echo(f"\nbatch statement:\n{p.statement}\n\nEXPLAIN ANALYZE of one batch (rolled back):")
    typer.echo(p.explain)


@app.command()
def run(path: JobPath) -> None:
    """Run (or resume) a job. Ctrl-C or SIGTERM stops after the batch in flight."""
    job, params = _job(path), _params_or_exit()
    ckpt = _run(lambda: commands.run(job, params))
    typer.echo(
        f"job {job.name} done: {ckpt.rows_updated:,} rows updated in {ckpt.batches:,} batches"
        + (f", {ckpt.rows_skipped} skipped" if ckpt.rows_skipped else ""),
        err=True,
    )


@app.command()
def status(
    name: Annotated[str | None, typer.Argument(help="Job name (default: every job).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every job's checkpoint: state, cursor, rows, batches, progress; with NAME, its runs."""
    params = _params_or_exit()
    st = _run(lambda: commands.status(params, name))
    if name is not None and not st.checkpoints:
        raise _fail(ConfigError(f"no checkpoint for job {name}"))
    entries = [_status_entry(c) for c in st.checkpoints]
    if as_json:
        runs = [{k: _plain(v) for k, v in r.items()} for r in st.history]
        typer.echo(json.dumps({"jobs": entries, "runs": runs}, indent=2))
        return
    for e in entries:
        pct = "?" if e["progress"] is None else f"{100 * e['progress']:.1f}%"
        typer.echo(
            f"{e['job']}[{e['shard']}]  {e['state']:<11} {pct:>6}  rows {e['rows_updated']:,}  "
            f"batches {e['batches']:,}  cursor {_key(e['cursor'])}  updated {e['updated_at']}"
        )
        if e["rows_skipped"]:
            typer.echo(f"  skipped {e['rows_skipped']}: " + ", ".join(map(_key, e["skipped_keys"])))
        if e["error"]:
            typer.echo(f"  last error: {e['error']}")
    for r in st.history:
        typer.echo(
            f"  run {r['id']}: {r['outcome']:<11} {r['started_at']:%Y-%m-%d %H:%M:%S} .. "
            f"{r['ended_at'] or '':%Y-%m-%d %H:%M:%S}  rows {r['rows_updated'] or 0:,}  "
            f"batches {r['batches'] or 0:,}  {r['host']}  v{r['version']}  {r['fingerprint']}"
            if r["ended_at"]
            else f"  run {r['id']}: {r['outcome']:<11} {r['started_at']:%Y-%m-%d %H:%M:%S} ..  "
            f"{r['host']}  v{r['version']}"
        )


@app.command()
def verify(path: JobPath) -> None:
    """Count rows in the job's range that still match `where`; exit 0 only if none."""
    job, params = _job(path), _params_or_exit()
    left = _run(lambda: commands.verify(job, params))
    typer.echo(f"{left:,} rows in range still match where")
    if left:
        raise typer.Exit(1)


@app.command()
def reset(
    name: Name,
    yes: Annotated[bool, typer.Option("--yes", help="Really forget the checkpoint.")] = False,
) -> None:
    """Forget a job's checkpoint so that it starts over."""
    if not yes:
        typer.echo("backfill: error: reset forgets the checkpoint; pass --yes to confirm", err=True)
        raise typer.Exit(int(ExitCode.USAGE))
    params = _params_or_exit()
    n = _run(lambda: commands.reset(params, name))
    typer.echo(f"forgot {n} checkpoint(s) of job {name}")


@app.command()
def demo(
    rows: Annotated[int, typer.Option(help="Rows to seed.")] = 1_000_000,
    batch_size: Annotated[int, typer.Option(help="Rows per batch.")] = 5000,
) -> None:
    """Start a throwaway PostgreSQL, seed a table, and run a backfill with live progress."""
    from backfill import demo as demo_module

    try:
        demo_module.main(rows=rows, batch_size=batch_size)
    except BackfillError as error:
        raise _fail(error) from None


def _params_or_exit() -> ConnectParams:
    try:
        return _params()
    except BackfillError as error:
        raise _fail(error) from None


def _key(key: Any) -> str:
    if key is None:
        return "-"
    return key[0] if len(key) == 1 else "(" + ", ".join(key) + ")"


def _plain(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _status_entry(c: Any) -> dict[str, Any]:
    entry = {k: _plain(v) for k, v in asdict(c).items()}
    done = c.state == "succeeded"
    entry["progress"] = 1.0 if done else fraction(c.range_lo, c.range_hi, c.cursor)
    return entry


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.TEMPFAIL))
