"""Issue 26: what each part of the delete's batch statement costs on the server, per batch.

The runner deletes the same table (``ROWS`` rows, ``SIZE`` a batch) once as it is and once per
variant with one part taken out of its statement (the claim's row lock, the session record
of the group, the count of the changed rows, the live control read back), and a PL/pgSQL
procedure runs the bare ``DELETE`` with a ``COMMIT`` per slice; the mean server time per
statement from ``pg_stat_statements``, the median over ``--rounds`` rounds, each round every
variant once. The variants are measurements only: without its parts the statement is not
correct (no count, no record of a group).

    python3 -m benchmarks.statement_parts [--rounds N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from pydantic import SecretStr

from backfill import commands, sql
from backfill.commands.state import init
from backfill.conninfo import ConnectParams
from backfill.job import parse_job
from backfill.pgtemp import TempPostgres
from benchmarks import db
from benchmarks.options import RESULTS

ROWS, SIZE = 300_000, 1000
RECORD = "set_config('backfill.recent'"


def _without_record(s: str) -> str:
    return s[:s.index(RECORD)] + "$5::bool " + s[s.index("IS NOT NULL AS recorded"):]


VARIANTS: dict[str, Callable[[str], str]] = {
    "as is": lambda s: s,
    "without the claim's FOR UPDATE": lambda s: s.replace(" FOR UPDATE", ""),
    "without the group's record": _without_record,
    "without the count": lambda s: s.replace(
        "SELECT count(*) AS n FROM backfill_changed", "SELECT 0::int8 AS n"),
    "without the control read": lambda s: s.replace(
        "RETURNING control", "RETURNING 1 AS control").replace(
        "(SELECT control FROM backfill_saved) AS control", "NULL::jsonb AS control"),
}
BARE = f"""CREATE OR REPLACE PROCEDURE bare() LANGUAGE plpgsql AS $$
DECLARE lo bigint := 0; BEGIN
  WHILE lo < {ROWS} LOOP
    DELETE FROM src WHERE id > lo AND id <= lo + {SIZE} AND old; lo := lo + {SIZE}; COMMIT;
  END LOOP;
END $$"""


async def _seed(conn: asyncpg.Connection) -> None:
    await conn.execute("DROP TABLE IF EXISTS src; CREATE TABLE src "
                       "(id bigint PRIMARY KEY, payload text, old bool)")
    await conn.execute(f"INSERT INTO src SELECT g, md5(g::text), true "
                       f"FROM generate_series(1, {ROWS}) g")
    await conn.execute("VACUUM ANALYZE src")
    await conn.execute("CHECKPOINT")
    await conn.execute("DELETE FROM backfill.checkpoints; DELETE FROM backfill.runs")
    await conn.execute("SELECT pg_stat_statements_reset()")


async def _mean_ms(conn: asyncpg.Connection, like: str) -> float:
    return float(await conn.fetchval(
        "SELECT mean_exec_time FROM pg_stat_statements WHERE query LIKE $1 "
        "ORDER BY calls DESC LIMIT 1", like))


async def experiment(rounds: int) -> dict[str, list[float]]:
    settings = {"shared_preload_libraries": "'pg_stat_statements'",
                "pg_stat_statements.track": "all"}
    found: dict[str, list[float]] = {}
    original = sql.batch
    with TempPostgres(settings=settings) as pg:
        params = ConnectParams(dsn=SecretStr(pg.dsn()))
        await init(params)
        conn = await asyncpg.connect(pg.dsn())
        try:
            await conn.execute("CREATE EXTENSION pg_stat_statements")
            await conn.execute(BARE)
            job = parse_job({"name": "parts", "table": "public.src", "key": "id",
                             "where": "old", "delete": {}, "batch": {"size": SIZE}})
            for _ in range(rounds):
                for name, change in VARIANTS.items():
                    sql.batch = lambda *a, change=change, **k: change(original(*a, **k))
                    await _seed(conn)
                    await commands.run(job, params, observers=[])
                    found.setdefault(name, []).append(
                        await _mean_ms(conn, "WITH backfill_from%"))
                sql.batch = original
                await _seed(conn)
                await conn.execute("CALL bare()")
                found.setdefault("bare DELETE", []).append(
                    await _mean_ms(conn, "DELETE FROM src%"))
        finally:
            sql.batch = original
            await conn.close()
    return found


def markdown(result: dict[str, Any]) -> str:
    found = result["ms"]
    whole = statistics.median(found["as is"])
    bare = statistics.median(found["bare DELETE"])
    lines = [f"# The delete statement's parts, {result['meta']['date']} (issue 26)", "",
             f"`python3 -m benchmarks.statement_parts`: {ROWS:,} rows, {SIZE:,} a batch, "
             f"server time per statement (pg_stat_statements), medians of "
             f"{result['meta']['rounds']} rounds.", "",
             "| statement | ms per batch | part's cost | over the bare DELETE |",
             "| --- | ---: | ---: | ---: |"]
    for name, values in found.items():
        ms = statistics.median(values)
        part = "" if name in ("as is", "bare DELETE") else f"{(whole - ms) * 1000:.0f} us"
        lines.append(f"| {name} | {ms:.3f} | {part} | {ms / bare:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.statement_parts")
    p.add_argument("--rounds", type=int, default=3)
    now = datetime.now(UTC)
    p.add_argument("--out", type=Path,
                   default=RESULTS / f"statement-parts-{now:%Y%m%dT%H%MZ}.json")
    a = p.parse_args()
    result: dict[str, Any] = {"ms": anyio.run(experiment, a.rounds, backend="asyncio")}
    result["meta"] = {"date": f"{now:%Y-%m-%d %H:%M} UTC", "rounds": a.rounds,
                      "rows": ROWS, "size": SIZE, "machine": db.machine()}
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
