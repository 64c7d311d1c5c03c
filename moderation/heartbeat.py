"""Liveness of the workers that serve no HTTP: their loops touch HEARTBEAT_FILE (when set) at
most once a second, and the container's health check reads its age."""

from __future__ import annotations

import contextlib
import time

from shared.config import get_settings

_last = 0.0


def beat() -> None:
    global _last
    path = get_settings().heartbeat_file
    now = time.monotonic()
    if path is None or now - _last < 1.0:
        return
    _last = now
    with contextlib.suppress(OSError):  # a read-only folder: the health check will say so
        path.touch()
