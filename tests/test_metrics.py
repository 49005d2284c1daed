"""Metrics, progress and log lines driven by fake events: no database, no sleeps."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backfill import __version__
from backfill.checkpoint import BatchResult, Checkpoint
from backfill.errors import Contention, DataFailure, RowError, StatementTimeout, Unavailable
from backfill.export import Exporter, _gateway
from backfill.metrics import ERROR_REASONS, OUTCOMES, STATES, THROTTLE_REASONS, RunMetrics
from backfill.observers import LogLines, Progress
from backfill.pgtemp import free_port
from backfill.progress import KeyEstimate, Tracker, run_rate
from backfill.protocols import Pause
from backfill.settings import Telemetry, TelemetrySettings
from tests.observability import metrics_of_a_run


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def checkpoint(**kw: Any) -> Checkpoint:
    values: dict[str, Any] = {
        "job": "users", "shard": 0, "shards": 1, "fingerprint": "f", "state": "running",
        "range_lo": ("1",), "range_hi": ("1001",), "cursor": None,
    }
    return Checkpoint(**(values | kw))


def batch(cursor: int, rows: int, size: int = 100, seconds: float = 0.02) -> BatchResult:
    return BatchResult(cursor=(str(cursor),), rows=rows, size=size, seconds=seconds)


def samples(metrics: RunMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the HTTP endpoint would serve, by (name, sorted labels)."""
    text = generate_latest(metrics.served).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: RunMetrics, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"job": "users", "shard": "0", **labels}.items())))
    return samples(metrics)[key]


def test_rows_a_crash_lost_are_counted_once_when_redone() -> None:
    """A server crash can lose the last batches it acknowledged (unflushed commits) with their
    checkpoint: the next session starts from less than the runner counted, and redoes them."""
    m, run = metrics_of_a_run(job="users", table="public.users")
    run.started(checkpoint(cursor=("100",), rows_updated=50, batches=1))  # an earlier run's
    for cursor in (200, 300, 400):
        run.committed(batch(cursor, rows=100))
    assert value(m, "backfill_rows_updated_total") == 300
    run.started(checkpoint(cursor=("200",), rows_updated=150, batches=2))  # 300 and 400 lost
    for cursor, counted in ((300, 300), (400, 300), (500, 400)):
        run.committed(batch(cursor, rows=100))
        assert value(m, "backfill_rows_updated_total") == counted
    assert m.tracker.rows - 50 == 400  # the checkpoint's rows, less the earlier run's


def test_counts_what_happened() -> None:
    clock, mono = Clock(), Clock(0.0)
    m, run = metrics_of_a_run(job="users", table="public.users", clock=clock, monotonic=mono)
    run.started(checkpoint())
    run.state("running")
    for i in range(1, 4):
        mono.now += 1
        clock.now += 1
        run.committed(batch(100 * i, rows=90 + i, seconds=0.02 * i))
    run.throttled(Pause(0.5, "sleep"))
    run.throttled(Pause(2.0, "replication_lag"))
    assert value(m, "backfill_rows_updated_total") == 91 + 92 + 93  # what UPDATE reported
    assert value(m, "backfill_batches_total", outcome="committed") == 3
    assert value(m, "backfill_batch_duration_seconds_count") == 3
    assert value(m, "backfill_batch_duration_seconds_bucket", le="0.05") == 2
    assert value(m, "backfill_batch_size") == 100
    assert value(m, "backfill_last_commit_timestamp_seconds") == 1003.0
    assert value(m, "backfill_throttle_seconds_total", reason="replication_lag") == 2.0
    assert value(m, "backfill_progress_ratio") == pytest.approx(0.299)
    assert value(m, "backfill_eta_seconds") == pytest.approx(0.701 / (0.299 / 3))
    assert value(m, "backfill_rows_remaining_estimate") == pytest.approx(276 / 0.299 * 0.701)
    assert value(m, "backfill_state", state="running") == 1
    assert value(m, "backfill_info", table="public.users", shape="update",
                 version=__version__) == 1
    # Every known label value exists from the start (complete families, rate() from zero).
    outcomes = {dict(ls)["outcome"] for n, ls in samples(m) if n == "backfill_batches_total"}
    assert outcomes == set(OUTCOMES)
    reasons = {dict(ls)["reason"] for n, ls in samples(m) if n == "backfill_batch_errors_total"}
    assert reasons == set(ERROR_REASONS)
    reasons = {dict(ls)["reason"] for n, ls in samples(m) if n == "backfill_throttle_seconds_total"}
    assert reasons == set(THROTTLE_REASONS)
    states = {dict(ls)["state"] for n, ls in samples(m) if n == "backfill_state"}
    assert states == set(STATES)


