"""The shared validation of requests: strict JSON types, every failure a 422 that can be
answered as JSON, whatever the input (property-based, with hypothesis)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ValidationFailed
from shared.http import JSONResponse, error_response, parse
from shared.schemas import Ad, BatchRequest, ItemIdRequest

AD: dict[str, Any] = {
    "seller_id": 1, "is_verified_seller": True, "item_id": 100, "name": "Test Item",
    "description": "Test Description", "category": 1, "images_qty": 3,
}  # fmt: skip

# Any JSON value, with integers far beyond 64 bits and any text, lone surrogates included.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def answered(detail: Any) -> dict[str, Any]:
    """The 422 body exactly as a client receives it: it must render and parse back."""
    body = error_response(422, detail).body
    return dict(json.loads(body))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("is_verified_seller", "yes"),
        ("is_verified_seller", 1),
        ("seller_id", "3"),
        ("item_id", 3.0),
        ("images_qty", True),
        ("category", "1"),
        ("name", 12345),
    ],
)
def test_json_body_types_are_strict(field: str, value: Any) -> None:
    with pytest.raises(ValidationFailed) as raised:
        parse(Ad, orjson.dumps({**AD, field: value}))
    assert raised.value.detail_value[0]["loc"] == ["body", field]


def test_query_values_are_text_and_convert() -> None:
    assert parse(ItemIdRequest, {"item_id": "3"}, where="query").item_id == 3


@pytest.mark.parametrize("value", [2**63, 2**64 + 1, -(2**70), 10**40])
def test_integers_beyond_64_bits_are_422_that_renders(value: int) -> None:
    body = f'{{"item_id": {value}}}'.encode()
    with pytest.raises(ValidationFailed) as raised:
        parse(ItemIdRequest, body)
    assert answered(raised.value.detail_value)["detail"][0]["loc"] == ["body", "item_id"]


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(AD)), value=json_values)
def test_any_value_in_any_ad_field_is_an_ad_or_a_422_that_renders(field: str, value: Any) -> None:
    data = {**AD, field: value}
    try:
        ad = parse(Ad, data)
    except ValidationFailed as error:
        assert answered(error.detail_value)["detail"]
        return
    assert isinstance(ad, Ad)
    assert type(getattr(ad, field)) is type(value)  # strict: nothing was coerced


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_body_is_a_batch_or_a_422_that_renders(body: bytes) -> None:
    try:
        parse(BatchRequest, body)
    except ValidationFailed as error:
        assert answered(error.detail_value)["detail"]


def test_error_response_renders_what_orjson_refuses() -> None:
    rendered = JSONResponse({"detail": [{"input": 2**80, "text": "\ud800"}]}).body
    assert json.loads(rendered) == {"detail": [{"input": 2**80, "text": "\ud800"}]}
