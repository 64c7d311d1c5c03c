"""The containers' health check: an HTTP answer."""

from __future__ import annotations

import pytest

from moderation.healthcheck import main


def test_url_that_nobody_serves_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["http://127.0.0.1:1/health", "--timeout", "1"]) == 1
    assert capsys.readouterr().err.startswith("unhealthy: http://127.0.0.1:1/health")


def test_only_http_urls_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["file:///etc/passwd"]) == 1
    assert "not an http(s) URL" in capsys.readouterr().err
