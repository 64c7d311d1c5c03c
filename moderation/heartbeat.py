"""Liveness of the workers that are not functions: their loops beat at least once a second,
and the ops server's /health reads the age of the last beat."""

from __future__ import annotations

import time

_last_beat: float | None = None


def beat() -> None:
    global _last_beat
    _last_beat = time.monotonic()


def age() -> float | None:
    """Seconds since the last beat, None before the first."""
    return None if _last_beat is None else time.monotonic() - _last_beat
