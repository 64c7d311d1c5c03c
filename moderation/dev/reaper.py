"""Cleans up after a dev stack that could not: started by the stack so that Linux sends it
SIGTERM when the stack's process dies (even by SIGKILL); then it stops the embedded PostgreSQL
(which pgserver runs detached, so no death signal reaches it) and removes the stack's
temporary folders.

    python -m moderation.dev.reaper --postgres DATA_DIR --remove DIR [--remove DIR ...]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path


def clean_up(postgres: Path | None, remove: list[Path]) -> None:
    if postgres is not None and (postgres / "postmaster.pid").exists():
        from moderation.dev.embedded_postgres import EmbeddedPostgres

        try:
            EmbeddedPostgres(postgres).stop()
        except Exception as error:  # still remove what can be removed
            print(f"reaper: PostgreSQL at {postgres} not stopped: {error!r}", file=sys.stderr)
    for path in remove:
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m moderation.dev.reaper")
    parser.add_argument("--postgres", type=Path)
    parser.add_argument("--remove", type=Path, action="append", default=[])
    args = parser.parse_args()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    clean_up(args.postgres, args.remove)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main()