def test_labels_never_carry_keys() -> None:
    m, run = metrics_of_a_run(job="users", table="public.users", shard=3)
    run.started(checkpoint(shard=3, range_lo=("a-secret-key",), range_hi=("zz",)))
    run.failed(DataFailure("bad row"), cursor=("a-secret-key",), size=10)
    run.skipped(("a-secret-key",))
    text = generate_latest(m.served).decode()
    assert "a-secret-key" not in text
    names = {ln for _, labels in samples(m) for ln, _ in labels}
    assert names <= {"job", "shard", "outcome", "reason", "state", "le", "table", "shape",
                     "version"}


def test_retried_and_failed_attempts() -> None:
    m, run = metrics_of_a_run(job="users", table="t")
    run.started(checkpoint())
    run.failed(StatementTimeout("slow"), cursor=None, size=100)
    run.throttled(Pause(0.1, "backoff"))
    run.committed(batch(50, rows=50, size=50))  # the retry, smaller
    run.failed(Contention("locked", reason="lock_timeout"), cursor=("50",), size=50)
    run.failed(Contention("locked", reason="lock_timeout"), cursor=("50",), size=50)
    last = Contention("locked", reason="lock_timeout")
    try:
        raise Unavailable("giving up after 3 consecutive failed attempts") from last
    except Unavailable as exc:
        m.finish("failed", exc)  # the attempt the loop gave up on was never reported
    assert value(m, "backfill_batches_total", outcome="committed") == 1
    assert value(m, "backfill_batches_total", outcome="retried") == 3
    assert value(m, "backfill_batches_total", outcome="failed") == 1
    assert value(m, "backfill_batch_errors_total", reason="statement_timeout") == 1
    assert value(m, "backfill_batch_errors_total", reason="lock_timeout") == 3
    assert value(m, "backfill_state", state="failed") == 1
    assert value(m, "backfill_state", state="running") == 0
    assert m.last_success.collect()[0].samples == []  # no success time after a failure


def test_row_error_fails_the_reported_attempt() -> None:
    m, run = metrics_of_a_run(job="users", table="t")
    run.started(checkpoint())
    bad = DataFailure("value too long")
    for size in (4, 2, 1):
        run.failed(bad if size == 1 else DataFailure("value too long"), cursor=None, size=size)
    try:
        raise RowError("row 3 makes the SET fail", keys=("3",)) from bad
    except RowError as exc:
        m.finish("failed", exc)
    assert value(m, "backfill_batches_total", outcome="retried") == 2
    assert value(m, "backfill_batches_total", outcome="failed") == 1
    assert value(m, "backfill_batch_errors_total", reason="data") == 3


def test_success_time_only_after_success() -> None:
    clock = Clock(5000.0)
    m, run = metrics_of_a_run(job="users", table="t", clock=clock)
    run.started(checkpoint())
    run.state("succeeded")
    m.finish("succeeded")
    run.state("running")  # nothing after a final state changes it
    assert value(m, "backfill_last_success_timestamp_seconds") == 5000.0
    assert value(m, "backfill_state", state="succeeded") == 1
    assert value(m, "backfill_progress_ratio") == 1.0
    assert value(m, "backfill_eta_seconds") == 0.0
    # The run's registry (pushed periodically) does not hold it; the success registry does.
    assert b"last_success" not in generate_latest(m.registry)
    assert b"last_success" in generate_latest(m.success)


