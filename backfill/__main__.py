from __future__ import annotations

from backfill.cli import main

main()
