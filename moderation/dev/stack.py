"""The dev stack: embedded PostgreSQL and broker, migrations, topics, demo data, the four
functions, the push adapter, the outbox relay, the dead-letter recorder, and a gateway serving
every route on one port."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from moderation.demo import insert_demo_data
from moderation.dev.embedded_kafka import CLIENT_TUNING, EmbeddedKafka
from moderation.dev.embedded_postgres import EmbeddedPostgres
from moderation.dev.ports import die_with_parent, free_port, port_is_free
from moderation.migrate import apply_migrations
from shared.kafka_admin import ensure_topics

# The dev stack runs from a source checkout: the functions are served from their folders.
REPO_ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS_DIR = REPO_ROOT / "functions"
HTTP_FUNCTIONS = ("predict", "async_predict", "get_result")
CONSUMER = "moderation_consumer"


def function_command(target: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """How a function is served: functions-framework, exactly as in a container."""
    source = FUNCTIONS_DIR / target / "main.py"
    return [
        sys.executable, "-m", "functions_framework",
        "--target", target, "--source", str(source), "--host", host, "--port", str(port),
    ]  # fmt: skip


def moderation_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "moderation", *args]


def answers_http(url: str) -> bool:
    """True once url answers below 500 (a /health that is not 2xx yet says 503)."""
    try:  # url is one of the dev stack's own http:// addresses
        with urllib.request.urlopen(url, timeout=1.0):  # nosec B310
            return True
    except urllib.error.HTTPError as error:
        return error.code < 500
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with code {process.returncode}")
        if answers_http(url):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class Child:
    """A process of the stack, and how to start it again."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_at: float | None = None  # set while a restart waits for its backoff

    def launch(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                # Gone with the supervisor, even if it is SIGKILLed: no orphans.
                preexec_fn=die_with_parent(signal.SIGTERM),
                # A group of its own: a function's gunicorn workers outlive a SIGKILLed
                # master and keep its port, so a restart must be able to end them all.
                process_group=0,
            )  # fmt: skip
        self.started_at = time.monotonic()
        self.restart_at = None

    def kill_leftovers(self) -> None:
        """SIGKILL whatever is left of a dead child's process group (its workers)."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


# A child that dies is started again after 1, 2, 4 ... 30 s; one that ran this long is
# considered recovered, and its next restart waits 1 s again.
RESTART_BACKOFF_MAX_SECONDS = 30.0
RECOVERED_AFTER_SECONDS = 60.0


def _new_state_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="moderation-dev-"))


@dataclass
class DevStack:
    """Start with start(), stop with stop(); every child gets SIGTERM, then SIGKILL."""

    port: int = 8000
    host: str = "127.0.0.1"
    database_url: str | None = None
    kafka_bootstrap_servers: str | None = None
    state_dir: Path = field(default_factory=_new_state_dir)
    quiet: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    postgres: EmbeddedPostgres | None = None
    kafka: EmbeddedKafka | None = None
    reaper: subprocess.Popen[bytes] | None = None

    def say(self, what: str, detail: str) -> None:
        if not self.quiet:
            print(f"{what:<20} {detail}", flush=True)

    def start(self) -> None:
        if not port_is_free(self.host, self.port):
            shutil.rmtree(self.state_dir, ignore_errors=True)  # still empty: nothing to keep
            raise RuntimeError(f"port {self.port} is in use: stop what serves it, or set PORT")
        if self.database_url is None:
            # A data directory of its own, deleted on stop: the dev database is throwaway.
            self.postgres = EmbeddedPostgres()
            self._start_reaper(self.postgres.data_dir)
            self.database_url = self.postgres.start()
            self.say("postgres", f"embedded  {self.database_url}")
        else:
            self._start_reaper(None)
            self.say("postgres", "DATABASE_URL")
        if self.kafka_bootstrap_servers is None:
            self.kafka = EmbeddedKafka(log_dir=self.state_dir)
            self.kafka_bootstrap_servers = self.kafka.start()
            self.say("kafka", f"embedded  {self.kafka_bootstrap_servers} (Tansu, in memory)")
        else:
            self.say("kafka", f"KAFKA_BOOTSTRAP_SERVERS  {self.kafka_bootstrap_servers}")

        applied = apply_migrations(self.database_url)
        self.say("migrations", f"{len(applied)} applied" if applied else "up to date")
        ensure_topics(self.kafka_bootstrap_servers, self.topics())
        self.say("topics", ", ".join(self.topics()))
        self.say("demo data", f"{insert_demo_data(self.database_url)} ads")

        for target in (*HTTP_FUNCTIONS, CONSUMER):
            port = free_port(self.host)
            url = f"http://{self.host}:{port}"
            probe = f"{url}/health"
            self.spawn(target, function_command(target, port, self.host), probe)
            self.urls[target] = url
        for name, command in (
            ("adapter", moderation_command("adapter", "--sink", self.urls[CONSUMER])),
            ("relay", moderation_command("relay")),
            ("dlq-recorder", moderation_command("dlq-recorder")),
        ):
            ops_port = free_port(self.host)
            self.urls[name] = f"http://{self.host}:{ops_port}"
            self.spawn(name, command, f"{self.urls[name]}/health", OPS_PORT=str(ops_port))
        backends = [f"--backend={name}={self.urls[name]}" for name in HTTP_FUNCTIONS]
        backends += [
            f"--component={name}={self.urls[name]}"
            for name in (CONSUMER, "adapter", "relay", "dlq-recorder")
        ]
        gateway = moderation_command("gateway", "--host", self.host, "--port", str(self.port))
        self.spawn("gateway", [*gateway, *backends], f"http://{self.host}:{self.port}/health")
        self.urls["gateway"] = f"http://{self.host}:{self.port}"

    def _start_reaper(self, postgres_dir: Path | None) -> None:
        """pgserver runs PostgreSQL detached: if this process is SIGKILLed, nothing would stop
        it. The reaper is told by Linux when this process dies, and stops it then; it also
        removes the stack's temporary folders."""
        command = [sys.executable, "-m", "moderation.dev.reaper", "--remove", str(self.state_dir)]
        if postgres_dir is not None:
            command += ["--postgres", str(postgres_dir), "--remove", str(postgres_dir)]
        with (self.state_dir / "reaper.log").open("ab") as log_file:
            self.reaper = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )  # fmt: skip

    def topics(self) -> dict[str, int]:
        from moderation.relay import project_topics

        return project_topics()

    def env(self) -> dict[str, str]:
        assert self.database_url and self.kafka_bootstrap_servers
        # The embedded broker's client tuning only when this stack started that broker.
        tuning = CLIENT_TUNING if self.kafka is not None else {}
        return {
            "LOG_FORMAT": "text",  # readable in the log files, unless LOG_FORMAT says otherwise
            **os.environ,
            **tuning,
            **self.extra_env,
            "DATABASE_URL": self.database_url,
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
        }

    def spawn(
        self, name: str, command: list[str], probe_url: str | None = None, **env: str
    ) -> None:
        log_path = self.state_dir / f"{name}.log"
        child_env = {**self.env(), **env}
        # As the image keeps them: metrics in memory with one worker; with several, in a
        # folder of the process's own, where the workers' numbers add up.
        child_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if child_env.get("WORKERS", "1") != "1":
            metrics_dir = self.state_dir / f"metrics-{name}"
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir()
            child_env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        child = Child(name, command, child_env, log_path)
        child.launch()
        assert child.process is not None
        process = child.process
        self.children.append(child)
        if probe_url:
            wait_until_up(probe_url, process)
        elif process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}, see {log_path}")
        where = probe_url.removesuffix("/health") if probe_url else f"pid {process.pid}"
        self.say(name, f"{where}  (log {log_path})")

    def wait(self) -> int:
        """Block until SIGINT/SIGTERM (returns 0); a child that dies meanwhile is started
        again, with backoff, as compose's restart policies and Kubernetes would."""
        stop = False

        def on_signal(signum: int, frame: FrameType | None) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop:
            self.supervise()
            time.sleep(0.2)
        return 0

    def supervise(self) -> None:
        """One look at every child: schedule a restart of the dead, restart the due."""
        now = time.monotonic()
        for child in self.children:
            assert child.process is not None
            if child.process.poll() is None:
                continue
            if child.restart_at is None:
                child.kill_leftovers()
                if now - child.started_at > RECOVERED_AFTER_SECONDS:
                    child.restarts = 0
                delay = min(2.0**child.restarts, RESTART_BACKOFF_MAX_SECONDS)
                child.restart_at = now + delay
                self.say(
                    child.name,
                    f"exited with code {child.process.returncode}; restarting in {delay:.0f} s"
                    f" (log {child.log_path})",
                )
            elif now >= child.restart_at:
                child.restarts += 1
                child.launch()
                self.say(child.name, f"restarted (restart {child.restarts})")

    def stop(self, keep_logs: bool = False) -> None:
        """Stop everything; the temporary folder (logs, metrics) goes too unless keep_logs."""
        # SIGTERM, not SIGINT: an aio function stops in well under a second on SIGTERM.
        processes = [child.process for child in reversed(self.children) if child.process]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # with its workers, if any
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.children.clear()
        if self.kafka is not None:
            self.kafka.close()
            self.kafka = None
        if self.postgres is not None:
            self.postgres.close()
            self.postgres = None
        if self.reaper is not None:  # nothing left for it to do
            self.reaper.kill()
            self.reaper.wait()
            self.reaper = None
        # The logs and metrics of a throwaway stack go with it.
        if not keep_logs:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def print_usage(base: str) -> None:
    ad = (
        '{"seller_id": 1, "is_verified_seller": false, "item_id": 1, "name": "Phone",'
        ' "description": "Test Description", "category": 1, "images_qty": 0}'
    )
    print(
        f"""
Every route is served on {base} (and under {base}/moderation). Try:
  curl -s -X POST {base}/predict -H 'Content-Type: application/json' -d '{ad}'
  curl -s -X POST '{base}/simple_predict?item_id=1'
  curl -s -X POST '{base}/async_predict?item_id=1'
  curl -s {base}/moderation_result/1
Stop with Ctrl-C.""",
        flush=True,
    )


def run(
    port: int, host: str, database_url: str | None, kafka_bootstrap_servers: str | None
) -> None:
    stack = DevStack(
        port=port,
        host=host,
        database_url=database_url,
        kafka_bootstrap_servers=kafka_bootstrap_servers,
    )
    # SIGTERM during start-up must still stop what was started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    code = 1
    try:
        stack.start()
        print_usage(stack.urls["gateway"])
        code = stack.wait()
    except RuntimeError as error:
        print(f"error: {error}", flush=True)
    except KeyboardInterrupt:  # Ctrl-C while starting
        code = 0
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave servers running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping...", flush=True)
        # After a failed start, the logs the error points to stay.
        stack.stop(keep_logs=code != 0)
        print("stopped" if code == 0 else f"stopped; logs kept in {stack.state_dir}", flush=True)
    if code:
        sys.exit(code)
