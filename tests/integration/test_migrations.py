"""Migrations: the whole schema, applied by yoyo, safe to run twice, through the CLI too."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from click.testing import CliRunner

from moderation.cli import main
from moderation.dev.embedded_postgres import EmbeddedPostgres
from moderation.migrate import apply_migrations

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def empty_postgres() -> Iterator[str]:
    with EmbeddedPostgres() as server:
        yield server.url


def test_migrate_creates_the_schema_and_is_safe_to_run_twice(empty_postgres: str) -> None:
    assert apply_migrations(empty_postgres) == ["0001_initial", "0002_outbox_publish_count"]
    assert apply_migrations(empty_postgres) == []
    with psycopg.connect(empty_postgres) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }
    assert {"users", "advertisements", "moderation_results", "outbox"} <= tables


def test_migrate_cli_works_against_database_url(empty_postgres: str) -> None:
    runner = CliRunner()
    first = runner.invoke(main, ["migrate"], env={"DATABASE_URL": empty_postgres})
    second = runner.invoke(main, ["migrate"], env={"DATABASE_URL": empty_postgres})
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0
    assert "up to date" in second.output


def test_migrate_cli_without_database_url_fails_clearly() -> None:
    result = CliRunner().invoke(main, ["migrate"], env={"DATABASE_URL": ""})
    assert result.exit_code != 0
    assert "DATABASE_URL" in result.output


def test_task_status_is_constrained(empty_postgres: str) -> None:
    apply_migrations(empty_postgres)
    with psycopg.connect(empty_postgres) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO moderation_results (item_id, status) VALUES (1, 'lost')")


def test_demo_data_is_safe_to_insert_twice(empty_postgres: str) -> None:
    apply_migrations(empty_postgres)
    runner = CliRunner()
    env = {"DATABASE_URL": empty_postgres}
    assert runner.invoke(main, ["demo-data"], env=env).exit_code == 0
    result = runner.invoke(main, ["demo-data"], env=env)
    assert result.exit_code == 0
    assert result.output.startswith("4 ads")


def test_every_command_with_bad_configuration_fails_naming_the_variable() -> None:
    for command in (["migrate"], ["relay", "--once"], ["adapter", "--sink", "http://x"], ["dev"]):
        result = CliRunner().invoke(main, command, env={"MAX_RETRIES": "lots"})
        assert result.exit_code == 1, command
        assert "invalid configuration: MAX_RETRIES" in result.output
        assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://localhost/db", "must start with postgresql://"),
        ("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2", "DATABASE_URL: cannot connect"),
    ],
)
def test_migrate_with_a_bad_database_url_fails_with_one_line(url: str, expected: str) -> None:
    result = CliRunner().invoke(main, ["migrate", "--database-url", url])
    assert result.exit_code != 0
    assert expected in result.output
    assert "Traceback" not in result.output
