"""Configuration: one pydantic-settings object read from the environment once per process."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_PATH = Path(__file__).parent / "default_model" / "model.onnx"


class ConfigError(RuntimeError):
    """Bad configuration; the message is one line naming the variable."""


KAFKA_ROLES = ("producer", "consumer", "admin")
# Settings of this project that start with KAFKA_ but are not librdkafka properties.
_KAFKA_OWN_SETTINGS = {"KAFKA_BOOTSTRAP_SERVERS"}
# librdkafka properties whose values are secrets: never printed, logged or echoed.
_SECRET_WORDS = ("password", "secret", "pem", "jaas", "token", "oauthbearer.config")
REDACTED = "********"


def kafka_properties_from(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """librdkafka properties from the environment, by one rule: `KAFKA_` + the property name
    upper-cased with dots as underscores (`KAFKA_SASL_MECHANISM` -> `sasl.mechanism`) reaches
    every client; `KAFKA_PRODUCER_`, `KAFKA_CONSUMER_` or `KAFKA_ADMIN_` before the name
    reaches that kind of client only, and wins over the general one.

    Returns {"all": {...}, "producer": {...}, "consumer": {...}, "admin": {...}}.
    """
    properties: dict[str, dict[str, str]] = {role: {} for role in ("all", *KAFKA_ROLES)}
    for name, value in environ.items():
        upper = name.upper()
        if not upper.startswith("KAFKA_") or upper in _KAFKA_OWN_SETTINGS:
            continue
        rest = upper.removeprefix("KAFKA_")
        role = next((r for r in KAFKA_ROLES if rest.startswith(f"{r.upper()}_")), "all")
        if role != "all":
            rest = rest[len(role) + 1 :]
        if rest:
            properties[role][rest.lower().replace("_", ".")] = value
    return properties


def is_secret(name: str) -> bool:
    """True for a setting or librdkafka property whose value must never be shown."""
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def redact_url(url: str) -> str:
    """A URL with its password replaced, for printing (`postgresql://app:********@db/app`)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{netloc[-1]}"))


