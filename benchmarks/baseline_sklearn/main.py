"""Baseline for benchmarks only: the predict function as the original service served it,
scoring with a pickled scikit-learn model (MODEL_PICKLE) instead of ONNX."""

from __future__ import annotations

import os
import pickle

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import JSONResponse

from shared.model_contract import feature_row
from shared.schemas import Ad

_model = None


def _get_model():
    global _model
    if _model is None:  # lazily, after the fork, like the real function
        with open(os.environ["MODEL_PICKLE"], "rb") as file:
            _model = pickle.load(file)  # imports scikit-learn
    return _model


@functions_framework.aio.http
async def predict(request: Request) -> JSONResponse:
    if request.url.path.endswith("/health"):
        return JSONResponse({"status": "ok"})
    ad = Ad.model_validate_json(await request.body())
    row = feature_row(ad.is_verified_seller, ad.images_qty, ad.description, ad.category)
    probability = float(_get_model().predict_proba([row])[0, 1])
    return JSONResponse({"is_violation": probability >= 0.5, "probability": probability})
