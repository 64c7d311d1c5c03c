"""moderation_consumer: one Kafka record, delivered as a CloudEvent, scored or retried or
dead-lettered. A 2xx answer means the outcome is durable; anything else means "deliver again"."""

from __future__ import annotations

import functions_framework.aio
from cloudevents.http.event import CloudEvent

from shared import consumer, logs

logs.start("moderation_consumer", needs_model=True)


@functions_framework.aio.cloud_event
async def moderation_consumer(event: CloudEvent) -> None:
    await consumer.handle(event.get_data(), event.get_attributes())
