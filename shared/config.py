"""Configuration: one pydantic-settings object read from the environment once per process."""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_PATH = Path(__file__).parent / "default_model" / "model.onnx"


class ConfigError(RuntimeError):
    """Bad configuration; the message is one line naming the variable."""


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
    moderation_topic: str = "moderation"
    retry_topic: str = "moderation_retry"
    dlq_topic: str = "moderation_dlq"
    topic_partitions: Annotated[int, Field(ge=1)] = 4
    max_retries: Annotated[int, Field(ge=0)] = 3
    retry_backoff_base_seconds: Annotated[float, Field(ge=0)] = 1.0
    retry_backoff_max_seconds: Annotated[float, Field(ge=0)] = 30.0
    # async_predict waits this long for the broker's ack after commit; past it the request is
    # still accepted and the outbox relay publishes later.
    publish_wait_seconds: Annotated[float, Field(ge=0)] = 1.0
    # The consumer answers 2xx only once a retry or dead letter is acknowledged within this.
    # DATABASE_TIMEOUT plus this stays well under the push adapter's request timeout (20 s).
    durable_publish_wait_seconds: Annotated[float, Field(gt=0)] = 5.0
    # The relay leaves rows younger than this to the publish that follows their commit.
    relay_grace_seconds: Annotated[float, Field(ge=0)] = 5.0
    relay_batch_size: Annotated[int, Field(ge=1)] = 500
    # A task still pending this long after its record was published gets it published again.
    stale_task_seconds: Annotated[float, Field(gt=0)] = 300.0
    # Published outbox rows of finished tasks are deleted after this long (default 7 days).
    outbox_retention_seconds: Annotated[float, Field(gt=0)] = 7 * 24 * 3600.0

    model_path: Path = DEFAULT_MODEL_PATH
    max_batch_size: Annotated[int, Field(ge=1)] = 1000
    max_body_bytes: Annotated[int, Field(ge=1)] = 1024 * 1024

    @field_validator("database_url", "kafka_bootstrap_servers", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql:// (or postgres://)")
        return value

    @model_validator(mode="after")
    def _ranges_in_order(self) -> Settings:
        if self.database_pool_min_size > self.database_pool_max_size:
            raise ValueError("DATABASE_POOL_MIN_SIZE must not exceed DATABASE_POOL_MAX_SIZE")
        if self.retry_backoff_base_seconds > self.retry_backoff_max_seconds:
            raise ValueError("RETRY_BACKOFF_BASE_SECONDS must not exceed RETRY_BACKOFF_MAX_SECONDS")
        return self


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


def settings_or_exit() -> Settings:
    """For process start: bad configuration ends the process with one clear line."""
    try:
        return get_settings()
    except ConfigError as error:
        sys.exit(f"error: {error}")
