"""The copy and delete shapes end to end on real PostgreSQL: what they write, exactly once,
grouped or not; the checks before anything is written; ``plan`` and ``verify``."""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import SecretStr

from backfill import commands, session
from backfill.checkpoint import Checkpoint
from backfill.conninfo import ConnectParams
from backfill.errors import ConfigError
from backfill.job import parse_job
from backfill.ranges import Shard
from tests.conftest import Database, write_job
from tests.faults.harness import Recorder, cli
from tests.shapes import (
    create_archive,
    create_source,
    create_target,
    moved_exactly_once,
    shape_job,
    target_equals_source,
)

pytestmark = pytest.mark.anyio

ROWS = 3000
# Ungrouped: a pause between batches leaves no runway for a group.
GROUPING = {"grouped": {"size": 100}, "ungrouped": {"size": 100, "sleep_seconds": 0.001}}


@pytest.fixture
def grouping(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``grouped``: batches group whatever they last (not only below 25 ms: on a loaded
    machine they may not), so the grouped path surely runs; ``ungrouped``: never."""
    if request.param == "grouped":
        monkeypatch.setattr(session, "GROUP_BELOW", 60.0)
    return str(request.param)


async def run(db: Database, job: dict[str, Any], rec: Recorder | None = None) -> Checkpoint:
    return await commands.run(parse_job(job), db.params, observers=[rec] if rec else [])


def _grouped(rec: Recorder) -> bool:
    cursors = [c.cursor for c in rec.commits]
    return len(set(cursors)) < len(cursors)


@pytest.mark.parametrize("grouping", GROUPING, indirect=True)
@pytest.mark.parametrize("kind", ["bigint", "text", "composite"])
async def test_copy_fills_the_target_once(db: Database, kind: str, grouping: str) -> None:
    await create_source(db, kind, ROWS)
    await create_target(db, kind)
    rec = Recorder()
    ckpt = await run(db, shape_job(kind, "copy", batch=GROUPING[grouping]), rec)
    assert (ckpt.state, ckpt.rows_updated) == ("succeeded", ROWS)
    assert sum(c.rows for c in rec.commits) == ROWS
    assert _grouped(rec) == (grouping == "grouped")
    await target_equals_source(db)
    assert await commands.verify(parse_job(shape_job(kind, "copy")), db.params) == 0


@pytest.mark.parametrize("grouping", GROUPING, indirect=True)
@pytest.mark.parametrize("shape", ["delete", "archive"])
@pytest.mark.parametrize("kind", ["bigint", "uuid", "composite"])
async def test_delete_removes_matching_rows_once(
    db: Database, kind: str, shape: str, grouping: str
) -> None:
    await create_source(db, kind, ROWS)
    await create_archive(db, kind)
    job = shape_job(kind, shape, batch=GROUPING[grouping])
    assert await commands.verify(parse_job(job), db.params) == ROWS // 2
    rec = Recorder()
    ckpt = await run(db, job, rec)
    deleted = await moved_exactly_once(db, ROWS, archive=shape == "archive")
    # Counted as the statement reported, the newest row (the range's last key) included.
    assert (ckpt.state, ckpt.rows_updated) == ("succeeded", deleted)
    assert sum(c.rows for c in rec.commits) == deleted
    assert _grouped(rec) == (grouping == "grouped")
    assert await commands.verify(parse_job(job), db.params) == 0


async def test_copy_with_columns_values_and_where(db: Database) -> None:
    await create_source(db, "bigint", ROWS)
    await db.execute("CREATE TABLE dst (id bigint PRIMARY KEY, n_big bigint, label text, "
                     "n int, filled timestamptz DEFAULT now())")
    job = shape_job("bigint", "copy", where="n % 3 = 0", copy={
        "into": "dst", "columns": ["id", "n"],
        "values": {"n_big": "n::bigint * 1000", "label": "upper(payload)"},
    })
    ckpt = await run(db, job)
    assert ckpt.rows_updated == ROWS // 3
    wrong = await db.fetchval(
        "SELECT count(*) FROM src JOIN dst USING (id) WHERE n_big <> src.n * 1000 "
        "OR label <> upper(payload) OR dst.n <> src.n OR filled IS NULL")
    assert (await db.fetchval("SELECT count(*) FROM dst"), wrong) == (ROWS // 3, 0)
    assert await commands.verify(parse_job(job), db.params) == 0
    await db.execute("UPDATE dst SET label = 'changed' WHERE id = 3")
    assert await commands.verify(parse_job(job), db.params) == 1


async def test_on_conflict_update_rewrites_only_rows_that_differ(db: Database) -> None:
    await create_source(db, "bigint", ROWS)
    await create_target(db, "bigint")
    await db.execute("INSERT INTO dst SELECT * FROM src")
    await db.execute("UPDATE dst SET payload = 'stale' WHERE id % 300 = 0")  # 10 rows
    before = {r["id"]: r["xmin"] for r in await db.fetch("SELECT id, xmin::text FROM dst")}
    nothing = shape_job("bigint", "copy", name="keep")
    assert (await run(db, nothing)).rows_updated == 0  # DO NOTHING: the stale rows stay
    assert await commands.verify(parse_job(nothing), db.params) == 10
    job = shape_job("bigint", "copy", copy={"into": "dst", "on_conflict": "update"})
    ckpt = await run(db, job)
    after = {r["id"]: r["xmin"] for r in await db.fetch("SELECT id, xmin::text FROM dst")}
    rewritten = {k for k in before if before[k] != after[k]}
    assert rewritten == {k for k in before if k % 300 == 0}
    assert ckpt.rows_updated == 10
    await target_equals_source(db)


async def test_a_copy_changes_nothing_on_a_rerun(db: Database) -> None:
    await create_source(db, "bigint", ROWS)
    await create_target(db, "bigint")
    job = shape_job("bigint", "copy")
    await run(db, job)
    again = await run(db, job)  # succeeded already: nothing more
    assert again.rows_updated == ROWS
    await commands.reset(db.params, "src-copy")
    assert (await run(db, job)).rows_updated == 0  # every row is there: ON CONFLICT DO NOTHING


def _bad(setup: str, job: dict[str, Any], message: str) -> tuple[str, dict[str, Any], str]:
    return setup, job, message


COPY = shape_job("bigint", "copy")
ARCHIVE = shape_job("bigint", "archive")
BAD: dict[str, tuple[str, dict[str, Any], str]] = {
    "no target": _bad("", COPY, "copy.into: public.dst does not exist"),
    "target is a view": _bad("CREATE VIEW dst AS SELECT * FROM src", COPY,
                             "copy.into: public.dst is a view"),
    "column missing in target": _bad(
        "CREATE TABLE dst (id bigint PRIMARY KEY, payload text)",
        {**COPY, "copy": {"into": "dst", "columns": ["id", "n"]}},
        "copy.columns: column n does not exist in public.dst"),
    "column missing in source": _bad(
        "CREATE TABLE dst (id bigint PRIMARY KEY, extra text)",
        {**COPY, "copy": {"into": "dst", "columns": ["id", "extra"]}},
        "copy.columns: column extra does not exist in public.src"),
    "values column missing": _bad(
        "CREATE TABLE dst (id bigint PRIMARY KEY)",
        {**COPY, "copy": {"into": "dst", "values": {"nope": "n + 1"}}},
        "copy.values: column nope does not exist in public.dst"),
    "bad values expression": _bad(
        "CREATE TABLE dst (id bigint PRIMARY KEY, n int)",
        {**COPY, "copy": {"into": "dst", "values": {"n": "no_such_column + 1"}}},
        'column "no_such_column" does not exist (SQLSTATE 42703) (in copy.values.n)'),
    "values expression of another type": _bad(
        "CREATE TABLE dst (id bigint PRIMARY KEY, n int)",
        {**COPY, "copy": {"into": "dst", "values": {"n": "payload"}}},
        'column "n" is of type integer but expression is of type text (SQLSTATE 42804) '
        "(in copy.values.n)"),
    "types differ": _bad(
        "CREATE TABLE dst (id bigint PRIMARY KEY, n text)", COPY,
        "copy.columns: column n is integer in public.src but text in public.dst"),
    "narrowing": _bad(
        "CREATE TABLE dst (id int PRIMARY KEY)", COPY,
        "copy.columns: column id is bigint in public.src but integer in public.dst"),
    "key not copied": _bad(
        "CREATE TABLE dst (n int PRIMARY KEY, payload text)", COPY,
        "copy.columns: the key column id is not copied to public.dst"),
    "target column needs a value": _bad(
        "CREATE TABLE dst (id bigint PRIMARY KEY, extra text NOT NULL)", COPY,
        "copy.into: column extra of public.dst is NOT NULL without a default and is not written"),
    "no unique key in target": _bad(
        "CREATE TABLE dst (id bigint, payload text)", COPY,
        'copy.into: ("id") is not unique in public.dst'),
    "no INSERT on target": _bad(
        "CREATE TABLE dst (LIKE src INCLUDING ALL); GRANT ALL ON src, dst TO {role}; "
        "REVOKE INSERT ON dst FROM {role}", COPY, "lacks INSERT on public.dst"),
    "no archive": _bad("", ARCHIVE, "delete.archive: public.src_archive does not exist"),
    "archive lacks a column": _bad(
        "CREATE TABLE src_archive (id bigint, payload text, n int)", ARCHIVE,
        "delete.archive: column old (boolean) of public.src: public.src_archive has no such "
        "column"),
    "archive type differs": _bad(
        "CREATE TABLE src_archive (id bigint, payload text, n bigint, old boolean)", ARCHIVE,
        "delete.archive: column n (integer) of public.src: public.src_archive has it as bigint"),
    "archive column without default": _bad(
        "CREATE TABLE src_archive (LIKE src, at timestamptz NOT NULL)", ARCHIVE,
        "delete.archive: column at of public.src_archive is NOT NULL without a default and is "
        "not written"),
    "no INSERT on archive": _bad(
        "CREATE TABLE src_archive (LIKE src); GRANT ALL ON src, src_archive TO {role}; "
        "REVOKE INSERT ON src_archive FROM {role}", ARCHIVE, "lacks INSERT on public.src_archive"),
    "no DELETE on source": _bad(
        "GRANT ALL ON src TO {role}; REVOKE DELETE ON src FROM {role}",
        shape_job("bigint", "delete"), "lacks DELETE on public.src"),
}


@pytest.mark.parametrize("case", BAD)
async def test_bad_input_is_refused_before_any_write(db: Database, case: str) -> None:
    setup, job, message = BAD[case]
    await create_source(db, "bigint", 100)
    params = db.params
    if "{role}" in setup:  # a role that is not a superuser, with some rights revoked
        role = f"plain_{db.name}"
        await db.execute(f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA backfill TO {role}; "
                         f"GRANT ALL ON ALL TABLES IN SCHEMA backfill TO {role}")
        params = ConnectParams(dsn=SecretStr(db.server.dsn(db.name, user=role)))
    if setup:
        await db.execute(setup.replace("{role}", f"plain_{db.name}"))
    with pytest.raises(ConfigError) as error:
        await commands.run(parse_job(job), params, observers=[])
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert await db.fetchval("SELECT count(*) FROM backfill.checkpoints") == 0
    assert await db.fetchval("SELECT count(*) FROM src") == 100


@pytest.mark.parametrize("shape", ["copy", "delete", "archive"])
async def test_plan_explains_the_real_batch_and_writes_nothing(db: Database, shape: str) -> None:
    await create_source(db, "bigint", ROWS)
    await create_target(db, "bigint")
    await create_archive(db, "bigint")
    plan = await commands.plan(parse_job(shape_job("bigint", shape)), db.params)
    verb = {"copy": 'INSERT INTO "public"."dst"', "delete": 'DELETE FROM "public"."src"',
            "archive": 'INSERT INTO "public"."src_archive"'}[shape]
    assert verb in plan.statement and "backfill_from" in plan.statement
    node = {"copy": "Insert on dst", "delete": "Delete on src", "archive": "Insert on src_archive"}
    assert node[shape] in plan.explain and "Update on checkpoints" in plan.explain
    assert await db.fetchval("SELECT count(*) FROM src") == ROWS
    assert await db.fetchval("SELECT count(*) FROM dst") == 0
    assert await db.fetchval("SELECT count(*) FROM backfill.checkpoints") == 0
    # Halfway through a run: the next batch's statement, on the checkpoint as it stands.
    job = shape_job("bigint", shape)
    await run(db, job)
    await db.execute("UPDATE backfill.checkpoints SET cursor = '{1500}', state = 'interrupted'")
    before = tuple((await db.fetch("SELECT cursor, batches FROM backfill.checkpoints"))[0])
    plan = await commands.plan(parse_job(job), db.params)
    assert plan.cursor == ("1500",) and node[shape] in plan.explain
    assert '"id" > (SELECT a1 FROM backfill_from)' in plan.statement
    after = (await db.fetch("SELECT cursor, batches FROM backfill.checkpoints"))[0]
    assert tuple(after) == before


async def test_an_unindexed_foreign_key_is_a_warning(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    await create_source(db, "bigint", 200)
    await db.execute("CREATE TABLE child (src_id bigint REFERENCES src ON DELETE CASCADE)")
    job = shape_job("bigint", "delete", batch={"size": 10})
    plan = await commands.plan(parse_job(job), db.params)
    assert len(plan.warnings) == 1 and "public.child (src_id" in plan.warnings[0]
    with caplog.at_level(logging.WARNING, logger="backfill.connector"):
        await run(db, job)
    warned = [r for r in caplog.records if "foreign key" in r.getMessage()]
    assert len(warned) == 1
    await db.execute("CREATE INDEX ON child (src_id)")
    assert (await commands.plan(parse_job(job), db.params)).warnings == ()


@pytest.mark.parametrize(("fields", "message"), [
    ({"set": "n = 1", "copy": {"into": "dst"}}, "it has set and [copy]"),
    ({"set": "n = 1", "delete": {}}, "it has set and [delete]"),
    ({"copy": {"into": "dst"}, "delete": {}}, "it has [copy] and [delete]"),
    ({}, "it has none"),
])
async def test_one_shape_or_exit_78_before_connecting(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    job = write_job(tmp_path, {"name": "j", "table": "src", "key": "id", "where": "old",
                               **fields})
    # Nothing listens there: the check comes before any connection.
    env = {"BACKFILL_DATABASE_URL": "postgresql://x@127.0.0.1:1/x", "PATH": os.environ["PATH"]}
    out = await cli(tmp_path, "run", job, env=env)
    assert out.code == 78, out.output
    assert out.errors() == [
        f"backfill: error: {job}: a job needs exactly one of set, [copy], [delete]; {message}"
    ]


async def test_the_cli_speaks_of_copied_and_deleted_rows(db: Database, tmp_path: Path) -> None:
    await create_source(db, "bigint", ROWS)
    await create_target(db, "bigint")
    await create_archive(db, "bigint")
    copy = write_job(tmp_path, shape_job("bigint", "copy"), filename="copy.toml")
    move = write_job(tmp_path, shape_job("bigint", "archive"), filename="move.toml")
    left = await cli(tmp_path, "verify", copy, env=db.env())
    assert (left.code, left.stdout) == (1, f"{ROWS:,} rows in range missing or different in "
                                           "public.dst\n")
    done = await cli(tmp_path, "run", copy, env=db.env())
    assert f"job src-copy done: {ROWS:,} rows copied in 30 batches" in done.stderr, done.output
    done = await cli(tmp_path, "run", move, env=db.env())
    assert f"job src-archive done: {ROWS // 2:,} rows archived in 30 batches" in done.stderr
    left = await cli(tmp_path, "verify", move, env=db.env())
    assert (left.code, left.stdout) == (0, "0 rows in range still match where, or are both in "
                                           "public.src and in public.src_archive\n")
    status = await cli(tmp_path, "status", env=db.env())
    assert f"{ROWS:,} copied" in status.stdout and f"{ROWS // 2:,} archived" in status.stdout
    document = json.loads((await cli(tmp_path, "status", "--json", env=db.env())).stdout)
    assert {j["job"]: j["shape"] for j in document["jobs"]} == {
        "src-archive": "archive", "src-copy": "copy"}


@pytest.mark.parametrize("shape", ["copy", "archive"])
async def test_shards_split_a_copy_and_an_archive(db: Database, shape: str) -> None:
    await create_source(db, "composite", ROWS)
    await create_target(db, "composite")
    await create_archive(db, "composite")
    job = parse_job(shape_job("composite", shape))
    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(partial(commands.run, job, db.params, observers=[],
                                  shard=Shard(i, 3)))
    counted = await db.fetchval("SELECT sum(rows_updated) FROM backfill.checkpoints")
    if shape == "copy":
        await target_equals_source(db)
        assert counted == ROWS
    else:
        assert counted == await moved_exactly_once(db, ROWS, archive=True)


async def test_a_poison_row_is_narrowed_down_and_skipped_in_each_shape(db: Database) -> None:
    await create_source(db, "bigint", ROWS)
    # The copy: the target refuses one row; the delete: a row still referenced.
    await db.execute("CREATE TABLE dst (LIKE src INCLUDING ALL, CHECK (n <> 1234))")
    await db.execute("CREATE TABLE child (src_id bigint REFERENCES src); "
                     "CREATE INDEX ON child (src_id); INSERT INTO child VALUES (2000)")
    copied = await run(db, shape_job("bigint", "copy", on_row_error="skip"))
    assert (copied.rows_updated, copied.skipped_keys) == (ROWS - 1, (("1234",),))
    await target_equals_source(db, where="n <> 1234")
    deleted = await run(db, shape_job("bigint", "delete", on_row_error="skip"))
    assert (deleted.rows_updated, deleted.skipped_keys) == (ROWS // 2 - 1, (("2000",),))
    assert await db.fetchval("SELECT array_agg(id) FROM src WHERE old") == [2000]


async def test_copy_into_a_partitioned_table(db: Database) -> None:
    # The partitioning recipe: the target's primary key includes its partition key.
    await create_source(db, "bigint", ROWS)
    await db.execute("""
        CREATE TABLE dst (id bigint, payload text, n int NOT NULL, old boolean,
                          PRIMARY KEY (id, n)) PARTITION BY RANGE (n);
        CREATE TABLE dst_low PARTITION OF dst FOR VALUES FROM (MINVALUE) TO (1500);
        CREATE TABLE dst_high PARTITION OF dst FOR VALUES FROM (1500) TO (MAXVALUE)""")
    job = shape_job("bigint", "copy", copy={"into": "dst", "on_conflict": "update"})
    assert (await run(db, job)).rows_updated == ROWS
    await target_equals_source(db)
    assert await db.fetchval("SELECT count(*) FROM dst_high") == ROWS - 1499
    await commands.reset(db.params, "src-copy")
    assert (await run(db, job)).rows_updated == 0  # nothing differs: nothing rewritten
