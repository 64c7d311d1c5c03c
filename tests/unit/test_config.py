"""Settings: defaults, and bad configuration failing with one line naming the variable."""

from __future__ import annotations

import pytest

from shared.config import ConfigError, Settings, get_settings, settings_or_exit


def test_settings_defaults_serve_without_any_environment() -> None:
    settings = get_settings()
    assert settings.database_url is None
    assert settings.max_retries == 3
    assert settings.model_path.is_file()
    assert (settings.moderation_topic, settings.retry_topic, settings.dlq_topic) == (
        "moderation",
        "moderation_retry",
        "moderation_dlq",
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MAX_RETRIES", "three"),
        ("MAX_RETRIES", "-1"),
        ("DATABASE_URL", "mysql://localhost/db"),
        ("DATABASE_TIMEOUT", "0"),
    ],
)
def test_settings_bad_variable_fails_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        get_settings()
    message = str(raised.value)
    assert variable in message
    assert "\n" not in message


def test_settings_error_never_echoes_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://user:hunter2@db/x")
    with pytest.raises(ConfigError) as raised:
        get_settings()
    assert "hunter2" not in str(raised.value)


def test_settings_or_exit_ends_the_process_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_RETRIES", "lots")
    with pytest.raises(SystemExit) as raised:
        settings_or_exit()
    assert str(raised.value).startswith("error: invalid configuration: MAX_RETRIES")


def test_settings_empty_database_url_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "  ")
    assert Settings().database_url is None


@pytest.mark.parametrize(
    ("low", "high"),
    [
        (("DATABASE_POOL_MIN_SIZE", "20"), ("DATABASE_POOL_MAX_SIZE", "10")),
        (("RETRY_BACKOFF_BASE_SECONDS", "60"), ("RETRY_BACKOFF_MAX_SECONDS", "30")),
    ],
)
def test_settings_ranges_out_of_order_fail_naming_both(
    monkeypatch: pytest.MonkeyPatch, low: tuple[str, str], high: tuple[str, str]
) -> None:
    for name, value in (low, high):
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        get_settings()
    assert low[0] in str(raised.value) and high[0] in str(raised.value)
