"""The HTTP API over one :class:`~attrimeter.runtime.runtime.Runtime`, as an ASGI app (FastAPI, pydantic bodies).

Endpoints (images are base64 JPEG/PNG/BMP bytes; the OpenAPI schema is at ``/openapi.json``)::

    GET  /health              {"status": "ok" | "degraded", "problem"?, "backend", "device", "gallery", "index",
                               "model"}
    GET  /metrics             Prometheus text exposition (prometheus_client)
    POST /embed               {"images"}                                -> {"embeddings": [...]}
    POST /search              {"images", "k", "weights", "overlays"}    -> {"results": [QueryResult, ...]}
    POST /explain             {"image", "ids", "overlays"}              -> QueryResult
    POST /gallery/add         {"images", "keys", "cameras"}             -> {"ids", "gallery"}
    GET  /attributes          the attribute schema (names, titles, groups, meanings) and the input size
    GET  /gallery/entries     a page of gallery entries (id, key, camera)
    GET  /gallery/{id}/image  a gallery entry's crop as PNG (entries indexed from files)
    GET  /viewer/             the explanation viewer (static page over this API)

Every error is ``{"error": message, "status": code}``: 400 malformed input (JSON, base64, image, NaN, shape, a
field of the wrong type), 404 unknown endpoint or gallery id, 405 wrong method, 408 body too slow, 409 no gallery,
411 no length, 413 body too large or too many images, 503 overloaded or shards of a sharded gallery not answering
(with ``Retry-After``), 507 the gallery's disk failed, 500 the gallery holds corrupt rows (named; ``/health`` then
says degraded) or an unexpected failure (logged with its traceback, answered with a generic message).

Gallery ids: an id that is not a JSON integer is malformed (400); any integer the gallery does not hold (negative,
beyond int64, or past the end) is unknown (404).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from attrimeter import __version__
from attrimeter.data.images import ImageError
from attrimeter.runtime import schemas
from attrimeter.runtime.errors import (
    CorruptGalleryError,
    GalleryError,
    InputError,
    OverloadedError,
    ShardUnavailableError,
    StorageError,
    UnknownIdError,
)
from attrimeter.runtime.images import load_image
from attrimeter.runtime.metrics import ServerMetrics
from attrimeter.viz import to_png

if TYPE_CHECKING:
    from attrimeter.runtime.runtime import Runtime

__all__ = ["HttpError", "ServerLimits", "create_app"]

log = logging.getLogger(__name__)

MiB = 1 << 20
_T = TypeVar("_T")
_M = TypeVar("_M", bound=BaseModel)
# Oversized bodies up to this many times the limit are drained after the 413, so that a client still sending can read
# it; larger ones are cut off (Connection: close).
_DRAIN_FACTOR = 4
_INT64 = 1 << 63
_REQUESTS = {"/embed": schemas.EmbedRequest, "/search": schemas.SearchRequest, "/explain": schemas.ExplainRequest,
             "/gallery/add": schemas.AddRequest}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorBody, "description": text} for code, text in (
        (400, "malformed input"), (404, "unknown gallery id"), (408, "body not received in time"),
        (409, "no gallery"), (411, "no Content-Length"), (413, "body too large or too many images"),
        (500, "corrupt gallery rows"), (503, "overloaded, or shards not answering: retry after Retry-After seconds"),
        (507, "the gallery's disk failed"))}


@dataclass(frozen=True)
class ServerLimits:
    """What one request, and the server as a whole, may take.

    Attributes:
        max_body_bytes: Largest request body (413 above; checked while it streams in, not only from its length).
        max_images: Most images in one request (413 above).
        max_k: Largest search ``k`` and most explain ids (400 above): bounds the memory of one answer.
        request_timeout_s: Deadline for a request's head (from connection or the previous answer) and for its body.
        decode_workers: Images decoded at once, over all requests: bounds decoding memory (a crop just under the
            pixel cap decodes to about 60 MB of RGB).
        max_connections: Most open connections, and most requests being answered (a 503 above).
        backlog: Connections the kernel queues before the server accepts them.
    """

    max_body_bytes: int = 16 * MiB
    max_images: int = 64
    max_k: int = 1000
    request_timeout_s: float = 30.0
    decode_workers: int = 2
    max_connections: int = 64
    backlog: int = 2048

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = float if f.name.endswith("_s") else int
            if isinstance(value, bool) or not isinstance(value, kind | int) or not value > 0:
                raise ValueError(f"{f.name} must be a positive {kind.__name__}, got {value!r}")


class HttpError(Exception):
    """A request answered with ``status`` and ``{"error": message, "status": status}``.

    Args:
        status: HTTP status code.
        message: What was wrong, for the client.
        headers: Extra response headers (e.g. ``Retry-After``).
        close: Close the connection after answering (its body was not read).
    """

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.headers = dict(headers or {})
        if close:
            self.headers["Connection"] = "close"


class JsonResponse(Response):
    """JSON that survives any key: non-ASCII escaped (a lone surrogate cannot be UTF-8), NaN refused."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:  # noqa: D102 - Response's hook
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JsonResponse:
    return JsonResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _decode(text: str, name: str, size: tuple[int, int]) -> np.ndarray:
    """base64 (or a data: URL) → uint8 pixels at the model's size; runs in the decode pool."""
    if text.startswith("data:"):
        _, sep, text = text.partition(",")
        if not sep:
            raise InputError(f"{name} is a data URL without a comma")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{name} is not valid base64: {e}") from None
    if not data:
        raise InputError(f"{name} is empty")
    return load_image(data, size, name)


