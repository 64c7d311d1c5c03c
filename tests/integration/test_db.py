"""The connection pool's autocommit blocks never hand a later user a connection in autocommit."""

from __future__ import annotations

import asyncio

import pytest

from shared import db

pytestmark = pytest.mark.integration


def run(check):  # type: ignore[no-untyped-def]
    async def with_pool():  # type: ignore[no-untyped-def]
        try:
            return await check()
        finally:
            await db.close()

    return asyncio.run(with_pool())


def test_an_autocommit_block_that_fails_returns_its_connection_as_it_was(database_url: str) -> None:
    async def check() -> tuple[bool, bool]:
        with pytest.raises(ZeroDivisionError):
            async with db.connection(autocommit=True) as conn:
                assert conn.autocommit
                1 / 0  # noqa: B018
        async with db.connection() as conn:  # the pool's only idle connection: the same one
            return conn.autocommit, conn is not None

    assert run(check) == (False, True)


def test_a_connection_left_inside_a_transaction_is_closed_not_returned(database_url: str) -> None:
    async def check() -> tuple[bool, str]:
        async with db.connection(autocommit=True) as conn:
            await conn.execute("BEGIN")  # what no caller should do: the pool must not keep it
            left = conn
        assert left.closed
        async with db.connection() as conn:
            cursor = await conn.execute("SELECT 1 AS one")
            row = await cursor.fetchone()
            return conn.autocommit, str(row)

    autocommit, row = run(check)
    assert autocommit is False and "1" in row
