"""Liveness of the workers that are not functions: their loops beat at least once a second;
the ops server's /health reads the age of the last beat, and HEARTBEAT_FILE (when set) is
touched for health checks that read a file."""

from __future__ import annotations

import contextlib
import time

from shared.config import get_settings

_last = 0.0
_last_beat: float | None = None


def beat() -> None:
    global _last, _last_beat
    now = time.monotonic()
    _last_beat = now
    path = get_settings().heartbeat_file
    if path is None or now - _last < 1.0:
        return
    _last = now
    with contextlib.suppress(OSError):  # a read-only folder: the health check will say so
        path.touch()


def age() -> float | None:
    """Seconds since the last beat, None before the first."""
    return None if _last_beat is None else time.monotonic() - _last_beat