def test_unknown_progress_is_nan_until_estimated() -> None:
    mono = Clock(0.0)
    m, run = metrics_of_a_run(job="users", table="t", monotonic=mono)
    run.started(checkpoint(range_lo=("aaa",), range_hi=("zzz",)))
    mono.now = 1
    run.committed(BatchResult(cursor=("bbb",), rows=100, size=100, seconds=0.01))
    assert math.isnan(value(m, "backfill_progress_ratio"))
    m.tracker.use_estimate(KeyEstimate(total=10_000, done=0), mono.now)
    for i in range(2, 5):
        mono.now = i
        run.committed(BatchResult(cursor=(f"c{i}",), rows=100, size=100, seconds=0.01))
    assert value(m, "backfill_progress_ratio") == pytest.approx(0.04)
    assert value(m, "backfill_eta_seconds") == pytest.approx(0.96 / 0.01)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_exposition_passes_promtool() -> None:
    m, run = metrics_of_a_run(job="users", table="public.users")
    run.started(checkpoint())
    run.committed(batch(100, rows=100))
    run.failed(StatementTimeout("slow"), cursor=("100",), size=100)
    run.throttled(Pause(1.0, "rate_limit"))
    m.finish("succeeded")
    out = subprocess.run(
        ["promtool", "check", "metrics"], input=generate_latest(m.served),
        capture_output=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --- progress for people -------------------------------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logged() -> Iterator[Records]:
    """The package's log records (whatever ``logs.setup`` did to propagation)."""
    handler, logger = Records(), logging.getLogger("backfill")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_log_lines_are_few(logged: Records) -> None:
    clock = Clock(0.0)
    progress = Progress(Tracker(), clock=clock)
    lines = LogLines("users", progress, every=10.0, clock=clock)
    for o in (progress, lines):
        o.started(checkpoint())
        o.state("running")
    for i in range(1, 101):  # 100 batches in 25 s, each with a sleep
        clock.now = i * 0.25
        for o in (progress, lines):
            o.committed(batch(i * 10, rows=10, size=10))
            o.state("throttled")
            o.throttled(Pause(0.05, "sleep"))
            o.state("running")
    messages = [r.getMessage() for r in logged.records]
    assert messages == ["run started", "state", "progress", "progress"]
    for o in (progress, lines):
        o.throttled(Pause(1.0, "replication_lag"))
        o.throttled(Pause(1.0, "replication_lag"))  # the same episode: no second line
        o.committed(batch(1000, rows=0, size=10))
        o.failed(DataFailure("value too long"), cursor=("990",), size=10)
        o.failed(StatementTimeout("slow"), cursor=("990",), size=10)  # the loop logs these
        o.state("succeeded")
    records = logged.records[4:]
    assert [r.getMessage() for r in records] == [
        "throttled", "throttle ended", "batch rolled back on a data error; narrowing it down",
        "state",
    ]
    assert (records[0].reason, records[2].keys_after, records[2].reason) == (  # type: ignore[attr-defined]
        "replication_lag", ("990",), "data"
    )
    assert records[3].state == "succeeded"  # type: ignore[attr-defined]


def test_estimate_gives_text_keys_a_fraction() -> None:
    t = Tracker()
    t.start(checkpoint(range_lo=("a",), range_hi=("z",), cursor=("m",)), 0.0)
    assert t.fraction is None
    t.use_estimate(KeyEstimate(total=1000.0, done=500.0), 0.0)
    assert t.fraction == 0.5
    t.commit(BatchResult(cursor=("n",), rows=7, size=100, seconds=0.1), 10.0)
    assert t.fraction == 0.6
    assert t.eta_seconds() == pytest.approx(40.0)


def test_status_rate_and_eta_from_history() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ckpt = checkpoint(cursor=("501",), rows_updated=1500, updated_at=t0 + timedelta(seconds=100))
    run = {"started_at": t0, "rows_at_start": 1000, "cursor_at_start": ["251"],
           "outcome": "running", "ended_at": None, "rows_updated": None}
    rate, eta = run_rate(ckpt, run)
    assert rate == 5.0  # 500 rows in 100 s
    assert eta == pytest.approx(200.0)  # a quarter of the range per 100 s, half left
    done = {**run, "outcome": "interrupted", "ended_at": t0 + timedelta(seconds=50),
            "rows_updated": 500}
    assert run_rate(ckpt, done) == (10.0, None)
    old_schema = {k: v for k, v in run.items() if k != "cursor_at_start"}
    assert run_rate(ckpt, old_schema) == (5.0, None)
    assert run_rate(ckpt, None) == (None, None)


# --- settings and the endpoint -------------------------------------------------------------------


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKFILL_METRICS_PORT", "0")
    monkeypatch.setenv("BACKFILL_PUSHGATEWAY_URL", "http://u:pw@gw:9091")
    monkeypatch.setenv("BACKFILL_PUSH_INTERVAL_SECONDS", "500ms")
    monkeypatch.setenv("BACKFILL_PROGRESS_LOG_SECONDS", "2min")
    t = TelemetrySettings().telemetry()
    assert (t.metrics_port, t.push_interval, t.log_every) == (0, 0.5, 120.0)
    assert "pw" not in repr(t)
    assert TelemetrySettings().telemetry(metrics_port=9999, log_every=5).metrics_port == 9999
    assert _gateway("u:pw@gw:9091")[0] == "http://gw:9091"
    assert "pw" not in _gateway("http://u:pw@gw:9091/base")[2]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.anyio
async def test_endpoint_serves_and_lingers_until_scraped() -> None:
    m, run = metrics_of_a_run(job="users", table="t")
    exporter = Exporter(m, Telemetry(metrics_port=free_port(), metrics_address="127.0.0.1",
                                     linger=10.0))
    exporter.start()
    base = f"http://127.0.0.1:{exporter.port}"
    run.started(checkpoint())
    run.committed(batch(100, rows=42))
    status, body = await anyio.to_thread.run_sync(_get, base + "/metrics")
    assert status == 200 and b'backfill_rows_updated_total{job="users",shard="0"} 42.0' in body
    status, body = await anyio.to_thread.run_sync(_get, base + "/healthz")
    assert status == 200 and json.loads(body)["state"] == "running"
    assert (await anyio.to_thread.run_sync(_get, base + "/nope"))[0] == 404

    scraped: list[bytes] = []
    ended = anyio.Event()
    finish = m.finish

    def finish_and_tell(state: str, error: BaseException | None = None) -> None:
        finish(state, error)
        ended.set()

    m.finish = finish_and_tell  # type: ignore[method-assign]

    async def scrape_once_closing() -> None:
        await ended.wait()  # close() has recorded the end and is lingering
        scraped.append((await anyio.to_thread.run_sync(_get, base + "/metrics"))[1])

    with anyio.fail_after(5):  # far below the 10 s linger: the scrape ends it
        async with anyio.create_task_group() as tg:
            tg.start_soon(scrape_once_closing)
            await exporter.close("succeeded")
    assert b'backfill_state{job="users",shard="0",state="succeeded"} 1.0' in scraped[0]
    with pytest.raises(urllib.error.URLError):
        await anyio.to_thread.run_sync(_get, base + "/metrics")


def test_busy_port_is_a_warning(logged: Records) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        exporter = Exporter(RunMetrics(job="users", table="t", tracker=Tracker()),
                            Telemetry(metrics_port=port, metrics_address="127.0.0.1"))
        exporter.start()
    assert exporter.port is None
    messages = [r.getMessage() for r in logged.records]
    assert messages == ["metrics endpoint not served: cannot listen"]


def test_status_shows_pace() -> None:
    from backfill.statusview import pace

    entry = {"rows_per_second": 1234.4, "eta_seconds": 320, "last_commit_age_seconds": 2.0}
    assert pace(entry) == ("1,234/s", "5m20s")
    stale = entry | {"last_commit_age_seconds": 720.0}
    assert pace(stale) == ("1,234/s", "5m20s?")
    assert pace(entry | {"state": "paused"}) == ("1,234/s", "?")
    unknown = {"rows_per_second": None, "eta_seconds": None, "last_commit_age_seconds": None}
    assert pace(unknown) == ("", "")
