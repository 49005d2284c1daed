"""The CLI as a user runs it: real processes, exit codes, one-line errors, nothing changed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Database, cli, seed_users, users_job, write_job

pytestmark = pytest.mark.anyio


async def untouched(db: Database) -> bool:
    return bool(await db.fetchval("SELECT max(touched) = 0 FROM users"))


async def test_run_status_verify_reset(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 500)")
    path = write_job(tmp_path, users_job())
    env = db.env()
    before = cli("verify", path, env=env)
    assert before.returncode == 1 and "500 rows in range still match" in before.stdout

    done = cli("run", path, env=env)
    assert done.returncode == 0, done.stderr
    assert "500 rows updated in 5 batches" in done.stderr
    # Not on a terminal: JSON log lines, none per batch.
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert {line["msg"] for line in lines} >= {"run started", "state"}
    assert len(lines) < 10

    after = cli("verify", path, env=env)
    assert after.returncode == 0 and "0 rows in range" in after.stdout

    status = cli("status", "users-display-name", "--json", env=env)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    (entry,) = data["jobs"]
    assert (entry["state"], entry["rows_updated"], entry["batches"], entry["progress"]) == (
        "succeeded",
        500,
        5,
        1.0,
    )
    assert entry["cursor"] == ["500"]
    assert [r["outcome"] for r in data["runs"]] == ["succeeded"]
    text = cli("status", env=env)
    header, rule, row = text.stdout.splitlines()[:3]
    assert header.split() == ["JOB", "SHARD", "STATE", "DONE", "ROWS", "BATCHES", "RATE", "ETA",
                              "CURSOR", "UPDATED"]
    assert set(rule.strip()) <= {"─", " "}
    assert row.split()[:6] == ["users-display-name", "-", "succeeded", "100.0%", "500", "5"]

    refused = cli("reset", "users-display-name", env=env)
    assert refused.returncode == 2
    reset = cli("reset", "users-display-name", "--yes", env=env)
    assert reset.returncode == 0 and "forgot 1 checkpoint" in reset.stdout
    assert json.loads(cli("status", "--json", env=env).stdout)["jobs"] == []


async def test_plan_changes_nothing(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 3000)")
    await db.execute("ANALYZE users")
    out = cli("plan", write_job(tmp_path, users_job()), env=db.env())
    assert out.returncode == 0, out.stderr
    assert "batches   ~30 of 100" in out.stdout
    assert 'UPDATE "public"."users" SET' in out.stdout
    assert "EXPLAIN ANALYZE of one batch" in out.stdout and "Index" in out.stdout
    assert await untouched(db)
    assert await db.fetchval("SELECT count(*) FROM backfill.checkpoints") == 0


BAD_JOBS: dict[str, tuple[dict[str, Any], str]] = {
    "missing table": ({"table": "public.nope"}, "table: public.nope does not exist"),
    "view": ({"table": "users_view"}, "table: public.users_view is a view"),
    "missing key column": ({"key": "uid"}, "key: column uid does not exist"),
    "key not unique": ({"key": "first_name"}, "key: (first_name) is not unique"),
    "key nullable": (
        {"key": "display_name"},
        "key: column display_name of public.users allows NULL",
    ),
    "unknown column in set": ({"set": "nickname = 'x'"}, 'set/where: column "nickname" of'),
    "syntax error in where": ({"where": "display_name IS"}, "syntax error"),
    "quote in table": ({"table": 'public."users'}, "table: "),
    "semicolon in table": ({"table": "users; drop table users"}, "table: "),
    "unicode table": ({"table": "usérs"}, "table: "),
    "semicolon in set": ({"set": "display_name = 'x'; DROP TABLE users"}, "set: must be a single"),
    "huge batch": ({"batch": {"size": 10**9}}, "batch.size: "),
    "negative sleep": ({"batch": {"sleep_seconds": -1}}, "batch.sleep_seconds: "),
    "bad duration": ({"limits": {"statement_timeout": "soon"}}, "limits.statement_timeout: "),
    "bad name": ({"name": "Users Job"}, "name: "),
    "unknown field": ({"colour": "blue"}, "colour: Extra inputs are not permitted"),
}


@pytest.mark.parametrize("case", BAD_JOBS)
async def test_bad_job_exits_78_and_changes_nothing(
    db: Database, tmp_path: Path, case: str
) -> None:
    await seed_users(db, "generate_series(1, 50)")
    await db.execute("CREATE VIEW users_view AS SELECT * FROM users")
    overrides, message = BAD_JOBS[case]
    out = cli("run", write_job(tmp_path, users_job(**overrides)), env=db.env())
    assert out.returncode == 78, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("backfill: error: ") and message in last, last
    assert await untouched(db)


async def test_malformed_toml(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('name = "x"\ntable = \n')
    out = cli("run", path, env=db.env())
    assert out.returncode == 78 and "not valid TOML" in out.stderr
    missing = cli("run", tmp_path / "nope.toml", env=db.env())
    assert missing.returncode == 78 and "cannot read job file" in missing.stderr


async def test_changed_job_is_refused(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 50)")
    assert cli("run", write_job(tmp_path, users_job()), env=db.env()).returncode == 0
    changed = cli("run", write_job(tmp_path, users_job(where="true")), env=db.env())
    assert changed.returncode == 78
    assert "changed since its checkpoint" in changed.stderr and "reset" in changed.stderr


async def test_missing_state_schema(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 50)")
    await db.execute("DROP SCHEMA backfill CASCADE")
    out = cli("run", write_job(tmp_path, users_job()), env=db.env())
    assert out.returncode == 78 and "run `backfill init` first" in out.stderr
    assert cli("init", env=db.env()).returncode == 0
    assert cli("run", write_job(tmp_path, users_job()), env=db.env()).returncode == 0


async def test_connection_problems(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 50)")
    path = write_job(tmp_path, users_job(limits={"connect_retry_seconds": 0}))
    wrong_user = db.env(BACKFILL_DATABASE_URL=db.server.dsn(db.name, user="nobody_here"))
    out = cli("run", path, env=wrong_user)
    assert out.returncode == 78 and 'role "nobody_here" does not exist' in out.stderr
    closed = db.env(BACKFILL_DATABASE_URL=f"postgresql://u:s3cret-pw@127.0.0.1:1/{db.name}")
    out = cli("run", path, env=closed)
    assert out.returncode == 69 and "database unavailable" in out.stderr
    assert "s3cret-pw" not in out.stderr + out.stdout


async def test_pg_variables_are_used(db: Database, tmp_path: Path) -> None:
    await seed_users(db, "generate_series(1, 50)")
    env = db.env()
    del env["BACKFILL_DATABASE_URL"]
    env |= {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(db.server.port),
        "PGUSER": "postgres",
        "PGDATABASE": db.name,
    }
    out = cli("run", write_job(tmp_path, users_job()), env=env)
    assert out.returncode == 0, out.stderr


async def test_bad_command_line_exits_2(db: Database) -> None:
    assert cli("run", env=db.env()).returncode == 2
    assert cli("frobnicate", env=db.env()).returncode == 2


# --- local checks come first ---------------------------------------------------------------------

# Nothing listens on port 1: any verb that got as far as connecting would fail with exit 69.
UNREACHABLE = "postgresql://u@127.0.0.1:1/x"
OFFLINE: dict[str, tuple[list[str], str]] = {
    "set: not a number": (["set", "users-display-name", "batch.size=abc"], "batch.size: "),
    "set: out of bounds": (["set", "users-display-name", "batch.size=0"], "batch.size: "),
    "set: not a duration": (
        ["set", "users-display-name", "batch.target_seconds=soon"], "batch.target_seconds: "
    ),
    "set: not a size": (
        ["set", "users-display-name", "throttle.max_slot_lag_bytes=lots"],
        "throttle.max_slot_lag_bytes: ",
    ),
    "set: not a choice": (
        ["set", "users-display-name", "throttle.on_check_error=maybe"], "throttle.on_check_error: "
    ),
    "set: unknown key": (["set", "users-display-name", "batch.colour=1"], "not a live setting"),
    "set: bad name": (["set", "Users Job", "batch.size=5"], "is not a job name"),
    "pause: bad name": (["pause", "Users Job"], "is not a job name"),
    "resume: bad name": (["resume", "Users Job"], "is not a job name"),
    "status: bad name": (["status", "Users Job"], "is not a job name"),
    "reset: bad name": (["reset", "Users Job", "--yes"], "is not a job name"),
}


def offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BACKFILL_"))}
    env.pop("DATABASE_URL", None)
    return env | {"BACKFILL_DATABASE_URL": UNREACHABLE, "BACKFILL_METRICS_PORT": "0"}


@pytest.mark.parametrize("case", OFFLINE)
def test_bad_input_is_refused_before_connecting(case: str) -> None:
    args, message = OFFLINE[case]
    out = cli(*args, env=offline_env(), timeout=30)
    assert out.returncode == 78, out.stderr
    assert out.stderr.startswith("backfill: error: ") and message in out.stderr, out.stderr
    assert "database unavailable" not in out.stderr and len(out.stderr.splitlines()) == 1


@pytest.mark.parametrize("verb", ["run", "plan", "verify"])
def test_bad_job_file_is_refused_before_connecting(verb: str, tmp_path: Path) -> None:
    path = write_job(tmp_path, users_job(batch={"size": 10**9}))
    out = cli(verb, path, env=offline_env(), timeout=30)
    assert out.returncode == 78 and "batch.size: " in out.stderr, out.stderr
    shard = cli("run", write_job(tmp_path, users_job()), "--shard", "4/4", env=offline_env())
    assert shard.returncode == 78 and "--shard" in shard.stderr, shard.stderr


def test_good_input_gets_as_far_as_the_database(tmp_path: Path) -> None:
    """The control: the same verbs with valid input do try to connect."""
    path = write_job(tmp_path, users_job(limits={"connect_retry_seconds": 0}))
    for args in (["set", "users-display-name", "batch.size=500"], ["status"], ["run", path]):
        out = cli(*args, env=offline_env(), timeout=60)
        assert out.returncode == 69 and "127.0.0.1:1" in out.stderr, (args, out.stderr)


def test_set_help_lists_every_live_setting() -> None:
    """The help is built from the live keys, so a new live setting cannot be left out of it."""
    from backfill.live import LIVE_KEYS

    out = cli("set", "--help", env=offline_env(), timeout=30)
    text = " ".join(out.stdout.split())
    assert out.returncode == 0, out.stderr
    assert [key for key in LIVE_KEYS if key not in text] == [], text
