"""Synchronous scoring: one ad, a batch of ads, or a stored ad by id."""

from __future__ import annotations

from collections.abc import Sequence

from shared import db, repository
from shared.errors import ItemNotFound
from shared.model import get_model
from shared.schemas import Ad, BatchPrediction, BatchResponse, Prediction


def predict(ad: Ad) -> Prediction:
    model = get_model()
    score = model.score_one(ad)
    # Our own values, of the declared types: constructed without validating them again.
    return Prediction.model_construct(
        is_violation=score.is_violation, probability=score.probability, model_version=model.version
    )


def predict_batch(ads: Sequence[Ad]) -> BatchResponse:
    """Score a batch; its size was checked (MAX_BATCH_SIZE) before its items were parsed."""
    model = get_model()
    results = [
        BatchPrediction(item_id=ad.item_id, is_violation=s.is_violation, probability=s.probability)
        for ad, s in zip(ads, model.score(ads), strict=True)
    ]
    return BatchResponse(results=results, model_version=model.version)


async def predict_stored(item_id: int) -> Prediction:
    """Score a stored ad; the model is checked first so a broken model never costs a query."""
    get_model()
    async with db.connection() as conn:
        ad = await repository.get_ad(conn, item_id)
    if ad is None:
        raise ItemNotFound()
    return predict(ad)
