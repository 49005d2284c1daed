"""Throttling: how gentle a run is, and why it waits.

- ``governor``: the run's throttle; asked before each batch, it answers with one ``Decision``
  (pause, ceiling on the batch, state, what holds the run) that the loop applies.
- ``gates``: health gates (replication and slot lag, active sessions, a health query).
- ``impact``, ``statements``, ``canary``: the impact budget: its controller (pure), the
  application's statements index (pure), and the measurements that feed them.
- ``pacing``: the rate ceiling and retry backoff, as arithmetic.
- ``probe``: the small second connection all of them measure on (the one module here that
  imports asyncpg).

Live settings (``backfill.control``) and batch sizing (``backfill.sizing``) stay outside: the
first is read by the CLI too, the second belongs to the loop.
"""
