"""Schema migrations with yoyo-migrations: safe to run any number of times."""

from __future__ import annotations

import os
from pathlib import Path

from yoyo import get_backend, read_migrations

REPO_ROOT = Path(__file__).resolve().parent.parent


def migrations_dir() -> Path:
    return Path(os.environ.get("MIGRATIONS_DIR", REPO_ROOT / "migrations"))


def _yoyo_url(database_url: str) -> str:
    # yoyo picks its driver from the scheme; psycopg 3 is "postgresql+psycopg".
    for scheme in ("postgresql://", "postgres://"):
        if database_url.startswith(scheme):
            return "postgresql+psycopg://" + database_url[len(scheme) :]
    raise ValueError("DATABASE_URL must start with postgresql://")


def apply_migrations(database_url: str) -> list[str]:
    """Apply what is not applied yet, under yoyo's lock; returns the ids applied now."""
    directory = migrations_dir()
    if not directory.is_dir():
        raise FileNotFoundError(f"migrations directory {directory} not found (set MIGRATIONS_DIR)")
    backend = get_backend(_yoyo_url(database_url))
    try:
        migrations = read_migrations(str(directory))
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return [migration.id for migration in pending]
    finally:
        backend.connection.close()
