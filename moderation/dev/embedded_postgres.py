"""A throwaway PostgreSQL server for the dev stack and the tests (pgserver, from PyPI).

It listens on a unix socket in its data directory only. As root, pgserver runs the server as
the system user `pgserver`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


def _prepare_runtime_dir() -> None:
    # pgserver keeps its lock file in XDG_RUNTIME_DIR, read when it is imported; without one it
    # warns and falls back to a folder under the temp directory.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(tempfile.gettempdir()) / f"moderation-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)


def _pgserver() -> Any:
    _prepare_runtime_dir()
    try:
        import pgserver
    except ImportError:
        raise RuntimeError(
            "the embedded PostgreSQL needs pgserver: pip install 'ad-moderation[embedded]'"
        ) from None
    return pgserver


class EmbeddedPostgres:
    """Start with start(); stop() and start() again simulate an outage; close() removes it."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self._owns_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="moderation-pg-"))
        self._server: Any = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the embedded PostgreSQL is not started")
        return str(self._server.get_uri())

    def start(self) -> str:
        pgserver = _pgserver()
        if self._server is None:
            # cleanup_mode=None: this class decides when the server stops, not pgserver's atexit.
            self._server = pgserver.get_server(self.data_dir, cleanup_mode=None)
        else:
            with self._server._lock:
                self._server.ensure_postgres_running()
        log.info("embedded PostgreSQL at %s", self.url)
        return self.url

    def stop(self) -> None:
        """Stop the server, keeping its data (fast shutdown: open connections are cut).

        Works by data directory, so a server whose start was interrupted is stopped too.
        """
        if not self.is_running():
            return
        pgserver = _pgserver()
        if self._server is not None:
            user = self._server.system_user
        else:  # as root, pgserver runs the server as this system user
            user = "pgserver" if os.geteuid() == 0 else None
        pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=user)

    def is_running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs (benchmarks read its CPU time)."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        """Stop the server and, if this object made the data directory, delete it."""
        try:
            self.stop()
        finally:
            if self._owns_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
