"""SQL, in one place. Values only ever travel as placeholders."""

from __future__ import annotations

from typing import Any

import psycopg

from shared.schemas import Ad

_AD_BY_ID = """
    SELECT a.id AS item_id, a.seller_id, u.is_verified_seller, a.name, a.description,
           a.category, a.images_qty
    FROM advertisements a JOIN users u ON u.id = a.seller_id
    WHERE a.id = %s
"""


async def get_ad(conn: psycopg.AsyncConnection[Any], item_id: int) -> Ad | None:
    cursor = await conn.execute(_AD_BY_ID, (item_id,))
    row = await cursor.fetchone()
    return None if row is None else Ad.model_validate(row)
