"""One errors module: each error names its HTTP status and what the consumer does with it."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class Outcome(StrEnum):
    """What the consumer does with a message whose processing raised the error."""

    RETRY = "retryable"  # republish to the retry topic, DLQ after MAX_RETRIES
    DEAD_LETTER = "permanent"  # DLQ at once, task failed


class ModerationError(Exception):
    """Base of every error the service answers deliberately."""

    status: ClassVar[int] = 500
    detail: ClassVar[str] = "Internal error"
    outcome: ClassVar[Outcome] = Outcome.DEAD_LETTER

    def __init__(self, detail: Any = None) -> None:
        self.detail_value: Any = self.detail if detail is None else detail
        super().__init__(str(self.detail_value))


class ValidationFailed(ModerationError):
    status = 422
    detail = "Validation error"


class PayloadTooLarge(ModerationError):
    status = 413
    detail = "Request body is too large"


class IdempotencyConflict(ModerationError):
    status = 422
    detail = "Idempotency-Key was already used for another item"


class NotFound(ModerationError):
    status = 404
    detail = "Not Found"


class ItemNotFound(ModerationError):
    status = 404
    detail = "Item not found"


class TaskNotFound(ModerationError):
    status = 404
    detail = "Task not found"


class InvalidCloudEvent(ModerationError):
    """A delivery to the consumer that is not a CloudEvent: a sink rejects it for good."""

    status = 400
    detail = "Bad Request: not a CloudEvent"


class InvalidMessage(ModerationError):
    status = 400
    detail = "Invalid message"


class ModelUnavailable(ModerationError):
    status = 503
    detail = "Model is not available"
    # A model that cannot be loaded is a deployment problem, like a database that is down:
    # retried. A model that fails on one input (ScoringFailed) is permanent for that input.
    outcome = Outcome.RETRY


class ScoringFailed(ModerationError):
    status = 500
    detail = "Internal error while scoring"


class DatabaseUnavailable(ModerationError):
    status = 503
    detail = "Database is not available"
    outcome = Outcome.RETRY


class BrokerUnavailable(ModerationError):
    status = 503
    detail = "Message broker is not available"
    outcome = Outcome.RETRY
