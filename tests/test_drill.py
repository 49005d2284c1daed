"""The pod-kill drill: the Kubernetes walk-through of docs/kubernetes.md, with processes standing
in for pods.

The init Job and the runner Job run exactly as the rendered manifests say (command from the
image, args, env from the Secrets, the job file where the ConfigMap is mounted); the runner's
pods are stopped the way the kubelet stops them and replaced the way the Job controller
replaces them, until the Job completes. Every row must be updated exactly once, and every exit
code must be one the podFailurePolicy handles as intended.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import anyio
import pytest

from backfill.errors import ExitCode
from tests.conftest import Database, seed_users, write_job
from tests.kube import (
    K8S,
    NO_KUBECTL,
    REPO,
    Doc,
    JobController,
    Kubelet,
    Pod,
    job,
    kinds,
    kubectl,
    render,
)

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(kubectl() is None, reason=NO_KUBECTL)]

ROWS = 20_000
START_SECONDS = 30  # a pod's start-up, interpreter included, on a loaded machine


def readme_grants(role: str) -> list[str]:
    """The SQL docs/kubernetes.md tells the owner to run, for ``role``."""
    page = (REPO / "docs" / "kubernetes.md").read_text()
    block = re.search(r"```sql\n(.*?)```", page, re.S)
    assert block, "docs/kubernetes.md has no ```sql block"
    statements = [s.strip() for s in block.group(1).split(";") if s.strip()]
    return [s.replace("backfill_runner", role) for s in statements]


def counting(config_map: Doc, directory: Path) -> tuple[str, str]:
    """The shipped job file, plus a counter of how often each row is updated: (name, TOML)."""
    fields = tomllib.loads(config_map["data"]["job.toml"])
    fields["set"] += ", touched = touched + 1"
    return fields["name"], write_job(directory, fields).read_text()


async def batches(db: Database, name: str) -> int:
    value = await db.fetchval("SELECT batches FROM backfill.checkpoints WHERE job = $1", name)
    return int(value or 0)


async def run_until(pod: Pod, db: Database, name: str, *, more_than: int) -> None:
    """Poll the checkpoint until the pod has committed past ``more_than`` batches."""
    with anyio.fail_after(START_SECONDS):
        while await batches(db, name) <= more_than:
            assert pod.process is not None and pod.process.returncode is None, pod.output()
            await anyio.sleep(0.01)


async def test_pod_kill_drill(db: Database, tmp_path: Path) -> None:
    overlay = render(K8S / "jobs" / "users-display-name")
    runner = job(overlay)
    init = job(render(K8S / "init"), "init")

    (shipped,) = kinds(overlay, "ConfigMap")
    name, job_file = counting(shipped, tmp_path)

    # A database as a fresh cluster finds it: the table, no state schema, no runner role.
    await db.execute("DROP SCHEMA backfill CASCADE")
    assert await seed_users(db, f"generate_series(1, {ROWS})") == ROWS
    role = f"runner_{db.name}"
    async with Kubelet(
        secrets={
            "backfill-db-owner": {"url": db.dsn},
            "backfill-db": {"url": db.server.dsn(db.name, user=role)},
        },
        config_maps={shipped["metadata"]["name"]: {"job.toml": job_file}},
        workdir=tmp_path / "pods",
    ) as kubelet:

        # The init Job, then the docs' grants for the runner role.
        pod = await kubelet.pod(init).start()
        with anyio.fail_after(START_SECONDS):
            assert await pod.wait() == 0, pod.output()
        assert JobController(init).observe(0) == "Complete"
        for statement in readme_grants(role):
            await db.execute(statement)

        # The runner Job's pods, until the Job completes.
        controller = JobController(runner)

        # Pod 1 is stopped by the kubelet (a node drain, `kubectl delete pod`): SIGTERM, then
        # SIGKILL if still running after the grace period. It stops after the batch in flight
        # and exits 75.
        pod = await kubelet.pod(runner).start()
        await run_until(pod, db, name, more_than=2)
        assert await pod.stop() == ExitCode.TEMPFAIL, pod.output()
        assert not pod.killed and pod.stop_seconds is not None and pod.stop_seconds < pod.grace
        assert pod.scrapes > 0, "its final state was not scraped on the `metrics` port"
        assert controller.observe(pod.exit_code or 0) == "Retry"  # Ignore: not counted

        # Pod 2 dies without warning (OOM killer, lost node): SIGKILL, exit 137.
        pod = await kubelet.pod(runner).start()
        await run_until(pod, db, name, more_than=await batches(db, name) + 2)
        assert await pod.kill() == 137
        assert controller.observe(137) == "Retry"  # counted, within backoffLimit
        assert controller.failed == 1

        # Pod 3 runs to the end.
        pod = await kubelet.pod(runner).start()
        with anyio.fail_after(START_SECONDS):
            assert await pod.wait() == 0, pod.output()
        assert pod.scrapes > 0
        assert controller.observe(0) == "Complete"
        assert controller.decisions == [(75, "Retry"), (137, "Retry"), (0, "Complete")]

        # Every row exactly once, and the run history tells the same story.
        counts = await db.fetch("SELECT touched, count(*) AS n FROM public.users GROUP BY touched")
        assert [(r["touched"], r["n"]) for r in counts] == [(1, ROWS)]
        runs = await db.fetch(
            "SELECT outcome, rows_updated FROM backfill.runs WHERE job = $1 ORDER BY id", name
        )
        assert [r["outcome"] for r in runs] == ["interrupted", "killed", "succeeded"]
        assert sum(r["rows_updated"] for r in runs) == ROWS
        assert all(r["rows_updated"] > 0 for r in runs)


async def blocked(db: Database, name: str) -> None:
    """Until the runner's batch waits on a row lock."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
        "AND wait_event_type = 'Lock'"
    )
    with anyio.fail_after(START_SECONDS):
        while True:
            if await db.fetchval(query, f"backfill:{name}"):
                return
            await anyio.sleep(0.01)


