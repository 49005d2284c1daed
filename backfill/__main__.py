from __future__ import annotations

from backfill.commands.argv import main

main()
