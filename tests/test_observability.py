"""Progress and pace on real PostgreSQL: a text key's sampled estimate, `status` rate and ETA
for a runner elsewhere, the metrics of a real run through the API."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backfill import commands, estimate, metrics
from backfill.checkpoint import BatchResult, Checkpoint
from backfill.job import parse_job
from backfill.metrics import RunMetrics
from backfill.observers import Quiet
from backfill.progress import Tracker
from backfill.settings import Telemetry
from tests.conftest import Database, cli, popen, seed_users, users_job, write_job

pytestmark = pytest.mark.anyio

TEXT_KEYS = """
CREATE TABLE public.accounts (
    handle text PRIMARY KEY,
    note   text
);
INSERT INTO public.accounts (handle) SELECT 'user-' || lpad(g::text, 5, '0')
FROM generate_series(1, 5000) g;
"""


def accounts_job(**kw: Any) -> Any:
    return parse_job({"name": "accounts-note", "table": "accounts", "key": "handle",
                      "set": "note = upper(handle)", "where": "note IS NULL", **kw})


def text_checkpoint(cursor: str | None) -> Checkpoint:
    return Checkpoint(job="accounts-note", shard=0, shards=1, fingerprint="f", state="running",
                      range_lo=("user-00001",), range_hi=("user-05000",),
                      cursor=None if cursor is None else (cursor,))


async def test_text_key_estimate_counts_on_the_server(db: Database) -> None:
    await db.execute(TEXT_KEYS)
    job = accounts_job()
    # A small table is read whole: exact counts, in the server's order.
    est = await estimate.sample(db.params, job, text_checkpoint("user-02500"))
    assert (est.total, est.done) == (5000, 2500)
    tracker = Tracker()
    tracker.start(text_checkpoint("user-02500"), 0.0)
    assert tracker.fraction is None
    tracker.use_estimate(est, 0.0)
    assert tracker.fraction == 0.5


async def test_text_key_estimate_from_a_page_sample(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await db.execute(TEXT_KEYS)
    await db.execute("VACUUM ANALYZE accounts")
    pages = await db.fetchval("SELECT relpages FROM pg_class WHERE relname = 'accounts'")
    monkeypatch.setattr(estimate, "SAMPLE_PAGES", max(2, pages // 3))
    est = await estimate.sample(db.params, accounts_job(), text_checkpoint(None))
    assert est.done == 0
    assert est.total == pytest.approx(5000, rel=0.2)


async def test_a_run_with_a_text_key_shows_estimated_progress(db: Database) -> None:
    await db.execute(TEXT_KEYS)
    job = accounts_job(batch={"size": 100, "sleep_seconds": 0.02})
    first = estimate.FirstStart()
    tracker = Tracker()
    seen: list[float | None] = []

    class Watch(Quiet):
        """Records the estimated fraction after each commit."""

        def started(self, checkpoint: Checkpoint) -> None:
            tracker.start(checkpoint, anyio.current_time())
            first.started(checkpoint)

        def committed(self, result: BatchResult) -> None:
            tracker.commit(result, anyio.current_time())
            seen.append(tracker.fraction)

    async with anyio.create_task_group() as tg:
        tg.start_soon(estimate.estimate_progress, db.params, job, first, tracker)
        ckpt = await commands.run(job, db.params, observers=[Watch()])
        tg.cancel_scope.cancel()
    assert ckpt.rows_updated == 5000
    known = [f for f in seen if f is not None]
    assert known, "the estimate never arrived during a 1 s run"
    assert known == sorted(known) and 0 < known[0] and known[-1] == 1.0


async def test_status_shows_rate_and_eta_of_a_runner_elsewhere(
    db: Database, tmp_path: Path
) -> None:
    await seed_users(db, "generate_series(1, 4000)")
    job = write_job(tmp_path, users_job(batch={"size": 20, "sleep_seconds": 0.02}))
    runner = popen("run", job, env=db.env(BACKFILL_METRICS_PORT="0"))
    try:
        with anyio.fail_after(30):
            await _until(db, "SELECT coalesce(max(batches), 0) >= 10 FROM backfill.checkpoints")
    finally:
        runner.send_signal(signal.SIGKILL)  # dies without a goodbye: its run stays open
        await anyio.to_thread.run_sync(lambda: runner.communicate(timeout=30))
    st = await commands.status(db.params, "users-display-name")
    rate = st.rates[("users-display-name", 0)]
    ckpt = st.checkpoints[0]
    assert rate.rows_per_second is not None and rate.rows_per_second > 0
    assert rate.eta_seconds is not None and rate.eta_seconds > 0
    assert rate.last_commit_age_seconds is not None and rate.last_commit_age_seconds >= 0
    # The ETA is the rest of the range at the pace the run covered it.
    run = st.history[0]
    assert run["outcome"] == "running" and run["cursor_at_start"] is None
    elapsed = (ckpt.updated_at - run["started_at"]).total_seconds()  # type: ignore[operator]
    done = (int(ckpt.cursor[0]) - 1) / 3999  # type: ignore[index]
    assert rate.eta_seconds == pytest.approx((1 - done) * elapsed / done)
    out = await anyio.to_thread.run_sync(
        lambda: cli("status", "users-display-name", "--json", env=db.env())
    )
    assert out.returncode == 0, out.stderr
    entry = json.loads(out.stdout)["jobs"][0]
    assert entry["rows_per_second"] > 0 and entry["eta_seconds"] >= 0


async def test_metrics_of_a_run_through_the_api(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed_users(db, "generate_series(1, 1000)")
    captured: list[RunMetrics] = []

    def keep(**kwargs: Any) -> RunMetrics:
        captured.append(RunMetrics(**kwargs))
        return captured[-1]

    monkeypatch.setattr(metrics, "RunMetrics", keep)
    # Port 0: no endpoint; the run still keeps its metrics, checked here.
    ckpt = await commands.run(parse_job(users_job()), db.params, observers=[],
                              telemetry=Telemetry(metrics_port=0))
    text = generate_latest(captured[0].served).decode()
    values = {
        (s.name, s.labels.get("outcome") or s.labels.get("state")): s.value
        for f in text_string_to_metric_families(text) for s in f.samples
        if s.labels.get("job") == "users-display-name" and s.labels.get("shard") == "0"
    }
    assert ckpt.rows_updated == values[("backfill_rows_updated_total", None)] == 1000
    assert ckpt.batches == values[("backfill_batches_total", "committed")] == 10
    assert values[("backfill_state", "succeeded")] == 1
    assert values[("backfill_progress_ratio", None)] == 1


async def _until(db: Database, query: str) -> None:
    """Poll the database until ``query`` is true (the runner is another process)."""
    while True:
        if await db.fetchval(query):
            return
        await anyio.sleep(0.05)
