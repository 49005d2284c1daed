"""Helpers shared by the observability tests: the dashboard's queries, the names of the metrics
the runner exports, real Prometheus and Pushgateway processes on free ports."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.parser import text_string_to_metric_families

from backfill.checkpoint import BatchResult, Checkpoint
from backfill.errors import StatementTimeout
from backfill.metrics import RunMetrics
from backfill.observers import Fanout, Progress
from backfill.pgtemp import free_port
from backfill.progress import Tracker
from backfill.protocols import Pause
from backfill.throttling.impact import Controller

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "k8s" / "dashboards" / "backfill.json"
RULES = REPO / "k8s" / "alerts" / "backfill-rules.yaml"
RULE_TESTS = REPO / "k8s" / "alerts" / "backfill-rules.test.yaml"


def metrics_of_a_run(
    *, monotonic: Callable[[], float] = time.monotonic, **kwargs: Any
) -> tuple[RunMetrics, Fanout]:
    """``RunMetrics`` as ``commands.run`` wires it: behind the ``Progress`` that keeps the run's
    tracker. Send the run's events to the ``Fanout``."""
    progress = Progress(Tracker(), clock=monotonic)
    metrics = RunMetrics(tracker=progress.tracker, **kwargs)
    return metrics, Fanout([progress, metrics])


def exported_names() -> set[str]:
    """Every sample name the runner's endpoint can serve (with _bucket, _total, ...)."""
    m, run = metrics_of_a_run(job="j", table="t")
    m.watch(Controller(limit=1.2), lambda: True)  # the impact budget's series too
    run.started(Checkpoint(job="j", shard=0, shards=1, fingerprint="f", state="running",
                           range_lo=("1",), range_hi=("9",), cursor=None))
    run.committed(BatchResult(cursor=("2",), rows=1, size=1, seconds=0.1))
    run.failed(StatementTimeout("slow"), cursor=("2",), size=1)
    run.throttled(Pause(1.0, "sleep"))
    m.finish("succeeded")
    text = generate_latest(m.served).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])  # panels inside collapsed rows


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]


def substitute(expr: str, *, job: str = ".*", rate: str = "1m") -> str:
    """What Grafana sends: template variables and $__rate_interval replaced."""
    return expr.replace("$__rate_interval", rate).replace("$job", job)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    root: Path

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=5) as response:
            body = response.read()
        return json.loads(body) if path.startswith("/api/") else body.decode()

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        answer = self.get("/api/v1/query", query=promql)
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])


def _wait_ready(server: Server, deadline: float) -> None:
    while True:
        try:
            server.get("/-/ready")
            return
        except (urllib.error.URLError, ConnectionError):
            if server.process.poll() is not None or time.monotonic() > deadline:
                log = (server.root / "server.log").read_text(errors="replace")
                raise AssertionError(f"{server.url} did not become ready:\n{log}") from None
            time.sleep(0.05)  # polling a starting process: there is nothing to wait on


@contextmanager
def _process(args: list[str], root: Path, port: int) -> Iterator[Server]:
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    server = Server(process, f"http://127.0.0.1:{port}", root)
    try:
        _wait_ready(server, time.monotonic() + 20)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@contextmanager
def prometheus(targets: list[str], *, scrape_interval: str = "1s") -> Iterator[Server]:
    """Debian's prometheus scraping ``targets`` with ``honor_labels`` (the runner's ``job``
    label is the backfill job's name)."""
    binary = shutil.which("prometheus")
    assert binary is not None
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="backfill-prom-") as tmp:
        root = Path(tmp)
        (root / "prometheus.yml").write_text(
            "global:\n"
            f"  scrape_interval: {scrape_interval}\n"
            f"  scrape_timeout: {scrape_interval}\n"
            "scrape_configs:\n"
            "  - job_name: backfill-runner\n"
            "    honor_labels: true\n"
            "    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        args = [binary, f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn"]
        with _process(args, root, port) as server:
            yield server


@contextmanager
def pushgateway() -> Iterator[Server]:
    binary = shutil.which("prometheus-pushgateway")
    assert binary is not None
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="backfill-pgw-") as tmp:
        args = [binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file=",
                "--log.level=warn"]
        with _process(args, Path(tmp), port) as server:
            yield server


def pushed(gateway: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The Pushgateway's /metrics, by (name, sorted labels without instance): the pushed
    series and the time of each group's last push."""
    text = gateway.get("/metrics")
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "instance"))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith(("backfill_", "push_time_seconds"))
    }


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def scraped(registry: CollectorRegistry) -> Iterator[Server]:
    """``registry`` served on a free port, and a Prometheus scraping it every second."""
    httpd = make_server("127.0.0.1", 0, make_wsgi_app(registry), handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        with prometheus([f"127.0.0.1:{httpd.server_port}"]) as server:
            yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
