"""The original service's shape, for benchmarks only (never imported by the product): a
FastAPI app scoring with a pickled scikit-learn model (MODEL_PICKLE), served by uvicorn.

    MODEL_PICKLE=model.pkl uvicorn benchmarks.baseline_fastapi.main:app
"""

from __future__ import annotations

import os
import pickle  # nosec B403: a model this benchmark wrote itself

from fastapi import FastAPI
from pydantic import BaseModel

from shared.model_contract import feature_row

with open(os.environ["MODEL_PICKLE"], "rb") as file:  # at start, as the original did
    model = pickle.load(file)  # nosec B301

app = FastAPI()


class Ad(BaseModel):
    seller_id: int
    is_verified_seller: bool
    item_id: int
    name: str
    description: str
    category: int
    images_qty: int


class Prediction(BaseModel):
    is_violation: bool
    probability: float


@app.post("/predict")
async def predict(ad: Ad) -> Prediction:
    row = feature_row(ad.is_verified_seller, ad.images_qty, ad.description, ad.category)
    probability = float(model.predict_proba([row])[0, 1])
    return Prediction(is_violation=probability >= 0.5, probability=probability)