class _Api:
    """The endpoints: parse and check a request, run the runtime off the event loop, map its errors to statuses."""

    def __init__(self, runtime: Runtime, limits: ServerLimits) -> None:
        self.runtime = runtime
        self.limits = limits
        self.metrics = ServerMetrics(runtime.stats)
        self.decoder = ThreadPoolExecutor(limits.decode_workers, thread_name_prefix="attrimeter-http-decode")
        # Runtime calls mostly wait for the batcher: one thread per admitted request, so none waits for a thread.
        self.threads = anyio.CapacityLimiter(limits.max_connections)
        self.schema = schemas.AttributesResponse(
            attributes=[schemas.AttributeInfo(name=a.name, title=a.title, group=a.group or a.name, meanings=a.meanings)
                        for a in runtime.manifest.attributes],
            image_size=runtime.image_size).model_dump()

    # ---------------------------------------------------------------------------------------------- plumbing

    def _timed(self, op: str, fn: Callable[..., _T]) -> Callable[..., _T]:
        """``fn`` counted as runtime operation ``op`` in the metrics (latency, and an error when it raises)."""
        def call(*args: Any, **kwargs: Any) -> _T:
            with self.metrics.operation(op):
                return fn(*args, **kwargs)

        return call

    async def _run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self.threads)
        except (InputError, ImageError) as e:
            raise HttpError(400, str(e)) from None
        except UnknownIdError as e:
            raise HttpError(404, str(e)) from None
        except StorageError as e:
            log.error("gallery write failed: %s", e)
            raise HttpError(507, str(e)) from None
        except CorruptGalleryError as e:
            log.error("%s", e)
            raise HttpError(500, str(e)) from None
        except ShardUnavailableError as e:
            log.error("%s", e)
            raise HttpError(503, str(e), headers={"Retry-After": "1"}) from None
        except GalleryError as e:
            raise HttpError(409, str(e)) from None
        except OverloadedError as e:
            raise HttpError(503, str(e) or "server overloaded, retry later", headers={"Retry-After": "1"}) from None

    async def _body(self, request: Request, model: type[_M]) -> _M:
        """Read the body within the size and time limits, parse strict JSON, validate it against ``model``."""
        limit, headers = self.limits.max_body_bytes, request.headers
        if "transfer-encoding" in headers and "content-length" in headers:  # framing two parties may read apart
            raise HttpError(400, "a request may not carry both Content-Length and Transfer-Encoding", close=True)
        declared = headers.get("content-length")
        if declared is None and "transfer-encoding" not in headers:
            raise HttpError(411, "a request body with Content-Length is required")
        if declared is not None and int(declared) > limit:  # h11 has checked that it is digits only
            raise HttpError(413, f"request body of {declared} bytes exceeds the limit of {limit}",
                            close=int(declared) > _DRAIN_FACTOR * limit)
        parts, size = [], 0
        try:
            with anyio.fail_after(self.limits.request_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise HttpError(413, f"request body exceeds the limit of {limit} bytes", close=True)
                    parts.append(chunk)
        except TimeoutError:
            raise HttpError(408, f"request body not received within {self.limits.request_timeout_s:g} s",
                            close=True) from None
        try:
            body = json.loads(b"".join(parts), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise HttpError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise HttpError(400, f"request body must be a JSON object, got {schemas.json_type(body)}")
        try:
            parsed = model.model_validate(body)
        except ValidationError as e:
            raise HttpError(400, schemas.describe_error(e.errors(include_url=False))) from None
        images = getattr(parsed, "images", None)
        request.state.images = len(images) if images is not None else 1
        if images is not None and len(images) > self.limits.max_images:
            raise HttpError(413, f"too many images in one request: {len(images)} > {self.limits.max_images}")
        return parsed

    async def _pixels(self, images: Sequence[str], names: Sequence[str]) -> np.ndarray:
        """Decode in the shared pool (bounded memory over all requests); the first bad image fails the request."""
        loop = asyncio.get_running_loop()
        size = self.runtime.image_size
        futures: list[Future[np.ndarray]] = [self.decoder.submit(_decode, text, name, size)
                                             for text, name in zip(images, names, strict=True)]
        try:
            return np.stack([await asyncio.wrap_future(f, loop=loop) for f in futures])
        except (InputError, ImageError) as e:
            raise HttpError(400, str(e)) from None
        finally:
            for f in futures:
                f.cancel()

    def _gallery_size(self, path: str) -> int:
        gallery = self.runtime.gallery
        if gallery is None:
            raise HttpError(409, f"{path} needs a gallery and the server has none loaded (serve with --gallery)")
        return len(gallery)

    def _check_ids(self, ids: Sequence[int], total: int) -> None:
        """Integers the gallery cannot hold (negative, past int64) are unknown ids, like ones past its end."""
        bad = [i for i in ids if not 0 <= i < _INT64]
        if bad:
            raise HttpError(404, f"unknown gallery id {bad[0]} (the gallery holds ids 0..{total - 1})")

    # ---------------------------------------------------------------------------------------------- endpoints

    async def health(self) -> JsonResponse:
        """Whether the server can answer, with its backend, device, gallery size and model."""
        runtime = self.runtime
        stats = await self._run(runtime.stats)
        missing = stats.get("gallery_missing_shards")
        problem = (stats.get("gallery_problem") or stats.get("gallery_refresh_error")
                   or (f"shards {', '.join(missing)} did not answer the last call to the shards" if missing else None))
        gallery = stats.get("gallery_size")
        return JsonResponse({"status": "degraded" if problem else "ok", "problem": problem,
                             "backend": runtime.backend.name, "device": runtime.backend.device, "gallery": gallery,
                             "index": stats.get("gallery_index"), "model": runtime.model_id[:12]})

    async def prometheus(self, request: Request) -> Response:
        """Prometheus metrics (text format 0.0.4 unless the scraper asks for another)."""
        body, content_type = await self._run(self.metrics.exposition, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    async def embed(self, request: Request) -> JsonResponse:
        """Embed images: global and per-attribute embeddings and predicted attributes."""
        body = await self._body(request, schemas.EmbedRequest)
        pixels = await self._pixels(body.images, [f"images[{i}]" for i in range(len(body.images))])
        emb = await self._run(self._timed("embed", self.runtime.embed), pixels)
        return JsonResponse({"embeddings": emb.to_dict(self.runtime.attributes, self.runtime.meanings)})

    async def search(self, request: Request) -> JsonResponse:
        """The k nearest gallery entries of each image, explained (attribute-weighted with ``weights``)."""
        body = await self._body(request, schemas.SearchRequest)
        self._gallery_size("/search")
        if body.k > self.limits.max_k:
            raise HttpError(400, f"field 'k' must be in [1, {self.limits.max_k}], got {body.k}")
        pixels = await self._pixels(body.images, [f"images[{i}]" for i in range(len(body.images))])

        def answer() -> list[dict[str, Any]]:  # PNG-encoding the overlays happens off the event loop too
            with self.metrics.operation("search"):
                results = self.runtime.search(list(pixels), k=body.k, weights=body.weights, overlays=body.overlays)
            return [r.to_dict(overlays=body.overlays) for r in results]

        return JsonResponse({"results": await self._run(answer)})

    async def explain(self, request: Request) -> JsonResponse:
        """Explain one image against chosen gallery ids (in that order)."""
        body = await self._body(request, schemas.ExplainRequest)
        total = self._gallery_size("/explain")
        if len(body.ids) > self.limits.max_k:
            raise HttpError(400, f"too many ids: {len(body.ids)} > {self.limits.max_k}")
        self._check_ids(body.ids, total)
        pixels = await self._pixels([body.image], ["image"])

        def answer() -> dict[str, Any]:
            with self.metrics.operation("explain"):
                result = self.runtime.explain(pixels[0], body.ids, overlays=body.overlays)
            return result.to_dict(overlays=body.overlays)

        return JsonResponse(await self._run(answer))

    async def add(self, request: Request) -> JsonResponse:
        """Embed images and append them to the gallery (one crash-safe segment)."""
        body = await self._body(request, schemas.AddRequest)
        self._gallery_size("/gallery/add")
        n = len(body.images)
        for name, values in (("keys", body.keys), ("cameras", body.cameras)):
            if values is not None and len(values) != n:
                raise HttpError(400, f"field {name!r} has {len(values)} entries for {n} images")
        pixels = await self._pixels(body.images, [f"images[{i}]" for i in range(n)])
        ids = await self._run(self._timed("add", self.runtime.add), list(pixels), keys=body.keys, cameras=body.cameras)
        return JsonResponse({"ids": [int(i) for i in ids], "gallery": self._gallery_size("/gallery/add")})

    async def attributes_info(self) -> JsonResponse:
        """The attribute schema of the export (for weight controls) and its input size."""
        return JsonResponse(self.schema)

    async def entries(self, offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)) -> JsonResponse:
        """A page of gallery entries, to pick a query from."""
        total = self._gallery_size("/gallery/entries")
        ids = np.arange(min(offset, total), min(offset + limit, total))
        meta = await self._run(self.runtime.gallery.meta, ids) if len(ids) else []  # type: ignore[union-attr]
        return JsonResponse({"total": total, "entries": [
            {"id": int(i), "key": str(m.get("key") or f"entry-{i}"), "camera": m.get("camera"),
             "has_image": bool(m.get("path"))} for i, m in zip(ids, meta, strict=True)]})

    async def image(self, id: int) -> Response:  # noqa: A002 - the path parameter's name
        """A gallery entry's crop at the model's input size, as PNG."""
        total = self._gallery_size("/gallery/{id}/image")
        self._check_ids([id], total)
        meta = (await self._run(self.runtime.gallery.meta, [id]))[0]  # type: ignore[union-attr]
        if not meta.get("path"):
            raise HttpError(404, f"gallery entry {id} has no image file (added without one)")
        loop = asyncio.get_running_loop()
        try:
            pixels = await asyncio.wrap_future(self.decoder.submit(load_image, meta["path"], self.runtime.image_size,
                                                                   f"gallery entry {id}"), loop=loop)
        except InputError as e:
            raise HttpError(404, f"gallery entry {id}: its image cannot be read ({e})") from None
        return Response(await self._run(to_png, pixels), media_type="image/png")


# -------------------------------------------------------------------------------------------------- middleware


class _Observe:
    """Outermost: counts every request in the metrics and turns an unexpected failure into a logged JSON 500."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        started = False

        async def send_observed(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_observed)
        except ClientDisconnect:  # the client went away mid-body: nothing to answer
            status = 499
        except Exception:
            log.exception("error answering %s %s", scope["method"], scope["path"])
            if not started:
                await _error(500, "internal server error (logged on the server)", {"Connection": "close"})(
                    scope, receive, send)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None)
            viewer = scope["path"].startswith("/viewer/")
            endpoint = route or ("/viewer/" if viewer else "other")  # unknown paths share a label: bounded cardinality
            images = scope.get("state", {}).get("images", 0) if status < 400 else 0
            self.metrics.observe(endpoint, scope["method"], status, time.perf_counter() - start, images)


def create_app(runtime: Runtime, limits: ServerLimits | None = None) -> FastAPI:
    """The ASGI app answering with ``runtime`` (which it uses, thread-safely, but does not close).

    Args:
        runtime: The runtime every request uses.
        limits: Request and server limits (defaults: :class:`ServerLimits`).

    Returns:
        A FastAPI app; serve it with :func:`attrimeter.runtime.server.serve` (uvicorn with hardened HTTP framing).
    """
    limits = limits or ServerLimits()
    api = _Api(runtime, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        api.decoder.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="AttriMeter runtime", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # their pages load scripts from a CDN: nothing downloads at run time
                  description=__doc__.split("\n\n")[0])
    app.state.api = api
    get, post = functools.partial(app.add_api_route, methods=["GET"]), functools.partial(app.add_api_route,
                                                                                           methods=["POST"])
    get("/health", api.health, responses={200: {"model": schemas.Health}})
    get("/metrics", api.prometheus, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    for path, endpoint, answer in (("/embed", api.embed, schemas.EmbedResponse),
                                   ("/search", api.search, schemas.SearchResponse),
                                   ("/explain", api.explain, schemas.QueryResultBody),
                                   ("/gallery/add", api.add, schemas.AddResponse)):
        request_schema = {"$ref": f"#/components/schemas/{_REQUESTS[path].__name__}"}
        post(path, endpoint, responses={200: {"model": answer}, **_ERRORS},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": request_schema}}}})
    get("/attributes", api.attributes_info, responses={200: {"model": schemas.AttributesResponse}})
    get("/gallery/entries", api.entries, responses={200: {"model": schemas.GalleryEntries}, **_ERRORS})
    get("/gallery/{id}/image", api.image,
        responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}, **_ERRORS})
    app.add_api_route("/", lambda: RedirectResponse("/viewer/"), methods=["GET"], include_in_schema=False)
    app.mount("/viewer", StaticFiles(packages=[("attrimeter.runtime", "viewer")], html=True), name="viewer")
    api_paths = ", ".join(sorted({r.path for r in app.routes if getattr(r, "include_in_schema", False)}))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HttpError)
        return _error(exc.status, exc.message, exc.headers)

    async def starlette_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path, headers = request.url.path, dict(exc.headers or {})
        if exc.status_code == 405:
            message = f"{path} takes {headers.get('Allow', '?')}, not {request.method}"
        elif exc.status_code == 404:
            message = f"no such endpoint: {path}; endpoints: {api_paths}, /viewer/"
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message, headers)

    async def parameter_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _error(400, schemas.describe_error(exc.errors()))

    app.add_exception_handler(HttpError, http_error)
    app.add_exception_handler(HTTPException, starlette_error)
    app.add_exception_handler(RequestValidationError, parameter_error)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # the request bodies are parsed by _Api._body, so their models are added here
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in _REQUESTS.values()],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(_Observe, metrics=api.metrics)
    return app
