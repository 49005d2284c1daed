"""A small TCP proxy between the runner and PostgreSQL, for network faults.

``latency`` delays every chunk in both directions; ``cut()`` drops every open connection;
``refuse()`` stops listening, so new connections get ECONNREFUSED until ``accept()``;
``blackhole()`` accepts new connections but never forwards a byte (a dead network);
``retarget(port)`` sends new connections to another server (a stable address after a failover).

Each proxied connection closes both sides as soon as either reaches EOF or fails; a half-open
pair would leave the client's ``close()`` waiting forever.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ByteStream, SocketListener, TaskGroup

_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)


class Proxy:
    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.latency = 0.0
        self.accepted = 0  # connections accepted so far
        self._blackhole = False
        self._listening: anyio.CancelScope | None = None
        self._links: set[anyio.CancelScope] = set()
        self._tg: TaskGroup | None = None

    def dsn(self, database: str, *, user: str = "postgres", password: str = "") -> str:
        secret = f":{password}" if password else ""
        return f"postgresql://{user}{secret}@127.0.0.1:{self.port}/{database}"

    @property
    def open_links(self) -> int:
        return len(self._links)

    async def _listen(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener: SocketListener = await anyio.create_tcp_listener(
            local_host="127.0.0.1", local_port=self.port
        )
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        with anyio.CancelScope() as scope:
            self._listening = scope
            task_status.started()
            async with listener:
                # Links live in the proxy's task group, so refusing new connections leaves
                # the open ones alone.
                await listener.serve(self._handle, task_group=self._tg)
        self._listening = None

    async def _handle(self, client: ByteStream) -> None:
        self.accepted += 1
        with anyio.CancelScope() as link:
            self._links.add(link)
            try:
                async with client:
                    if self._blackhole:
                        await anyio.sleep_forever()
                    try:
                        server = await anyio.connect_tcp(*self.upstream)
                    except OSError:
                        return
                    async with server, anyio.create_task_group() as tg:
                        tg.start_soon(self._pipe, client, server, link)
                        tg.start_soon(self._pipe, server, client, link)
            except _GONE:
                pass
            finally:
                self._links.discard(link)

    async def _pipe(self, source: ByteStream, sink: ByteStream, link: anyio.CancelScope) -> None:
        try:
            while True:
                chunk = await source.receive()
                if self.latency:
                    await anyio.sleep(self.latency)
                await sink.send(chunk)
        except _GONE:
            pass
        finally:
            link.cancel()  # EOF or error on one side: close both

    # --- faults -----------------------------------------------------------------------------

    def cut(self) -> int:
        """Drop every open connection (both sides closed). Returns how many."""
        links = list(self._links)
        for link in links:
            link.cancel()
        return len(links)

    def refuse(self) -> None:
        """Stop listening: new connections are refused until ``accept()``."""
        if self._listening is not None:
            self._listening.cancel()

    async def accept(self) -> None:
        """Listen again, on the same port, forwarding normally."""
        self._blackhole = False
        if self._listening is None:
            assert self._tg is not None
            await self._tg.start(self._listen)

    def retarget(self, upstream_port: int) -> int:
        """Forward new connections to another server (a DNS name flipping to a promoted
        standby) and drop the open ones. Returns how many were dropped."""
        self.upstream = (self.upstream[0], upstream_port)
        return self.cut()

    def blackhole(self) -> None:
        """Accept new connections but never forward a byte."""
        self._blackhole = True


@asynccontextmanager
async def proxy_to(upstream_port: int) -> AsyncIterator[Proxy]:
    """Run a proxy to ``127.0.0.1:upstream_port`` for the duration of the block."""
    proxy = Proxy(upstream_port)
    async with anyio.create_task_group() as tg:
        proxy._tg = tg
        await tg.start(proxy._listen)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()
