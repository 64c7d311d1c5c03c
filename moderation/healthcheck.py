"""The containers' health check, for images with no curl: `python -m moderation.healthcheck URL`
passes when URL answers 2xx."""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def check_url(url: str, timeout: float) -> str | None:
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
    return None if status < 300 else f"{url}: HTTP {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moderation.healthcheck")
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if problem := check_url(args.url, args.timeout):
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
