"""Container health checks, for images with no curl: `python -m moderation.healthcheck URL`
passes when URL answers 2xx (`--any-status`: any answer below 500, for a CloudEvent function
that serves no GET); `--heartbeat FILE` passes when a worker without HTTP (adapter, relay,
dead-letter recorder) touched FILE within `--max-age` seconds."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def check_url(url: str, any_status: bool, timeout: float) -> str | None:
    """None when healthy, else why not."""
    if not url.startswith(("http://", "https://")):  # no file:// or other schemes
        return f"{url}: not an http(s) URL"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # nosec B310
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (urllib.error.URLError, OSError) as error:
        return f"{url}: {error}"
    if status < 300 or (any_status and status < 500):
        return None
    return f"{url}: HTTP {status}"


def check_heartbeat(path: Path, max_age: float) -> str | None:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return f"{path}: no heartbeat yet"
    return None if age <= max_age else f"{path}: last heartbeat {age:.0f} s ago"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moderation.healthcheck")
    parser.add_argument("url", nargs="?")
    parser.add_argument("--any-status", action="store_true")
    parser.add_argument("--heartbeat", type=Path)
    parser.add_argument("--max-age", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if (args.url is None) == (args.heartbeat is None):
        parser.error("give a URL or --heartbeat FILE")
    if args.url:
        problem = check_url(args.url, args.any_status, args.timeout)
    else:
        problem = check_heartbeat(args.heartbeat, args.max_age)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
