"""``backfill demo`` as a newcomer runs it: a real process with its own throwaway server, its
metrics served while it runs, and with ``--keep`` a server to try the other verbs on until
Ctrl-C stops it and removes its data."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from backfill.pgtemp import ServerUnavailable, find_bindir, free_port
from tests.conftest import REPO, cli


@pytest.fixture(autouse=True)
def _server_binaries() -> None:
    try:
        find_bindir()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))


def demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BACKFILL_"))}
    env.pop("DATABASE_URL", None)
    return env | extra


class Demo:
    """``backfill demo ARGS`` with its stderr read line by line as it comes."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backfill", "demo", *args], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, pattern: str, *, within: float) -> re.Match[str]:
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.seen[-20:]))

    def close(self) -> None:
        """Ctrl-C first, so that a failed test leaves no server behind; SIGKILL if need be."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=30)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return None


def _scrape_until(url: str, done: threading.Event, into: list[str]) -> None:
    while not done.wait(0.05):
        if (text := _scrape(url)) is not None:
            into.append(text)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_keep_leaves_a_server_to_explore_until_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    # The run waits at its end until one scrape has seen its final state: no race to scrape.
    env = demo_env(BACKFILL_METRICS_LINGER_SECONDS="60")
    demo = Demo("--rows", "3000", "--batch-size", "500", "--keep", "--metrics-port", str(port),
                env=env)
    try:
        started = demo.expect(r"on 127\.0\.0\.1:(\d+) .*, data in (\S+)$", within=60)
        server_port, data = int(started[1]), Path(started[2])
        assert data.is_dir()
        url = demo.expect(r"metrics while it runs: (http://\S+)$", within=60)[1]
        assert url == f"http://127.0.0.1:{port}/metrics"
        scrapes: list[str] = []
        done = threading.Event()
        scraper = threading.Thread(target=_scrape_until, args=(url, done, scrapes), daemon=True)
        scraper.start()
        demo.expect(r"^done: 3,000 rows in 6 batches.*verify: 0 rows left$", within=60)
        done.set()
        scraper.join(timeout=10)
        final = 'backfill_state{job="users-display-name",shard="0",state="succeeded"} 1.0'
        assert any(final in text for text in scrapes), f"never scraped the final state of {url}"
        demo.expect(r"stays up until Ctrl-C", within=10)
        dsn = demo.expect(r"export BACKFILL_DATABASE_URL='(\S+)'$", within=10)[1]
        job = Path(demo.expect(r"^  backfill run (\S+\.toml)$", within=10)[1])

        # Every verb works against the kept server.
        there = demo_env(BACKFILL_DATABASE_URL=dsn, BACKFILL_METRICS_PORT="0")
        status = cli("status", "users-display-name", env=there)
        assert status.returncode == 0 and "succeeded" in status.stdout, status.stderr
        assert cli("set", "users-email-domain", "batch.sleep_seconds=0", env=there).returncode == 0
        assert cli("verify", job, env=there).returncode == 1  # not run yet: every row left
        run = cli("run", job, env=there)
        assert run.returncode == 0 and "3,000 rows updated" in run.stderr, run.stderr
        assert cli("verify", job, env=there).returncode == 0

        demo.proc.send_signal(signal.SIGINT)
        assert demo.proc.wait(timeout=60) == 0
        demo.expect(r"stopping the throwaway server and removing its data", within=10)
    finally:
        demo.close()
    assert not data.exists(), f"{data} is left behind"
    assert not _accepts(server_port)


def test_without_keep_nothing_is_left(tmp_path: Path) -> None:
    demo = Demo("--rows", "500", "--metrics-port", "0", env=demo_env())
    try:
        data = Path(demo.expect(r", data in (\S+)$", within=60)[1])
        demo.expect(r"^done: 500 rows .* verify: 0 rows left$", within=60)
        assert demo.proc.wait(timeout=60) == 0
    finally:
        demo.close()
    assert not data.exists()
    assert not [line for line in demo.seen if line.startswith("metrics while it runs")]


def test_bad_input_starts_no_server() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "backfill", "demo", "--batch-size", "2000000"], cwd=REPO,
        env=demo_env(), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 78 and "batch.size" in out.stderr, out.stderr
    assert "throwaway PostgreSQL" not in out.stderr
