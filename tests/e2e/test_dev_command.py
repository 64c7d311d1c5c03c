"""`moderation dev` as a user runs it: one command up, every route on one port, clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import psutil
import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import free_port, wait_for

pytestmark = pytest.mark.integration


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_dev_command_serves_everything_and_stops_everything(stop_signal: signal.Signals) -> None:
    process, base = _start_dev()
    try:
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 9  # postgres, broker, 4 functions, adapter, relay, recorder, …
        folders = _temporary_folders(process)
        assert all(os.path.isdir(folder) for folder in folders)

        task = httpx.post(f"{base}/moderation/async_predict", params={"item_id": 1}).json()
        result = wait_for(
            lambda: (
                (r := httpx.get(f"{base}/moderation_result/{task['task_id']}").json())["status"]
                != "pending"
                and r
            ),
            30,
            "the demo task",
        )
        assert result["status"] == "completed"
        assert (
            httpx.post(f"{base}/simple_predict", params={"item_id": 3}).json()["is_violation"]
            is False
        )

        process.send_signal(stop_signal)
        output = process.communicate(timeout=60)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "stopped" in output
    _, alive = psutil.wait_procs(children, timeout=15)
    assert alive == [], [p.pid for p in alive]
    assert not _answers(f"{base}/health")
    assert not any(os.path.exists(folder) for folder in folders)


def _temporary_folders(process: subprocess.Popen[bytes]) -> list[str]:
    """The folders the stack's reaper is to remove: its logs, metrics and database."""
    children = psutil.Process(process.pid).children()
    reaper = next(c for c in children if "moderation.dev.reaper" in c.cmdline())
    command = reaper.cmdline()
    folders = [command[i + 1] for i, arg in enumerate(command) if arg == "--remove"]
    assert len(folders) == 2  # the stack's folder and PostgreSQL's
    return folders


def test_dev_command_on_a_busy_port_says_so_and_fails() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "moderation", "dev", "--port", str(port)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"port {port} is in use" in result.stdout


def _start_dev() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "moderation", "dev", "--port", str(port)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is not None or _answers(f"{base}/health"), 90, "dev")
        assert process.poll() is None, process.stdout.read().decode()  # type: ignore[union-attr]
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process, base


def _child_running(process: subprocess.Popen[bytes], *words: str) -> psutil.Process | None:
    for child in psutil.Process(process.pid).children():
        try:
            if all(word in child.cmdline() for word in words) and child.is_running():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _completes(base: str) -> bool:
    task = httpx.post(f"{base}/async_predict", params={"item_id": 1}).json()["task_id"]
    return bool(
        wait_for(
            lambda: httpx.get(f"{base}/moderation_result/{task}").json()["status"] == "completed",
            30,
            f"task {task}",
        )
    )


@pytest.mark.parametrize(
    ("killed", "words"),
    [
        ("adapter", ("moderation", "adapter")),
        ("relay", ("moderation", "relay")),
        ("moderation_consumer", ("functions_framework", "moderation_consumer")),
    ],
)
def test_dev_command_restarts_a_child_that_dies(killed: str, words: tuple[str, ...]) -> None:
    process, base = _start_dev()
    try:
        victim = _child_running(process, *words)
        assert victim is not None
        workers = victim.children()  # a function's gunicorn workers outlive their master
        victim.kill()  # SIGKILL: no chance to clean up
        replacement = wait_for(
            lambda: (c := _child_running(process, *words)) and c.pid != victim.pid and c,
            30,
            f"{killed} to be started again",
        )
        assert replacement
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == [], "the dead child's workers are still running"
        assert process.poll() is None  # the rest of the stack is still up
        assert _completes(base)
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0].decode()
    assert f"{killed}" in output and "restarting in" in output


def _postgres_of(data_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "postgres" in cmdline and data_dir in cmdline:
            found.append(proc)
    return found


def test_dev_command_killed_leaves_nothing_running() -> None:
    process, _ = _start_dev()
    children = psutil.Process(process.pid).children()
    reaper = next(c for c in children if "moderation.dev.reaper" in c.cmdline())
    data_dir = reaper.cmdline()[reaper.cmdline().index("--postgres") + 1]
    assert _postgres_of(data_dir)
    folders = _temporary_folders(process)
    process.kill()  # SIGKILL: the supervisor cannot clean up; Linux tells its children
    process.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], [" ".join(p.cmdline()) for p in alive]
    wait_for(lambda: not _postgres_of(data_dir), 30, "the embedded PostgreSQL to stop")
    assert not any(os.path.exists(folder) for folder in folders)
