"""Schema migrations with yoyo-migrations: safe to run any number of times."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from yoyo import get_backend, read_migrations

# A source checkout (editable install) reads migrations/ at the top of the tree; an installed
# wheel carries the same files as the package `moderation.migrations`.
_SOURCE_TREE_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def migrations_dir() -> Path:
    spec = importlib.util.find_spec("moderation.migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return _SOURCE_TREE_MIGRATIONS


def _yoyo_url(database_url: str) -> str:
    # yoyo picks its driver from the scheme; psycopg 3 is "postgresql+psycopg".
    for scheme in ("postgresql://", "postgres://"):
        if database_url.startswith(scheme):
            return "postgresql+psycopg://" + database_url[len(scheme) :]
    raise ValueError("DATABASE_URL must start with postgresql://")


def apply_migrations(database_url: str) -> list[str]:
    """Apply what is not applied yet, under yoyo's lock; returns the ids applied now."""
    directory = migrations_dir()
    if not any(directory.glob("*.sql")):
        raise FileNotFoundError(f"no migrations found in {directory}")
    backend = get_backend(_yoyo_url(database_url))
    try:
        migrations = read_migrations(str(directory))
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return [migration.id for migration in pending]
    finally:
        backend.connection.close()
