"""The connection pool: autocommit blocks never hand a later user a connection in autocommit;
a connection the server dropped while it sat in the pool is never lent, and a healthy one is
lent without a round trip to check it."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

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


def test_a_connection_the_server_dropped_while_idle_is_replaced_and_a_healthy_one_not_checked(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[object] = []
    check_connection = AsyncConnectionPool.check_connection

    async def counted(conn: psycopg.AsyncConnection) -> None:
        checks.append(conn)
        await check_connection(conn)

    monkeypatch.setattr(AsyncConnectionPool, "check_connection", staticmethod(counted))

    async def check() -> tuple[int, int, set[int], int]:
        pids = set()
        for _ in range(4):  # healthy and idle between uses: lent as they are
            async with db.connection() as conn:
                pids.add(conn.info.backend_pid)
        healthy_checks = len(checks)
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'ad-moderation'"
            )
        await asyncio.sleep(0.2)  # the server's goodbye reaches the idle connections' sockets
        async with db.connection() as conn:  # checked, found dead, replaced: no error
            cursor = await conn.execute("SELECT pg_backend_pid() AS pid")
            row = await cursor.fetchone()
            assert row is not None
            return healthy_checks, len(checks), pids, row["pid"]

    healthy_checks, all_checks, old_pids, new_pid = run(check)
    assert healthy_checks == 0
    assert all_checks >= 1
    assert new_pid not in old_pids
