"""The containers' health checks: a heartbeat file's age, an HTTP answer."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from moderation import heartbeat
from moderation.healthcheck import main
from shared.config import get_settings


def test_heartbeat_file_is_touched_by_a_beat(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "heartbeat"
    monkeypatch.setenv("HEARTBEAT_FILE", str(path))
    get_settings.cache_clear()
    monkeypatch.setattr(heartbeat, "_last", 0.0)
    assert main(["--heartbeat", str(path)]) == 1  # no beat yet
    heartbeat.beat()
    assert main(["--heartbeat", str(path)]) == 0


def test_heartbeat_older_than_max_age_is_unhealthy(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat"
    path.touch()
    stale = time.time() - 60
    os.utime(path, (stale, stale))
    assert main(["--heartbeat", str(path), "--max-age", "30"]) == 1
    assert main(["--heartbeat", str(path), "--max-age", "90"]) == 0


def test_url_that_nobody_serves_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["http://127.0.0.1:1/health", "--timeout", "1"]) == 1
    assert capsys.readouterr().err.startswith("unhealthy: http://127.0.0.1:1/health")
