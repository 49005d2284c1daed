"""Getting a run's metrics out: an HTTP endpoint to scrape, and pushes to a Pushgateway.

The endpoint serves ``/metrics`` (the Prometheus text or OpenMetrics format, as the scraper
asks) and ``/healthz`` from a small threaded WSGI server in a daemon thread, so a scrape never
blocks the event loop. It runs from before the first batch until the run has ended (and, with a
``linger``, until one scrape has seen the final state). A port that cannot be bound is a warning,
never a failed backfill.

With a Pushgateway URL, the run's registry is pushed every ``push_interval`` seconds and once at
the end, from a worker thread with a timeout, into the group ``{job=<job name>, shard=<n>}`` with
push-add semantics (HTTP POST: only the families in the push are replaced; every family always
has samples, see ``backfill.metrics``). ``backfill_last_success_timestamp_seconds`` lives in a
registry of its own, pushed (POST, same group) only after a success: no later push of a failed or
interrupted run touches it. A run that never held the job's lock (another runner has it, bad
configuration) pushes nothing, so it cannot clobber the group of the runner that does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from functools import partial
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio
from prometheus_client import CollectorRegistry, make_wsgi_app, pushadd_to_gateway
from prometheus_client.exposition import basic_auth_handler, default_handler

from backfill.metrics import RunMetrics
from backfill.settings import Telemetry

log = logging.getLogger(__name__)

PUSH_TIMEOUT = 5.0  # seconds per push attempt

StartResponse = Callable[..., Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Sent(list[bytes]):
    """A response body that calls ``then`` once it has been written to the socket (the WSGI
    server closes the body after the last write): the final scrape counts as taken only then,
    so the run's end cannot cut it short."""

    def __init__(self, body: list[bytes], then: Callable[[], None]) -> None:
        super().__init__(body)
        self._then = then

    def close(self) -> None:
        self._then()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Exporter:
    """Serves and pushes one run's metrics; ``start`` before the run, ``close`` after it."""

    def __init__(self, metrics: RunMetrics, telemetry: Telemetry) -> None:
        self.metrics = metrics
        self.telemetry = telemetry
        self.port: int | None = None  # the bound port, once serving
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._metrics_app = make_wsgi_app(metrics.served)
        self._final = False
        self._scraped_final = threading.Event()
        self._push_failing = False
        url = telemetry.pushgateway_url.get_secret_value() if telemetry.pushgateway_url else ""
        self._gateway, self._handler, self.gateway_name = _gateway(url)

    # --- the HTTP endpoint ----------------------------------------------------------------------

    def start(self) -> None:
        """Bind and serve in a daemon thread (nothing when the port is 0)."""
        t = self.telemetry
        if t.metrics_port == 0:
            return
        server_class = _Server6 if ":" in t.metrics_address else _Server
        try:
            server = make_server(
                t.metrics_address, t.metrics_port, self._app,
                server_class=server_class, handler_class=_Quiet,
            )
        except OSError as exc:
            log.warning(
                "metrics endpoint not served: cannot listen",
                extra={"job": self.metrics.job, "address": t.metrics_address,
                       "port": t.metrics_port, "error": exc.strerror or str(exc)},
            )
            return
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name="backfill-metrics", daemon=True,
        )
        self._thread.start()
        log.debug("serving metrics", extra={"job": self.metrics.job, "port": self.port})

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/healthz":
            body = json.dumps(
                {"status": "ok", "job": self.metrics.job, "state": self.metrics.current_state}
            ).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if path in ("/metrics", "/"):
            final = self._final  # read before collecting: this scrape then shows the end
            output = list(self._metrics_app(environ, start_response))
            return _Sent(output, self._scraped_final.set) if final else output
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    # --- the Pushgateway ------------------------------------------------------------------------

    async def push_periodically(self) -> None:
        """Push every ``push_interval`` seconds while the run holds the job (until cancelled)."""
        if not self._gateway:
            return
        while True:
            await anyio.sleep(self.telemetry.push_interval)
            if self.metrics.opened:
                await self._push(self.metrics.registry)

    async def _push(self, registry: CollectorRegistry) -> bool:
        push = partial(
            pushadd_to_gateway, self._gateway, job=self.metrics.job, registry=registry,
            grouping_key={"shard": self.metrics.shard}, timeout=PUSH_TIMEOUT,
            handler=self._handler,
        )
        try:
            await anyio.to_thread.run_sync(push, abandon_on_cancel=True)
        except Exception as exc:  # urllib's errors: URLError, HTTPError, OSError, timeouts
            if not self._push_failing:
                log.warning(
                    "push to the Pushgateway failed",
                    extra={"job": self.metrics.job, "gateway": self.gateway_name,
                           "error": f"{type(exc).__name__}: {exc}"},
                )
            self._push_failing = True
            return False
        if self._push_failing:
            log.info("pushing to the Pushgateway again",
                     extra={"job": self.metrics.job, "gateway": self.gateway_name})
        self._push_failing = False
        return True

    # --- the end --------------------------------------------------------------------------------

    async def close(self, state: str, error: BaseException | None = None) -> None:
        """Record the final state, push it (and the success time after a success), serve one
        more scrape within ``linger`` seconds, stop serving. Shielded and bounded."""
        self.metrics.finish(state, error)
        self._final = True
        t = self.telemetry
        with anyio.CancelScope(shield=True):
            if self._gateway and self.metrics.opened:
                with anyio.move_on_after(2 * PUSH_TIMEOUT + 1):
                    if await self._push(self.metrics.registry) and self.metrics.succeeded:
                        await self._push(self.metrics.success)
            server = self._server
            if server is None:
                return
            if t.linger > 0:
                await anyio.to_thread.run_sync(self._scraped_final.wait, t.linger)
            # A listening socket shut down wakes the serving thread's poll at once (Linux),
            # instead of at its next poll_interval: ~50 ms off every run's end.
            with contextlib.suppress(OSError):
                server.socket.shutdown(socket.SHUT_RDWR)
            await anyio.to_thread.run_sync(server.shutdown)
            server.server_close()
            self._server = None


def _gateway(url: str) -> tuple[str, Callable[..., Any], str]:
    """The push URL without credentials, a handler that sends them, and a printable name."""
    if not url:
        return "", default_handler, ""
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    bare = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if parts.username is None:
        return bare, default_handler, bare
    handler = partial(basic_auth_handler, username=parts.username, password=parts.password or "")
    return bare, handler, bare