async def test_stop_during_a_blocked_batch(db: Database, tmp_path: Path) -> None:
    """SIGTERM while the batch in flight waits on a lock: the runner rolls it back within
    lock_timeout and exits 75, well inside the grace period. With a grace period too short for
    that (``kubectl delete pod --grace-period=1``), the kubelet's SIGKILL loses nothing either."""
    overlay = render(K8S / "jobs" / "users-display-name")
    runner = job(overlay)
    (shipped,) = kinds(overlay, "ConfigMap")
    name, job_file = counting(shipped, tmp_path)
    await seed_users(db, f"generate_series(1, {ROWS})")
    async with Kubelet(
        secrets={"backfill-db": {"url": db.dsn}},
        config_maps={shipped["metadata"]["name"]: {"job.toml": job_file}},
        workdir=tmp_path / "pods",
    ) as kubelet:
        controller = JobController(runner)
        holder = await db.connect()
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("SELECT 1 FROM public.users WHERE id = $1 FOR UPDATE", ROWS // 2)

            pod = await kubelet.pod(runner).start()
            await blocked(db, name)
            assert await pod.stop() == ExitCode.TEMPFAIL, pod.output()
            assert not pod.killed and pod.stop_seconds is not None and pod.stop_seconds < pod.grace
            assert controller.observe(ExitCode.TEMPFAIL) == "Retry"

            pod = kubelet.pod(runner)
            pod.grace = 0.2  # shorter than lock_timeout: the kubelet has to SIGKILL
            await pod.start()
            await blocked(db, name)
            assert await pod.stop() == 137 and pod.killed
            assert controller.observe(137) == "Retry"
            await tx.rollback()
        finally:
            await holder.close()

        pod = await kubelet.pod(runner).start()
        with anyio.fail_after(START_SECONDS):
            assert await pod.wait() == 0, pod.output()
        assert controller.observe(0) == "Complete"
        counts = await db.fetch("SELECT touched, count(*) AS n FROM public.users GROUP BY touched")
        assert [(r["touched"], r["n"]) for r in counts] == [(1, ROWS)]


async def test_sharded_job_pods_split_the_work(db: Database, tmp_path: Path) -> None:
    """The Indexed Job of k8s/variants/sharded: each pod's --shard comes from its completion
    index through the manifest's env and args; together the N pods update every row once."""
    docs = render(K8S / "variants" / "sharded")
    runner = job(docs)
    n = runner["spec"]["completions"]
    (shipped,) = kinds(docs, "ConfigMap")
    name, job_file = counting(shipped, tmp_path)
    rows = await seed_users(db, "generate_series(1, 8000)")
    await db.execute("ANALYZE public.users")
    async with Kubelet(
        secrets={"backfill-db": {"url": db.dsn}},
        config_maps={shipped["metadata"]["name"]: {"job.toml": job_file}},
        workdir=tmp_path / "pods",
    ) as kubelet:
        # parallelism = completions: the Job controller starts every index at once.
        pods = [await kubelet.pod(runner, index=i).start() for i in range(n)]
        with anyio.fail_after(START_SECONDS):
            codes = [await pod.wait() for pod in pods]
        assert codes == [0] * n, [pod.output() for pod in pods]
        assert all(pod.scrapes > 0 for pod in pods)

        assert await db.fetchval("SELECT count(*) FROM public.users WHERE touched <> 1") == 0
        shards = await db.fetch(
            "SELECT shard, shards, state, rows_updated FROM backfill.checkpoints WHERE job = $1"
            " ORDER BY shard", name,
        )
        assert [(r["shard"], r["shards"], r["state"]) for r in shards] == [
            (i, n, "succeeded") for i in range(n)
        ]
        assert sum(r["rows_updated"] for r in shards) == rows
