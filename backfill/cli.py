"""The command line: typer parses, ``anyio.run`` runs the matching function in
``backfill.commands``, and ``BackfillError`` becomes its exit code and a one-line message.

Start-up is part of the interface (``backfill --help`` in well under 0.2 s, and a run's first
batch soon after the process starts): this module imports only typer and the standard library,
and each command imports what it needs (pydantic, asyncpg, prometheus-client) when it runs.
``backfill run`` does not even come here: ``backfill.commands.argv`` parses and dispatches it
without building this CLI (and sends anything it does not read exactly as typer would here).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from backfill import __version__
from backfill.commands.launch import job as _job
from backfill.commands.launch import params as _params
from backfill.commands.launch import run_async as _run
from backfill.commands.launch import run_job
from backfill.commands.launch import telemetry as _telemetry
from backfill.errors import BackfillError, ExitCode
from backfill.live import LIVE_KEYS

if TYPE_CHECKING:
    from backfill import commands
    from backfill.job import Job

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Batched, resumable, gentle backfills for PostgreSQL.",
    # Plain help: formatting it with rich imports ~0.1 s of modules, half of the start-up budget.
    rich_markup_mode=None,
)
log = logging.getLogger("backfill.cli")
T = TypeVar("T")

JobPath = Annotated[Path, typer.Argument(help="Job file (TOML).", show_default=False)]
Name = Annotated[str, typer.Argument(help="Job name.", show_default=False)]
METRICS_PORT = 9477  # settings.DEFAULT_METRICS_PORT, without importing pydantic for --help
WATCH_SECONDS = 2.0  # `status --watch` without SECONDS


def _metrics_port(help: str) -> Any:
    """``--metrics-port`` (``run``, ``demo``): a port, 0 for none, unset for the environment's."""
    return typer.Option(min=0, max=65535, show_default=False, help=help)


def _version(show: bool) -> None:
    if show:
        typer.echo(f"backfill {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True,
            help="Print the version (the one each run records in its history) and exit.",
        ),
    ] = False,
) -> None:
    from backfill import logs

    logs.setup(level=log_level)


@app.command()
def init() -> None:
    """Create the state schema (needs CREATE: once, by an admin).

    Idempotent; run it again after an upgrade."""
    from backfill import commands

    params = _params()
    applied = _run(lambda: commands.init(params))
    done = f" (applied migration {', '.join(map(str, applied))})" if applied else ""
    typer.echo(f"state schema 'backfill' is ready{done}")


@app.command()
def plan(path: JobPath) -> None:
    """Show the batch SQL, EXPLAIN of one batch, rows and duration.

    Validates the job file, connects, and runs one batch under EXPLAIN ANALYZE, rolled back."""
    from backfill import commands, planview

    job, params = _job(path), _params()
    p = _run(lambda: commands.plan(job, params))
    typer.echo(planview.view(p, job))


@app.command()
def run(
    path: JobPath,
    shard: Annotated[
        str | None,
        typer.Option(
            envvar="BACKFILL_SHARD",
            help="Work only shard i of N (0-based), e.g. 2/4; in an Indexed Job: "
            "--shard $(JOB_COMPLETION_INDEX)/N.",
        ),
    ] = None,
    metrics_port: Annotated[int | None, _metrics_port(
        f"Serve Prometheus metrics and /healthz on this port during the run; 0: don't "
        f"(default: $BACKFILL_METRICS_PORT, else {METRICS_PORT})."
    )] = None,
    progress_every: Annotated[
        float | None,
        typer.Option(
            min=0.1, show_default=False,
            help="Seconds between progress log lines when not on a terminal "
            "(default: $BACKFILL_PROGRESS_LOG_SECONDS, else 30).",
        ),
    ] = None,
) -> None:
    """Run (or resume) a job.

    Ctrl-C or SIGTERM stops after the batch in flight; run again to resume."""
    run_job(path, shard=shard, metrics_port=metrics_port, progress_every=progress_every)


