"""The `moderation` command: dev stack, migrations, demo data."""

from __future__ import annotations

import logging

import click

from moderation import dev
from moderation.demo import insert_demo_data
from moderation.migrate import apply_migrations

database_url_option = click.option(
    "--database-url", envvar="DATABASE_URL", help="PostgreSQL URL [env DATABASE_URL]"
)


def require_database_url(database_url: str | None) -> str:
    if not database_url:
        raise click.UsageError("no database: set DATABASE_URL or pass --database-url")
    return database_url


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """Ad moderation: run the stack locally and manage its database."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@database_url_option
def migrate(database_url: str | None) -> None:
    """Apply the schema migrations (safe to run twice)."""
    applied = apply_migrations(require_database_url(database_url))
    click.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@main.command("demo-data")
@database_url_option
def demo_data(database_url: str | None) -> None:
    """Insert the demo sellers and ads (safe to run twice)."""
    click.echo(f"{insert_demo_data(require_database_url(database_url))} ads in the database")


@main.command("dev")
@click.option("--port", default=8000, show_default=True, envvar="PORT", help="Base URL port.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--database-url", envvar="DATABASE_URL", default=None,
              help="Use this PostgreSQL instead of an embedded one [env DATABASE_URL].")  # fmt: skip
def dev_command(port: int, host: str, database_url: str | None) -> None:
    """Start the whole stack on embedded defaults and serve it on one base URL."""
    dev.run(port=port, host=host, database_url=database_url or None)


if __name__ == "__main__":
    main()
