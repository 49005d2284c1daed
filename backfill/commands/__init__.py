"""One plain async function per CLI verb; together they are the programmatic API.

Each takes validated values (a ``Job``, ``ConnectParams``) and raises ``BackfillError``
subclasses; the CLI only parses arguments and maps errors to exit codes.
"""

from __future__ import annotations

from backfill.commands._common import ADMIN_BUDGET
from backfill.commands.inspect import Plan, plan, verify
from backfill.commands.runner import run
from backfill.commands.state import (
    Controlled,
    Impact,
    Rate,
    Status,
    init,
    pause,
    reset,
    resume,
    set_live,
    status,
)

__all__ = [
    "ADMIN_BUDGET",
    "Controlled",
    "Impact",
    "Plan",
    "Rate",
    "Status",
    "init",
    "pause",
    "plan",
    "reset",
    "resume",
    "run",
    "set_live",
    "status",
    "verify",
]
