"""Every SQL statement the runner sends, built in one place: one module per kind of statement
(``slices``: the keys a batch covers; ``shapes``: what it does to them; ``batch``: the claim and
the checkpoint around them; ``state``: the state schema and its numbered migrations).

Identifiers go through ``ident``; values are always ``$n`` parameters. Key values travel as
``text[]`` and are cast back to the key's type on the server, so any key type whose text form
round-trips (integers, numeric, uuid, text, timestamps, dates) works without client-side codecs.
Callers write ``sql.NAME``: each module's public names are re-exported here.
"""

from __future__ import annotations

from backfill.sql.batch import (
    AFTER_GROUP as AFTER_GROUP,
)
from backfill.sql.batch import (
    BATCH_TYPES as BATCH_TYPES,
)
from backfill.sql.batch import (
    MOVED as MOVED,
)
from backfill.sql.batch import (
    RECENT as RECENT,
)
from backfill.sql.batch import (
    batch as batch,
)
from backfill.sql.batch import (
    claimed_slice as claimed_slice,
)
from backfill.sql.batch import (
    count_slice as count_slice,
)
from backfill.sql.batch import (
    fragment_checks as fragment_checks,
)
from backfill.sql.batch import (
    group as group,
)
from backfill.sql.batch import (
    prepare as prepare,
)
from backfill.sql.catalog import (
    ALL_COLUMNS as ALL_COLUMNS,
)
from backfill.sql.catalog import (
    ESTIMATED_ROWS as ESTIMATED_ROWS,
)
from backfill.sql.catalog import (
    PRIVILEGES as PRIVILEGES,
)
from backfill.sql.catalog import (
    RELATION as RELATION,
)
from backfill.sql.catalog import (
    RESOLVE as RESOLVE,
)
from backfill.sql.catalog import (
    TABLE_PAGES as TABLE_PAGES,
)
from backfill.sql.catalog import (
    UNINDEXED_REFERENCES as UNINDEXED_REFERENCES,
)
from backfill.sql.catalog import (
    UNIQUE_INDEXES as UNIQUE_INDEXES,
)
from backfill.sql.catalog import (
    WIDENS as WIDENS,
)
from backfill.sql.catalog import (
    highest as highest,
)
from backfill.sql.catalog import (
    key_bounds as key_bounds,
)
from backfill.sql.catalog import (
    lowest as lowest,
)
from backfill.sql.catalog import (
    quantiles as quantiles,
)
from backfill.sql.catalog import (
    sample_counts as sample_counts,
)
from backfill.sql.control import (
    CONTROL_FORGET_PENDING as CONTROL_FORGET_PENDING,
)
from backfill.sql.control import (
    CONTROL_PENDING as CONTROL_PENDING,
)
from backfill.sql.control import (
    CONTROL_ROWS as CONTROL_ROWS,
)
from backfill.sql.control import (
    CONTROL_SAVE_PENDING as CONTROL_SAVE_PENDING,
)
from backfill.sql.control import (
    CONTROL_UPDATE as CONTROL_UPDATE,
)
from backfill.sql.control import (
    PENDING_CONTROLS as PENDING_CONTROLS,
)
from backfill.sql.probes import (
    ACTIVE_SESSIONS as ACTIVE_SESSIONS,
)
from backfill.sql.probes import (
    CANARIES as CANARIES,
)
from backfill.sql.probes import (
    CANARY_READ as CANARY_READ,
)
from backfill.sql.probes import (
    CANARY_WRITE as CANARY_WRITE,
)
from backfill.sql.probes import (
    CONTROL as CONTROL,
)
from backfill.sql.probes import (
    OTHERS as OTHERS,
)
from backfill.sql.probes import (
    OWN_STATEMENTS as OWN_STATEMENTS,
)
from backfill.sql.probes import (
    REPLICATION_LAG as REPLICATION_LAG,
)
from backfill.sql.probes import (
    SHOW_STATE as SHOW_STATE,
)
from backfill.sql.probes import (
    SLOT_LAG as SLOT_LAG,
)
from backfill.sql.probes import (
    STATEMENTS as STATEMENTS,
)
from backfill.sql.probes import (
    STATEMENTS_INSTALLED as STATEMENTS_INSTALLED,
)
from backfill.sql.shapes import (
    ARCHIVE as ARCHIVE,
)
from backfill.sql.shapes import (
    COPY as COPY,
)
from backfill.sql.shapes import (
    DELETE as DELETE,
)
from backfill.sql.shapes import (
    UPDATE as UPDATE,
)
from backfill.sql.shapes import (
    Change as Change,
)
from backfill.sql.shapes import (
    archived_still_in_source as archived_still_in_source,
)
from backfill.sql.slices import (
    INTEGER_TYPES as INTEGER_TYPES,
)
from backfill.sql.slices import (
    Slice as Slice,
)
from backfill.sql.slices import (
    key_of_next_row as key_of_next_row,
)
from backfill.sql.slices import (
    param_slice as param_slice,
)
from backfill.sql.slices import (
    slice_end as slice_end,
)
from backfill.sql.slices import (
    spannable as spannable,
)
from backfill.sql.state import (
    APPLIED as APPLIED,
)
from backfill.sql.state import (
    ARRAY_TYPES as ARRAY_TYPES,
)
from backfill.sql.state import (
    BACKEND_PID as BACKEND_PID,
)
from backfill.sql.state import (
    BEGIN_RUN as BEGIN_RUN,
)
from backfill.sql.state import (
    CLOSE_RUN as CLOSE_RUN,
)
from backfill.sql.state import (
    CREATE as CREATE,
)
from backfill.sql.state import (
    FINISH as FINISH,
)
from backfill.sql.state import (
    HISTORY as HISTORY,
)
from backfill.sql.state import (
    INIT as INIT,
)
from backfill.sql.state import (
    LATEST as LATEST,
)
from backfill.sql.state import (
    LATEST_RUNS as LATEST_RUNS,
)
from backfill.sql.state import (
    LOAD as LOAD,
)
from backfill.sql.state import (
    LOAD_ALL as LOAD_ALL,
)
from backfill.sql.state import (
    LOAD_LOCKED as LOAD_LOCKED,
)
from backfill.sql.state import (
    LOCK_CREATING as LOCK_CREATING,
)
from backfill.sql.state import (
    LOCK_HOLDER as LOCK_HOLDER,
)
from backfill.sql.state import (
    LOCK_MIGRATING as LOCK_MIGRATING,
)
from backfill.sql.state import (
    MIGRATIONS as MIGRATIONS,
)
from backfill.sql.state import (
    NOW as NOW,
)
from backfill.sql.state import (
    RESET as RESET,
)
from backfill.sql.state import (
    SCHEMA_VERSION as SCHEMA_VERSION,
)
from backfill.sql.state import (
    SHARD_COUNT as SHARD_COUNT,
)
from backfill.sql.state import (
    SKIP as SKIP,
)
from backfill.sql.state import (
    STATE_AND_VERSION as STATE_AND_VERSION,
)
from backfill.sql.state import (
    STATE_EXISTS as STATE_EXISTS,
)
from backfill.sql.state import (
    TABLE_SIZE as TABLE_SIZE,
)
from backfill.sql.state import (
    TRY_LOCK as TRY_LOCK,
)
from backfill.sql.state import (
    VERSIONED as VERSIONED,
)
from backfill.sql.state import (
    VERSIONS_EXIST as VERSIONS_EXIST,
)
from backfill.sql.state import (
    Migration as Migration,
)
from backfill.sql.target import (
    KeyColumn as KeyColumn,
)
from backfill.sql.target import (
    Target as Target,
)
from backfill.sql.text import (
    SCHEMA as SCHEMA,
)
from backfill.sql.text import (
    explain as explain,
)
from backfill.sql.text import (
    fragment_problem as fragment_problem,
)
from backfill.sql.text import (
    ident as ident,
)
from backfill.sql.text import (
    literal as literal,
)
