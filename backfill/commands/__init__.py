"""One plain async function per CLI verb; together they are the programmatic API.

Each takes validated values (a ``Job``, ``ConnectParams``) and raises ``BackfillError``
subclasses; the CLI only parses arguments and maps errors to exit codes.

Each verb's module is imported when one of its names is first used (PEP 562): ``backfill run``
loads only the runner's before its first batch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backfill.commands._common import ADMIN_BUDGET as ADMIN_BUDGET
    from backfill.commands.inspect import Plan as Plan
    from backfill.commands.inspect import plan as plan
    from backfill.commands.inspect import verify as verify
    from backfill.commands.lifecycle import cutover as cutover
    from backfill.commands.lifecycle import finish as finish
    from backfill.commands.lifecycle import rollback as rollback
    from backfill.commands.runner import run as run
    from backfill.commands.state import Controlled as Controlled
    from backfill.commands.state import Impact as Impact
    from backfill.commands.state import Rate as Rate
    from backfill.commands.state import Status as Status
    from backfill.commands.state import init as init
    from backfill.commands.state import pause as pause
    from backfill.commands.state import reset as reset
    from backfill.commands.state import resume as resume
    from backfill.commands.state import set_live as set_live
    from backfill.commands.state import status as status

# Where each public name lives.
_MODULES = {
    "_common": ("ADMIN_BUDGET",),
    "inspect": ("Plan", "plan", "verify"),
    "lifecycle": ("cutover", "finish", "rollback"),
    "runner": ("run",),
    "state": ("Controlled", "Impact", "Rate", "Status", "init", "pause", "reset", "resume",
              "set_live", "status"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}

if not TYPE_CHECKING:  # mypy reads the imports above, and still flags a name not among them

    def __getattr__(name: str) -> Any:
        module = _WHERE.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
