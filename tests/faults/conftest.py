"""Fixtures for the fault suite.

Tests that stop, crash or reconfigure a server get their own (``own_pg``, one per module), never
the shared session server. ``admin`` is a superuser connection to the test's database for
polling and injecting faults. ``figures`` collects what the suite survived; with
``BACKFILL_FAULT_FIGURES=path`` set it appends them there as JSON lines (the figures in
docs/failure-behaviour.md).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from backfill.pgtemp import TempPostgres
from tests.conftest import Database, new_database, serving

from .harness import FIGURES


@pytest.fixture(scope="module")
def own_pg() -> Iterator[TempPostgres]:
    """A dedicated server for destructive tests (restarts, pg_hba changes)."""
    with serving() as server:
        yield server


@pytest.fixture
async def own_db(own_pg: TempPostgres) -> AsyncIterator[Database]:
    yield await new_database(own_pg)


@pytest.fixture
async def admin(db: Database) -> AsyncIterator[asyncpg.Connection]:
    conn = await db.connect()
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def figures() -> Counter[str]:
    return FIGURES


@pytest.fixture(scope="session", autouse=True)
def _write_figures() -> Iterator[None]:
    yield
    path = os.environ.get("BACKFILL_FAULT_FIGURES")
    if path and FIGURES:
        with open(path, "a") as f:
            f.write(json.dumps(dict(FIGURES)) + "\n")
