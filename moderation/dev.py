"""The dev stack: embedded services, migrations, demo data and the functions, in one command."""

from __future__ import annotations

import logging
import os
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
from moderation.embedded_postgres import EmbeddedPostgres
from moderation.migrate import REPO_ROOT, apply_migrations

log = logging.getLogger(__name__)

FUNCTIONS_DIR = REPO_ROOT / "functions"


def function_command(target: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """How a function is served: functions-framework, exactly as in a container."""
    source = FUNCTIONS_DIR / target / "main.py"
    return [
        sys.executable, "-m", "functions_framework",
        "--target", target, "--source", str(source), "--host", host, "--port", str(port),
    ]  # fmt: skip


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]


@dataclass
class DevStack:
    port: int = 8000
    host: str = "127.0.0.1"
    database_url: str | None = None
    state_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="moderation-dev-")))
    children: list[Child] = field(default_factory=list)
    postgres: EmbeddedPostgres | None = None

    def start(self) -> None:
        if self.database_url is None:
            self.postgres = EmbeddedPostgres(self.state_dir / "postgres")
            self.postgres.data_dir.mkdir(parents=True, exist_ok=True)
            self.database_url = self.postgres.start()
            print(f"postgres    embedded, {self.database_url}", flush=True)
        else:
            print("postgres    DATABASE_URL (external)", flush=True)
        applied = apply_migrations(self.database_url)
        print(f"migrations  {len(applied)} applied" if applied else "migrations  up to date")
        ads = insert_demo_data(self.database_url)
        print(f"demo data   {ads} ads")
        self.start_function("predict", self.port)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        assert self.database_url is not None
        env["DATABASE_URL"] = self.database_url
        return env

    def start_function(self, target: str, port: int) -> None:
        log_file = (self.state_dir / f"{target}.log").open("ab")
        process = subprocess.Popen(
            function_command(target, port, self.host),
            env=self.env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
        self.children.append(Child(target, process))
        wait_until_healthy(f"http://{self.host}:{port}/health", process)
        print(f"{target:<11} http://{self.host}:{port}  (log: {log_file.name})", flush=True)

    def wait(self) -> None:
        """Block until SIGINT/SIGTERM or until a child dies."""
        stop = False

        def on_signal(signum: int, frame: FrameType | None) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop:
            for child in self.children:
                if child.process.poll() is not None:
                    print(f"{child.name} exited with code {child.process.returncode}", flush=True)
                    return
            time.sleep(0.2)

    def stop(self) -> None:
        # SIGTERM, not SIGINT: an aio function stops in well under a second on SIGTERM.
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.terminate()
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        self.children.clear()
        if self.postgres is not None:
            self.postgres.close()
            self.postgres = None


def print_usage(base: str) -> None:
    print(
        f"""
Ready. Try:
  curl -s -X POST {base}/predict -H 'Content-Type: application/json' \\
    -d '{{"seller_id": 1, "is_verified_seller": false, "item_id": 1, "name": "Phone", \\
         "description": "Test Description", "category": 1, "images_qty": 0}}'
  curl -s -X POST '{base}/simple_predict?item_id=1'
  curl -s {base}/ready
Stop with Ctrl-C.""",
        flush=True,
    )


def run(port: int, host: str, database_url: str | None) -> None:
    stack = DevStack(port=port, host=host, database_url=database_url)
    try:
        stack.start()
        print_usage(f"http://{host}:{port}")
        stack.wait()
    finally:
        print("stopping...", flush=True)
        stack.stop()
