"""Request and response bodies, with the original service's bounds."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

INT32_MAX = 2_147_483_647
BIGINT_MAX = 9_223_372_036_854_775_807

PositiveId = Annotated[int, Field(ge=1, le=INT32_MAX)]
Int32 = Annotated[int, Field(ge=-INT32_MAX - 1, le=INT32_MAX)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]


class Ad(BaseModel):
    """An ad as a seller submits it; every field is required."""

    model_config = ConfigDict(frozen=True)

    seller_id: PositiveId
    is_verified_seller: bool
    item_id: PositiveId
    name: str
    description: str
    category: Int32
    images_qty: Count


class BatchRequest(BaseModel):
    items: list[Ad]


class ItemIdRequest(BaseModel):
    item_id: PositiveId


class TaskIdPath(BaseModel):
    task_id: Annotated[int, Field(ge=1, le=BIGINT_MAX)]


class Prediction(BaseModel):
    is_violation: bool
    probability: float
    model_version: str


class BatchPrediction(BaseModel):
    item_id: int
    is_violation: bool
    probability: float


class BatchResponse(BaseModel):
    results: list[BatchPrediction]
    model_version: str


TaskStatus = Literal["pending", "completed", "failed"]


class TaskAccepted(BaseModel):
    task_id: int
    status: TaskStatus = "pending"
    message: str = "Moderation request accepted"


class TaskReplay(TaskAccepted):
    """The answer to an Idempotency-Key used again: the same task, as it is now."""

    message: str = "Moderation request already accepted"
    replay: bool = True
    is_violation: bool | None = None
    probability: float | None = None
    error_message: str | None = None


class TaskResult(BaseModel):
    task_id: int
    item_id: int
    status: TaskStatus
    is_violation: bool | None
    probability: float | None
    error_message: str | None
    error: str | None  # the same text as error_message, under the name older clients read
    created_at: datetime
    processed_at: datetime | None
    model_version: str | None