class Settings(BaseSettings):
    """Every setting the functions read. Names are the environment variables, upper-cased."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # Unset means "no database": routes that need one answer 503 instead of crashing at start.
    database_url: str | None = None
    database_pool_min_size: Annotated[int, Field(ge=0)] = 1
    database_pool_max_size: Annotated[int, Field(ge=1)] = 10
    # How long a request waits for a connection before it is answered 503.
    database_timeout: Annotated[float, Field(gt=0)] = 5.0

    kafka_bootstrap_servers: str | None = None
    # librdkafka properties from KAFKA_* variables (see kafka_properties_from); filled from the
    # environment by _kafka_client_properties, never from a variable of its own.
    kafka_client_properties: dict[str, dict[str, str]] = Field(default_factory=dict, exclude=True)
    moderation_topic: str = "moderation"
    retry_topic: str = "moderation_retry"
    dlq_topic: str = "moderation_dlq"
    topic_partitions: Annotated[int, Field(ge=1)] = 4
    max_retries: Annotated[int, Field(ge=0)] = 3
    retry_backoff_base_seconds: Annotated[float, Field(ge=0)] = 1.0
    retry_backoff_max_seconds: Annotated[float, Field(ge=0)] = 30.0
    # async_predict's publish after commit (in the background: the answer does not wait) waits
    # this long for the broker's ack; past it the outbox relay publishes the row later.
    publish_wait_seconds: Annotated[float, Field(ge=0)] = 1.0
    # The consumer answers 2xx only once a retry or dead letter is acknowledged within this.
    # DATABASE_TIMEOUT plus this stays well under the push adapter's request timeout (20 s).
    durable_publish_wait_seconds: Annotated[float, Field(gt=0)] = 5.0
    # Records the push adapter sends in one request when they are already fetched (CloudEvents
    # batches); 1 sends each alone, as a KafkaSource does.
    adapter_batch_size: Annotated[int, Field(ge=1, le=1000)] = 100
    # The relay leaves rows younger than this to the publish that follows their commit.
    relay_grace_seconds: Annotated[float, Field(ge=0)] = 5.0
    relay_batch_size: Annotated[int, Field(ge=1)] = 500
    # A task still pending this long after its record was published gets it published again.
    stale_task_seconds: Annotated[float, Field(gt=0)] = 300.0
    # Published outbox rows of finished tasks are deleted after this long (default 7 days).
    outbox_retention_seconds: Annotated[float, Field(gt=0)] = 7 * 24 * 3600.0

    # Logs: JSON lines (containers) or readable text (`moderation dev`); one access line per
    # HTTP request unless ACCESS_LOG=false.
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = True
    # functions-framework's own; read here only to say it in the startup line.
    port: Annotated[int, Field(ge=1, le=65535)] = 8080

    # How long a process waits at start for the database or broker it needs before it exits.
    startup_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    # The adapter, relay and dead-letter recorder serve /health, /ready and /metrics here.
    ops_port: Annotated[int, Field(ge=1, le=65535)] | None = None

    model_path: Path = DEFAULT_MODEL_PATH
    max_batch_size: Annotated[int, Field(ge=1)] = 1000
    max_body_bytes: Annotated[int, Field(ge=1)] = 1024 * 1024

    @model_validator(mode="before")
    @classmethod
    def _kafka_client_properties(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kafka_client_properties" not in data:
            data = {**data, "kafka_client_properties": kafka_properties_from(os.environ)}
        return data

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("database_url", "kafka_bootstrap_servers", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql:// (or postgres://)")
        try:
            urlsplit(value).port  # noqa: B018 (raises for a port that is not a number)
        except ValueError:
            raise ValueError("the port is not a number from 0 to 65535") from None
        return value

    @model_validator(mode="after")
    def _ranges_in_order(self) -> Settings:
        if self.database_pool_min_size > self.database_pool_max_size:
            raise ValueError("DATABASE_POOL_MIN_SIZE must not exceed DATABASE_POOL_MAX_SIZE")
        if self.retry_backoff_base_seconds > self.retry_backoff_max_seconds:
            raise ValueError("RETRY_BACKOFF_BASE_SECONDS must not exceed RETRY_BACKOFF_MAX_SECONDS")
        return self

    def redacted(self) -> dict[str, Any]:
        """Every setting by its variable name, secrets replaced: safe to print or log."""
        shown: dict[str, Any] = {}
        for name, value in self.model_dump(mode="json").items():
            if name == "database_url" and value:
                value = redact_url(value)
            shown[name.upper()] = value
        for role, properties in self.kafka_client_properties.items():
            prefix = "KAFKA_" if role == "all" else f"KAFKA_{role.upper()}_"
            for key, value in sorted(properties.items()):
                name = prefix + key.upper().replace(".", "_")
                shown[name] = REDACTED if is_secret(key) else value
        return shown


def describe_error(error: ValidationError) -> str:
    """One line naming each bad variable, never echoing a value (it may be a secret)."""
    parts = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]).upper()
        parts.append(
            f"{name}: {item['msg']}" if name else item["msg"].removeprefix("Value error, ")
        )
    return "invalid configuration: " + "; ".join(parts)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; raises ConfigError naming the bad variable."""
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigError(describe_error(error)) from None


def settings_or_exit(needs_model: bool = False) -> Settings:
    """For process start: bad configuration ends the process with one clear line.

    needs_model: the process serves the model, so MODEL_PATH and its model.json must exist
    (checked without loading anything; a model that exists but cannot be loaded is 503).
    """
    try:
        settings = get_settings()
    except ConfigError as error:
        sys.exit(f"error: {error}")
    if needs_model:
        for path in (settings.model_path, settings.model_path.with_suffix(".json")):
            if not path.is_file():
                sys.exit(f"error: invalid configuration: MODEL_PATH: no file {path}")
    return settings
