"""The HTTP API's request and response bodies (pydantic), and the wording of the errors their validation gives.

Requests are validated strictly: ``"5"`` is not the integer 5 and ``true`` is not 1. Every validation failure becomes
one sentence that names the field (``images[1] must be a base64 string …``), answered 400 by the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from attrimeter.runtime.runtime import MAX_KEY_CHARS

__all__ = [
    "MAX_KEY_CHARS", "AddRequest", "AddResponse", "AttributeInfo", "AttributesResponse", "EmbedRequest",
    "EmbedResponse", "Embedding", "ErrorBody", "ExplainRequest", "GalleryEntries", "GalleryEntry", "Health",
    "MatchBody", "QueryResultBody", "SearchRequest", "SearchResponse", "describe_error", "json_type",
]


def json_type(value: Any) -> str:
    """How a JSON value's type is called in error messages ("a string", "an array", ...)."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _base64_string(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"must be a base64 string (JPEG/PNG bytes), got {json_type(value)}")
    return value


def _weights(value: Any) -> Any:
    """Numbers >= 0 only (bool is an int in Python, and JSON's 1e999 parses as inf): checked before the union."""
    if value is None:
        return value
    if not isinstance(value, dict | list):
        raise PydanticCustomError("sentence", "field 'weights' must be an object {attribute: weight} or an array of "
                                              "weights, got {got}", {"got": json_type(value)})
    for v in value.values() if isinstance(value, dict) else value:
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise PydanticCustomError("sentence", "weights must be numbers, got {got}", {"got": json_type(v)})
        if not (math.isfinite(v) and v >= 0):
            raise PydanticCustomError("sentence", "weights must be finite and >= 0, got {got}", {"got": repr(v)})
    return value


# A 2x4 violet PNG for the request examples, so that readers (and generated requests) see a valid image.
_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAAECAIAAAArjXluAAAAFUlEQVR4nGOssDnBwMDAxMDAgEEBACbUAYQNPgskAAAAAElFTkSuQmCC"
Base64Image = Annotated[str, BeforeValidator(_base64_string),
                        Field(description="JPEG/PNG/BMP bytes, base64 (a data: URL is accepted too)")]
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True)


class EmbedRequest(_Request):
    """``POST /embed``: images to embed."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"images": [_PNG]}]})

    images: list[Base64Image] = Field(min_length=1, description="query images")


class SearchRequest(EmbedRequest):
    """``POST /search``: query images, hits per query, optional attribute weights and overlays."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"images": [_PNG], "k": 3, "overlays": 1}]})

    k: int = Field(10, ge=1, description="hits per query")
    weights: Annotated[dict[str, Weight] | list[Weight] | None, BeforeValidator(_weights)] = Field(
        None, description="rank by Σ_k w_k d_k: {attribute: weight} (others keep 1) or one weight per attribute")
    overlays: int = Field(0, ge=0, description="attention-map overlays for this many top attributes per hit")


class ExplainRequest(_Request):
    """``POST /explain``: one query image against chosen gallery ids."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"image": _PNG, "ids": [0, 1]}]})

    image: Base64Image
    ids: list[int] = Field(min_length=1, description="gallery ids; an id the gallery does not hold is a 404")
    overlays: int = Field(0, ge=0)


class AddRequest(EmbedRequest):
    """``POST /gallery/add``: images to append, with an optional key and camera per image."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"images": [_PNG], "keys": ["violet"], "cameras": [1]}]})

    keys: list[Annotated[str, Field(max_length=MAX_KEY_CHARS)]] | None = None
    cameras: list[int | None] | None = None


# ------------------------------------------------------------------------------------------------------ answers


class ErrorBody(BaseModel):
    """Every error answer: what was wrong, and the status code again."""

    error: str
    status: int


class Health(BaseModel):
    """``GET /health``: ``degraded`` (with the problem) when the gallery cannot be refreshed or holds corrupt rows."""

    status: Literal["ok", "degraded"]
    problem: str | None = None
    backend: str
    device: str
    gallery: int | None = Field(description="entries in the gallery, null without one")
    index: str | None = Field(None, description="the gallery's search index: flat (exact), ivf or hnsw; a sharded "
                                                "gallery's kinds joined by commas; null without a gallery or when no "
                                                "shard answered")
    model: str = Field(description="the first 12 hex digits of the source checkpoint's sha256")


class PredictedAttribute(BaseModel):
    """An attribute as the model predicts it: the meaning of the more likely label, and P(label 1)."""

    value: str
    prob: float


class Embedding(BaseModel):
    """One image's global embedding f, its per-attribute embeddings f_k and its predicted attributes."""

    embedding: list[float]
    attr_embeddings: list[list[float]]
    attributes: dict[str, PredictedAttribute]


class EmbedResponse(BaseModel):
    """``POST /embed``."""

    embeddings: list[Embedding]


