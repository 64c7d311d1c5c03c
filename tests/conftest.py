"""Fixtures shared by every test layer: settings isolation, the real embedded PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from functions_framework import create_app
from starlette.testclient import TestClient

from moderation.embedded_postgres import EmbeddedPostgres
from moderation.migrate import apply_migrations
from shared import config, db, model

REPO_ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = REPO_ROOT / "functions"


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test reads settings and loads the model anew, as a fresh process would."""
    for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "MODEL_PATH", "MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)
    config.get_settings.cache_clear()
    model.reset()
    yield
    config.get_settings.cache_clear()
    model.reset()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL with the schema applied: TEST_DATABASE_URL, or an embedded one."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        apply_migrations(external)
        yield external
        return
    with EmbeddedPostgres() as server:
        apply_migrations(server.url)
        yield server.url


@pytest.fixture
def database_url(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The real database, configured for the function under test."""
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    config.get_settings.cache_clear()
    return postgres_url


def insert_ad(
    database_url: str,
    *,
    is_verified_seller: bool = False,
    images_qty: int = 0,
    description: str = "Test Description",
    category: int = 1,
    name: str = "Test Item",
) -> dict[str, Any]:
    """A new seller and ad with fresh ids; returns the ad as the API would describe it."""
    with psycopg.connect(database_url) as conn:
        (seller_id,) = conn.execute(
            "INSERT INTO users (is_verified_seller) VALUES (%s) RETURNING id",
            (is_verified_seller,),
        ).fetchone()  # type: ignore[misc]
        (item_id,) = conn.execute(
            "INSERT INTO advertisements (seller_id, name, description, category, images_qty)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (seller_id, name, description, category, images_qty),
        ).fetchone()  # type: ignore[misc]
    return {
        "seller_id": seller_id,
        "is_verified_seller": is_verified_seller,
        "item_id": item_id,
        "name": name,
        "description": description,
        "category": category,
        "images_qty": images_qty,
    }


def function_client(target: str) -> TestClient:
    app = create_app(target=target, source=str(FUNCTIONS / target / "main.py"))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def make_client() -> Iterator[Callable[[str], TestClient]]:
    """Open a function's test client; its pool is closed on its own event loop afterwards."""
    opened: list[TestClient] = []

    def make(target: str) -> TestClient:
        client = function_client(target)
        client.__enter__()
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.portal.call(db.close)  # type: ignore[union-attr]
        client.__exit__(None, None, None)
