"""Settings: defaults, and bad configuration failing with one line naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from moderation.dev.embedded_kafka import CLIENT_TUNING
from shared.config import (
    ConfigError,
    Settings,
    get_settings,
    kafka_properties_from,
    settings_or_exit,
)
from shared.kafka_admin import admin_config, consumer_config, producer_config


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
        ("DATABASE_URL", "postgresql://app:secret@db:port/app"),
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


def test_settings_or_exit_needs_the_model_file_when_serving_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "model.onnx"))
    with pytest.raises(SystemExit) as raised:
        settings_or_exit(needs_model=True)
    assert str(raised.value).startswith("error: invalid configuration: MODEL_PATH: no file")
    assert settings_or_exit().model_path == tmp_path / "model.onnx"  # others do not need it


def test_kafka_properties_follow_one_rule_for_every_client() -> None:
    properties = kafka_properties_from(
        {
            "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",  # the project's own setting
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "kafka_sasl_mechanism": "PLAIN",
            "KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000",
            "KAFKA_PRODUCER_LINGER_MS": "20",
            "KAFKA_ADMIN_REQUEST_TIMEOUT_MS": "9000",
            "DATABASE_URL": "postgresql://db/app",
        }
    )
    assert properties == {
        "all": {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"},
        "consumer": {"session.timeout.ms": "6000"},
        "producer": {"linger.ms": "20"},
        "admin": {"request.timeout.ms": "9000"},
    }


def test_kafka_properties_reach_producer_consumer_and_admin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in CLIENT_TUNING:  # the embedded broker's tuning is not what this test is about
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "moderation")
    monkeypatch.setenv("KAFKA_CONSUMER_GROUP_ID", "one-group-for-all")  # never wins
    monkeypatch.setenv("KAFKA_PRODUCER_ACKS", "1")
    for config in (
        producer_config("k:9092"),
        consumer_config("k:9092", "g"),
        admin_config("k:9092"),
    ):
        assert config["sasl.username"] == "moderation"
        assert config["bootstrap.servers"] == "k:9092"
    assert producer_config("k:9092")["acks"] == "1"
    assert consumer_config("k:9092", "g")["group.id"] == "g"
    assert "acks" not in consumer_config("k:9092", "g")


def test_real_cluster_defaults_carry_no_embedded_broker_tuning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in CLIENT_TUNING:
        monkeypatch.delenv(name, raising=False)
    config = consumer_config("k:9092", "g")
    # A real Kafka refuses a session timeout below its group minimum (6 s by default).
    assert "session.timeout.ms" not in config
    assert "heartbeat.interval.ms" not in config
    assert config["enable.auto.commit"] is False


def test_settings_redacted_hides_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2@db:5432/app")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "swordfish")
    monkeypatch.setenv("KAFKA_SSL_KEY_PASSWORD", "tuna")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "app")
    shown = get_settings().redacted()
    text = repr(shown)
    assert "hunter2" not in text and "swordfish" not in text and "tuna" not in text
    assert shown["DATABASE_URL"] == "postgresql://app:********@db:5432/app"
    assert shown["KAFKA_SASL_USERNAME"] == "app"
    assert shown["KAFKA_SASL_PASSWORD"] == "********"