class AttributeShare(BaseModel):
    """One attribute's part of a distance: d_k, its share p_k and contribution c_k = p_k·d."""

    name: str
    title: str
    d_k: float
    share: float
    contribution: float


class Difference(BaseModel):
    """A predicted attribute on which query and hit differ."""

    name: str
    title: str
    query: str
    gallery: str


class Overlay(BaseModel):
    """Attention-map overlays (base64 PNG) of one attribute; ``gallery`` is null when the hit's image is unknown."""

    attribute: str
    query: str
    gallery: str | None


class MatchBody(BaseModel):
    """One explained hit; ``attributes`` sorted by decreasing contribution (they sum to d)."""

    id: int
    key: str
    path: str | None
    camera: int | None
    rank: int
    score: float = Field(description="the ranking score: d, or Σ_k w_k d_k with weights, or 1 - cos (ip gallery)")
    d: float
    d_hat: float
    attributes: list[AttributeShare]
    differing: list[Difference]
    overlays: list[Overlay] | None = None


class QueryResultBody(BaseModel):
    """The explained hits of one query, best first, and the query's predicted attributes."""

    query: dict[str, PredictedAttribute]
    matches: list[MatchBody]
    missing_shards: list[str] | None = Field(
        None, description="a partial answer of a sharded gallery (served with --partial-shards): the shards that did "
                          "not answer, whose entries are absent")


class SearchResponse(BaseModel):
    """``POST /search``: one result per query image."""

    results: list[QueryResultBody]


class AddResponse(BaseModel):
    """``POST /gallery/add``: the new ids and the gallery's size."""

    ids: list[int]
    gallery: int


class AttributeInfo(BaseModel):
    """An attribute of the export: name, title, display group and the meaning of label 0 and 1."""

    name: str
    title: str
    group: str
    meanings: tuple[str, str]


class AttributesResponse(BaseModel):
    """``GET /attributes``: the attribute schema and the model's input size (height, width)."""

    attributes: list[AttributeInfo]
    image_size: tuple[int, int]


class GalleryEntry(BaseModel):
    """A gallery entry as listed for picking a query: id, key, camera, and whether its image can be shown."""

    id: int
    key: str
    camera: int | None
    has_image: bool


class GalleryEntries(BaseModel):
    """``GET /gallery/entries``: a page of entries and the gallery's size."""

    total: int
    entries: list[GalleryEntry]


# ------------------------------------------------------------------------------------------------ error wording

_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "string_type": "a string", "list_type": "an array",
             "float_type": "a number", "dict_type": "an object", "bool_type": "a boolean", "model_type": "an object",
             "tuple_type": "an array"}


def _where(loc: tuple[int | str, ...]) -> str:
    """``("images", 1)`` → ``images[1]``; a top-level field ``("k",)`` → ``field 'k'``."""
    if len(loc) == 1:
        return f"field {loc[0]!r}"
    out = str(loc[0])
    for part in loc[1:]:
        out += f"[{part}]" if isinstance(part, int) else f"[{part!r}]"
    return out


def describe_error(errors: Sequence[Mapping[str, Any]]) -> str:
    """One sentence for the first problem of a failed validation, naming the field.

    Args:
        errors: ``ValidationError.errors()`` of a request body, or FastAPI's for path and query parameters (whose
            locations start with ``"path"`` / ``"query"``).

    Returns:
        E.g. ``"missing field 'images'"``, ``"field 'k' must be an integer, got a string"``,
        ``"images[1] must be a base64 string (JPEG/PNG bytes), got an integer"``.
    """
    first = errors[0]
    kind, loc, ctx = first["type"], tuple(first["loc"]), first.get("ctx") or {}
    if loc and loc[0] in ("body", "path", "query"):
        loc = loc[1:]
    if kind == "sentence":
        return first["msg"]
    if not loc:
        return f"request body must be a JSON object, got {json_type(first.get('input'))}"
    where = _where(loc)
    if kind == "missing":
        return f"missing field {loc[0]!r}"
    if kind == "value_error":
        return f"{where} {ctx.get('error', first['msg'])}"
    if kind == "too_short" and ctx.get("min_length") == 1:
        return f"{where} is empty"
    if kind == "string_unicode":
        return f"{where} is not valid Unicode (it holds a lone surrogate)"
    if kind == "string_too_long":
        return f"{where} is longer than {ctx.get('max_length')} characters"
    if kind in _EXPECTED:
        return f"{where} must be {_EXPECTED[kind]}, got {json_type(first.get('input'))}"
    if kind == "greater_than_equal":
        return f"{where} must be >= {ctx.get('ge')}, got {first.get('input')!r}"
    if kind == "less_than_equal":
        return f"{where} must be <= {ctx.get('le')}, got {first.get('input')!r}"
    return f"{where}: {first['msg']}"
