"""Fault-injection suite: real PostgreSQL, real processes, real sockets; no database mocks.

Tools: ``proxy`` (a TCP proxy that adds latency, cuts connections, refuses or black-holes new
ones), ``sessions`` (conflicting locks, deadlocks and terminations from another session),
``harness`` (the CLI as a process, an in-process observer, the exactly-once check).
"""
