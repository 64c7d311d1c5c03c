"""PostgreSQL access: one async pool per process, opened lazily on first use.

The pool is never created at import (functions-framework imports before it forks) and is
bound to the event loop that opened it; a new loop (a test client) gets a new pool.
Connection loss of any kind is turned into DatabaseUnavailable (503 / retryable error).
psycopg itself is imported on first use: it is a fifth of a function's import time, and a
cold `/predict` never needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from shared.config import get_settings
from shared.errors import DatabaseUnavailable

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

_pool: AsyncConnectionPool | None = None
_pool_loop: asyncio.AbstractEventLoop | None = None


# While the database is down, the pool retries each missing connection with a backoff of 1, 2,
# 4 ... s, so after a 10 s outage under load it could stay empty for up to 8 s more. Retrying at
# a steady pace instead makes every route answer within a second of the database's return; a
# refused connection costs next to nothing. psycopg_pool has no setting for this: its backoff
# constants are class attributes, set here once.
RECONNECT_INTERVAL_SECONDS = 0.5


def _steady_reconnects() -> None:
    from psycopg_pool.base import AttemptWithBackoff

    AttemptWithBackoff.INITIAL_DELAY = RECONNECT_INTERVAL_SECONDS
    AttemptWithBackoff.DELAY_BACKOFF = 1.0


def _new_pool(url: str) -> AsyncConnectionPool:
    import orjson
    from psycopg.rows import dict_row
    from psycopg.types.json import set_json_dumps
    from psycopg_pool import AsyncConnectionPool

    _steady_reconnects()
    # jsonb written through orjson, as everywhere else in the project (the stdlib's is slower).
    set_json_dumps(orjson.dumps)

    settings = get_settings()
    return AsyncConnectionPool(
        url,
        min_size=settings.database_pool_min_size,
        max_size=settings.database_pool_max_size,
        timeout=settings.database_timeout,
        # Without a check, the pool hands out connections killed by a database restart.
        check=_check_if_spoken_to,
        # Keep trying to reconnect for a while after an outage instead of giving up for good.
        reconnect_timeout=60.0,
        kwargs={
            "connect_timeout": max(1, int(settings.database_timeout)),
            "row_factory": dict_row,
            "application_name": "ad-moderation",
        },
        open=False,
        name="moderation",
    )


async def _check_if_spoken_to(conn: psycopg.AsyncConnection[Any]) -> None:
    """The pool's check before it lends a connection: a round trip to the server only when
    the server said something while the connection sat idle (a restart's goodbye, a closed
    socket) or libpq already knows it broken. A healthy pool lends with no extra round trip,
    where AsyncConnectionPool.check_connection costs one per request."""
    from psycopg import pq
    from psycopg_pool import AsyncConnectionPool

    if conn.pgconn.status == pq.ConnStatus.OK and not _readable(conn.fileno()):
        return
    await AsyncConnectionPool.check_connection(conn)


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


async def get_pool() -> AsyncConnectionPool:
    global _pool, _pool_loop
    loop = asyncio.get_running_loop()
    if _pool is not None and _pool_loop is loop:
        return _pool
    url = get_settings().database_url
    if url is None:
        log.error("database is not available: DATABASE_URL is not set")
        raise DatabaseUnavailable()
    pool = _new_pool(url)
    # wait=False: a database that is down at start must not stop the function from serving
    # the routes that do not need it; requests that do wait at most DATABASE_TIMEOUT.
    await pool.open(wait=False)
    _pool, _pool_loop = pool, loop
    return pool


@asynccontextmanager
async def connection(autocommit: bool = False) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection; any loss of the database surfaces as DatabaseUnavailable.

    autocommit: each statement commits by itself, with no BEGIN and COMMIT round trips (for a
    block of one statement, which is atomic on its own)."""
    import psycopg
    from psycopg_pool import PoolTimeout

    pool = await get_pool()
    try:
        async with pool.connection() as conn:
            if not autocommit:
                yield conn
                return
            await conn.set_autocommit(True)
            try:
                yield conn
            finally:
                await _restore_transactions(conn)
    except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as error:
        log.warning("database is not available: %s", type(error).__name__)
        raise DatabaseUnavailable() from error


async def _restore_transactions(conn: psycopg.AsyncConnection[Any]) -> None:
    """Back to implicit transactions before the connection returns to the pool; one that
    cannot be (left inside a transaction, or broken) is closed, and the pool replaces it."""
    import psycopg
    from psycopg.pq import TransactionStatus

    try:
        if conn.info.transaction_status == TransactionStatus.IDLE:
            await conn.set_autocommit(False)
            return
    except psycopg.Error:
        pass
    with contextlib.suppress(psycopg.Error):
        await conn.close()


def is_open() -> bool:
    """Whether this event loop has an open pool (background work does not open one)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return _pool is not None and _pool_loop is loop and not _pool.closed


async def ping() -> bool:
    try:
        async with connection() as conn:
            await conn.execute("SELECT 1")
        return True
    except DatabaseUnavailable:
        return False


async def close() -> None:
    global _pool, _pool_loop
    if _pool is not None and _pool_loop is asyncio.get_running_loop():
        await _pool.close()
    _pool, _pool_loop = None, None
