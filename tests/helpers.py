"""Helpers for tests that run real processes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from moderation.dev.ports import free_port

__all__ = ["free_port", "wait_for"]

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll until check() returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
