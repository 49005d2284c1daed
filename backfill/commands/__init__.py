"""One plain async function per CLI verb; together they are the programmatic API.

Each takes validated values (a ``Job``, ``ConnectParams``) and raises ``BackfillError``
subclasses; the CLI only parses arguments and maps errors to exit codes.

The verbs' modules are imported when first used (PEP 562): ``backfill run`` imports only the
runner's, before its first batch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_WHERE = {
    "ADMIN_BUDGET": "_common",
    "Plan": "inspect", "plan": "inspect", "verify": "inspect",
    "run": "runner",
    "Controlled": "state", "Impact": "state", "Rate": "state", "Status": "state",
    "init": "state", "pause": "state", "reset": "state", "resume": "state",
    "set_live": "state", "status": "state",
}

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

if not TYPE_CHECKING:  # mypy reads the imports above, and still flags a name not among them

    def __getattr__(name: str) -> Any:
        module = _WHERE.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
