"""Demo sellers and ads for the dev stack, the same ids every time (safe to run twice)."""

from __future__ import annotations

import psycopg
from psycopg import sql

USERS = [(1, False), (2, True)]

# (id, seller_id, name, description, category, images_qty)
ADS = [
    (1, 1, "Phone, cheap", "Test Description", 1, 0),  # unverified, no images: violation
    (2, 1, "Bike", "Short description", 50, 1),  # unverified, 1 image: violation
    (3, 2, "Sofa", "Good sofa, barely used, pickup only", 75, 8),  # verified, 8 images: fine
    (100, 2, "Test Item", "Test Description", 1, 3),  # the original service's default ad
]


def insert_demo_data(database_url: str) -> int:
    """Insert the demo rows that are missing; returns how many ads exist afterwards."""
    with psycopg.connect(database_url) as conn, conn.transaction():
        conn.cursor().executemany(
            "INSERT INTO users (id, is_verified_seller) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            USERS,
        )
        conn.cursor().executemany(
            "INSERT INTO advertisements (id, seller_id, name, description, category, images_qty)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            ADS,
        )
        # Explicit ids do not move identity sequences; move them so later inserts don't collide.
        for table in ("users", "advertisements"):
            conn.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence({name}, 'id'),"
                    " (SELECT max(id) FROM {table}))"
                ).format(name=sql.Literal(table), table=sql.Identifier(table))
            )
        row = conn.execute("SELECT count(*) FROM advertisements").fetchone()
    return int(row[0]) if row else 0