@app.command()
def status(
    name: Annotated[str | None, typer.Argument(help="Job name (default: every job).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    watch: Annotated[
        float | None,
        typer.Option(
            "--watch", metavar="[SECONDS]", min=0.1, show_default=False,
            help=f"Redraw every SECONDS (default {WATCH_SECONDS:g}) until Ctrl-C.",
        ),
    ] = None,
) -> None:
    """Every job's state, progress, rows, rate and ETA, as a table.

    With NAME, that job's live settings and runs too."""
    if as_json and watch is not None:
        typer.echo("backfill: error: --json and --watch do not go together", err=True)
        raise typer.Exit(int(ExitCode.USAGE))
    from backfill import statusview

    params = _params()
    if watch is not None:
        try:
            _run(lambda: statusview.watch(params, name, every=watch, out=_console()))
        except KeyboardInterrupt:
            raise typer.Exit(0) from None
        return
    st = _run(lambda: statusview.fetch(params, name))
    if as_json:
        typer.echo(json.dumps(statusview.document(st), indent=2))
    else:
        _console().print(statusview.view(st, name))


def _console() -> Any:
    """rich's console on stdout; off a terminal, wide enough that no table wraps."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=10_000)


@app.command()
def verify(path: JobPath) -> None:
    """Count the rows in range that still match `where` (0: done).

    Exits 0 only if none is left."""
    from backfill import commands

    job, params = _job(path), _params()
    left = _run(lambda: commands.verify(job, params))
    typer.echo(f"{left:,} rows in range {_left_to_do(job)}")
    if left:
        raise typer.Exit(1)


def _left_to_do(job: Job) -> str:
    """What ``verify`` counted, in the job's words."""
    if job.copy_ is not None:
        return f"missing or different in {job.copy_.into.display}"
    if job.delete is not None and job.delete.archive is not None:
        return (f"still match where, or are both in {job.table.display} and in "
                f"{job.delete.archive.display}")
    return "still match where"


@app.command()
def cutover(path: JobPath) -> None:
    """Swap a finished copy's target in under the source's name (sync = "trigger").

    One short transaction, retried under a short lock_timeout; the old table stays current."""
    _step(path, "cutover", "cut over: {table} is now the copy; the old table is {old}")


@app.command()
def rollback(path: JobPath) -> None:
    """Swap back after a cutover: the old table takes its name again, kept in sync."""
    _step(path, "rollback", "rolled back: {table} is the original table again")


@app.command()
def finish(path: JobPath) -> None:
    """End the reverse sync after a cutover; the old table is yours to drop."""
    _step(path, "finish", "finished: no sync trigger left; drop {old} when you no longer need it")


def _step(path: Path, verb: str, done: str) -> None:
    from backfill import commands
    from backfill.lifecycle.sync import old_name

    job, params = _job(path), _params()
    outcome = _run(lambda: getattr(commands, verb)(job, params))
    said = done.format(table=job.table.display, old=f"{job.table.schema_}.{old_name(job)}")
    if not outcome.changed:
        said = f"nothing to do: job {job.name} is {outcome.phase} already"
    elif outcome.attempts > 1:
        said += f" ({outcome.attempts} attempts, {outcome.seconds:.1f}s)"
    typer.echo(f"job {job.name} {said}" if outcome.changed else said)
    for note in outcome.notes:
        typer.echo(f"note: {note}", err=True)


@app.command()
def reset(
    name: Name,
    yes: Annotated[bool, typer.Option("--yes", help="Really forget the checkpoint.")] = False,
) -> None:
    """Forget a job's checkpoint so that it starts over."""
    if not yes:
        typer.echo("backfill: error: reset forgets the checkpoint; pass --yes to confirm", err=True)
        raise typer.Exit(int(ExitCode.USAGE))
    from backfill import commands

    params = _params()
    n = _run(lambda: commands.reset(params, name))
    typer.echo(f"forgot {n} checkpoint(s) of job {name}")


@app.command()
def pause(name: Name) -> None:
    """Hold a job before its next batch (running or not).

    Its runner waits, across restarts too, until `backfill resume`."""
    from backfill import commands

    params = _params()
    _said(_run(lambda: commands.pause(params, name)), f"job {name} paused")


@app.command()
def resume(name: Name) -> None:
    """Undo `pause`: a waiting runner goes on within check_every."""
    from backfill import commands

    params = _params()
    _said(_run(lambda: commands.resume(params, name)), f"job {name} resumed")


@app.command("set")
def set_(
    name: Name,
    assignments: Annotated[
        list[str],
        typer.Argument(
            help=f"key=value pairs: {', '.join(LIVE_KEYS)}. A value 'off' switches an "
            "optional limit off; 'default' goes back to the job file's value.",
            show_default=False,
        ),
    ],
) -> None:
    """Change a job's live settings, running or not."""
    from backfill import commands

    params = _params()
    _said(_run(lambda: commands.set_live(params, name, assignments)), f"job {name} updated")


def _said(result: commands.Controlled, what: str) -> None:
    if result.pending:
        where = "it has not started yet; its first run starts with these"
    elif result.runners:
        where = "its runner picks this up within one batch (or check_every while waiting)"
    else:
        where = "no runner holds it now; its next run starts with these"
    from backfill import control

    shown = ", ".join(f"{k}={control.show(v)}" for k, v in result.control.items()) or "none"
    typer.echo(f"{what}: {where}\nlive overrides: {shown}")


@app.command()
def demo(
    rows: Annotated[int, typer.Option(min=1, help="Rows to seed.")] = 1_000_000,
    batch_size: Annotated[int, typer.Option(min=1, help="Keys per batch.")] = 5000,
    keep: Annotated[
        bool,
        typer.Option(
            "--keep", help="Keep the server afterwards, with a second job to try every verb "
            "on, until Ctrl-C.",
        ),
    ] = False,
    metrics_port: Annotated[int | None, _metrics_port(
        f"Serve the run's metrics on 127.0.0.1 at this port; 0: don't (default: "
        f"$BACKFILL_METRICS_PORT, else {METRICS_PORT}, or a free port if that is taken)."
    )] = None,
) -> None:
    """A real backfill on a throwaway PostgreSQL, to watch and explore.

    Seeds a table, runs a job with live progress and its metrics served, verifies it; with
    --keep the server stays up (with a second job to try) until Ctrl-C removes it."""
    from backfill import demo as demo_module

    telemetry = _telemetry(metrics_port=metrics_port, log_every=None)
    demo_module.main(rows=rows, batch_size=batch_size, keep=keep, telemetry=telemetry)


@app.command()
def manifest(
    path: JobPath,
    out: Annotated[
        Path, typer.Option("--out", help="Directory of the overlay (created if missing).",
                           show_default=False)
    ],
    image: Annotated[
        str | None,
        typer.Option(help="The runner image, with a tag or digest (default: the base's "
                     "registry.example.com/backfill:<version>).", show_default=False),
    ] = None,
    shards: Annotated[
        int, typer.Option(min=1, help="Run N shards as an Indexed Job (one pod per shard).")
    ] = 1,
    base: Annotated[
        Path | None,
        typer.Option(help="The runner Job's kustomize base (default: k8s/base of this clone).",
                     show_default=False),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a kustomization.yaml not written by this.")
    ] = False,
) -> None:
    """Write a kustomize overlay that runs JOBFILE as a Kubernetes Job.

    Then: kubectl apply -k DIR."""
    from backfill import manifest as manifests

    made = manifests.overlay(
        str(path), str(out), image=image, shards=shards, base=None if base is None else str(base)
    )
    made.write(force=force)
    for name in made.files:
        typer.echo(f"wrote {out / name}")
    typer.echo(f"apply it with: kubectl apply -k {out}")


def _watch_seconds(argv: list[str]) -> list[str]:
    """``status --watch`` takes an optional SECONDS (click options cannot): without a number
    after it, the default is put there."""
    if "status" not in argv or "--watch" not in argv:
        return argv
    i = argv.index("--watch")
    following = argv[i + 1] if i + 1 < len(argv) else ""
    try:
        float(following)
    except ValueError:
        return [*argv[: i + 1], f"{WATCH_SECONDS:g}", *argv[i + 1 :]]
    return argv


def main() -> None:
    """The console script: every ``BackfillError`` a command raises ends here, as one line on
    stderr and its documented exit code."""
    try:
        app(args=_watch_seconds(sys.argv[1:]))
    except BackfillError as error:
        typer.echo(f"backfill: error: {error}", err=True)
        sys.exit(int(error.exit_code))
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.TEMPFAIL))
