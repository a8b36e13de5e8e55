"""HTTP JSON server over a :class:`~attrimeter.runtime.runtime.Runtime` (standard library only).

Endpoints (images are base64 strings of JPEG/PNG bytes)::

    GET  /health        {"status": "ok", "backend", "device", "gallery": count | null, "model": sha256 prefix}
    GET  /metrics       Prometheus text exposition 0.0.4 (runtime and HTTP counters, latency histograms)
    POST /embed         {"images": [...]}                         -> {"embeddings": [per image, ...]}
    POST /search        {"images": [...], "k", "weights", "overlays"} -> {"results": [QueryResult, ...]}
    POST /explain       {"image": ..., "ids": [...], "overlays"}  -> QueryResult
    POST /gallery/add   {"images": [...], "keys", "cameras"}      -> {"ids": [...], "gallery": count}

Every error is ``{"error": message, "status": code}``. Bad input is answered 4xx before anything reaches the
gallery, and no request, however malformed, stops the server: an unexpected failure is logged with its traceback and
answered 500 with a generic message.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import io
import itertools
import json
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from attrimeter.data.images import ImageError
from attrimeter.runtime.errors import GalleryError, InputError, OverloadedError, StorageError, UnknownIdError

if TYPE_CHECKING:
    from attrimeter.runtime.runtime import Runtime

__all__ = ["HttpError", "RuntimeServer", "make_server", "serve"]

log = logging.getLogger(__name__)

MiB = 1 << 20
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_READ_CHUNK = 1 << 16
# Oversized bodies up to this many times the limit are read and dropped before the 413 (see _read_json).
_DISCARD_FACTOR = 4
_JSON = "application/json"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class HttpError(Exception):
    """A request the server answers with ``status`` and ``{"error": message}``.

    Args:
        status: HTTP status code.
        message: What was wrong, for the client.
        headers: Extra response headers (e.g. ``Retry-After``).
    """

    def __init__(self, status: int, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.headers = dict(headers or {})


# --------------------------------------------------------------------------------------------------- request fields


def _field(body: Mapping[str, Any], name: str, kinds: type | tuple[type, ...], what: str, default: Any = ...) -> Any:
    if name not in body or (body[name] is None and default is not ...):
        if default is ...:
            raise HttpError(400, f"missing field {name!r} ({what})")
        return default
    value = body[name]
    if not isinstance(value, kinds) or isinstance(value, bool):  # bool is an int, but true is never a count or id
        raise HttpError(400, f"field {name!r} must be {what}, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decode_image(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise HttpError(400, f"{where} must be a base64 string, got {_json_type(text)}")
    if text.startswith("data:"):  # tolerate data URLs: data:image/png;base64,....
        _, sep, text = text.partition(",")
        if not sep:
            raise HttpError(400, f"{where} is a data URL without a comma")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HttpError(400, f"{where} is not valid base64: {e}") from None
    if not data:
        raise HttpError(400, f"{where} is empty")
    return data


def _images(body: Mapping[str, Any], limit: int) -> list[bytes]:
    items = _field(body, "images", list, "an array of base64-encoded JPEG/PNG images")
    if not items:
        raise HttpError(400, "field 'images' is empty")
    if len(items) > limit:
        raise HttpError(413, f"too many images in one request: {len(items)} > {limit}")
    return [_decode_image(item, f"images[{i}]") for i, item in enumerate(items)]


def _optional_list(body: Mapping[str, Any], name: str, n: int, check: Callable[[Any], bool], item: str) -> list | None:
    values = _field(body, name, list, f"an array with {item} per image", default=None)
    if values is None:
        return None
    if len(values) != n:
        raise HttpError(400, f"field {name!r} has {len(values)} entries for {n} images")
    for i, v in enumerate(values):
        if not check(v):
            raise HttpError(400, f"{name}[{i}] must be {item}, got {_json_type(v)}")
    return values


def _overlays(body: Mapping[str, Any]) -> int:
    overlays = _field(body, "overlays", int, "a non-negative integer", default=0)
    if overlays < 0:
        raise HttpError(400, f"field 'overlays' must be non-negative, got {overlays}")
    return overlays


def _weights(body: Mapping[str, Any]) -> dict[str, float] | list[float] | None:
    weights = _field(body, "weights", (dict, list), "an object {attribute: weight} or an array of weights",
                     default=None)
    values = weights.values() if isinstance(weights, dict) else weights or ()
    for v in values:
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise HttpError(400, f"weights must be numbers, got {_json_type(v)}")
    return weights


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


# ---------------------------------------------------------------------------------------------------- responses


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _query_result(result: Any) -> dict[str, Any]:
    """``QueryResult.to_dict()`` plus each match's AAM overlays as base64 PNGs (to_dict leaves image arrays out)."""
    out = result.to_dict()
    for match, entry in zip(result.matches, out["matches"], strict=True):
        if match.overlays:
            entry["overlays"] = [{"attribute": name, "query": _png_b64(q),
                                  "gallery": None if g is None else _png_b64(g)} for name, q, g in match.overlays]
    return out


# ------------------------------------------------------------------------------------------------------ metrics


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


class _Exposition:
    """Builds Prometheus text format 0.0.4: one ``# HELP``/``# TYPE`` block per metric family."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._seen: set[str] = set()

    def family(self, name: str, kind: str, help_text: str) -> None:
        if name in self._seen:
            raise ValueError(f"metric family {name} written twice")
        self._seen.add(name)
        help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, labels: Mapping[str, Any] | None = None) -> None:
        self.lines.append(f"{name}{_labels(labels or {})} {_number(float(value))}")

    def scalar(self, name: str, kind: str, help_text: str, value: float | None) -> None:
        if value is not None:
            self.family(name, kind, help_text)
            self.sample(name, value)

    def histogram(self, name: str, help_text: str,
                  series: Sequence[tuple[Mapping[str, Any], Sequence[tuple[float, int]], float]]) -> None:
        """One histogram family; ``series``: (labels, cumulative ``(le, count)`` ending at +Inf, sum)."""
        self.family(name, "histogram", help_text)
        for labels, buckets, total in series:
            for le, count in buckets:
                self.sample(f"{name}_bucket", count, {**labels, "le": _number(float(le))})
            self.sample(f"{name}_sum", total, labels)
            self.sample(f"{name}_count", buckets[-1][1], labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = (*buckets, math.inf)
        self.counts = [0] * len(self.buckets)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[float, int]]:
        return list(zip(self.buckets, itertools.accumulate(self.counts), strict=True))


class _HttpStats:
    """The server's own counters (thread-safe): requests per endpoint and status, latency per endpoint, in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.images: dict[str, int] = {}
        self.in_flight = 0

    def begin(self) -> None:
        with self._lock:
            self.in_flight += 1

    def end(self, endpoint: str, method: str, status: int, seconds: float, images: int) -> None:
        with self._lock:
            key = (endpoint, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)
            if images:
                self.images[endpoint] = self.images.get(endpoint, 0) + images
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until no request is being answered; False if some still are after ``timeout`` seconds."""
        with self._lock:
            return self._idle.wait_for(lambda: not self.in_flight, timeout)

    def write(self, out: _Exposition) -> None:
        with self._lock:
            requests = sorted(self.requests.items())
            latency = [({"endpoint": e}, h.cumulative(), h.total) for e, h in sorted(self.latency.items())]
            images = sorted(self.images.items())
            in_flight = self.in_flight
        out.family("attrimeter_http_requests_total", "counter", "HTTP requests answered, by endpoint, method and code.")
        for (endpoint, method, status), n in requests:
            out.sample("attrimeter_http_requests_total", n, {"endpoint": endpoint, "method": method, "code": status})
        out.family("attrimeter_http_images_total", "counter", "Images received in accepted HTTP requests, by endpoint.")
        for endpoint, n in images:
            out.sample("attrimeter_http_images_total", n, {"endpoint": endpoint})
        out.histogram("attrimeter_http_request_duration_seconds", "Time to answer an HTTP request, by endpoint.",
                      latency)
        out.scalar("attrimeter_http_requests_in_flight", "gauge", "HTTP requests being answered now.", in_flight)


def _runtime_metrics(out: _Exposition, stats: Mapping[str, Any]) -> None:
    """Writes ``Runtime.stats()`` as Prometheus families (missing entries are skipped)."""
    if "backend" in stats:
        out.family("attrimeter_runtime_info", "gauge", "The serving backend and device (value 1).")
        out.sample("attrimeter_runtime_info", 1, {"backend": stats["backend"], "device": stats.get("device", "")})
    out.scalar("attrimeter_gallery_entries", "gauge", "Entries in the loaded gallery.", stats.get("gallery_size"))
    out.scalar("attrimeter_runtime_queue_depth", "gauge", "Requests waiting for the inference thread.",
               stats.get("queue_depth"))
    for key, help_text in (("requests", "Requests run by the inference thread."),
                           ("images", "Images run through the model."),
                           ("batches", "Engine calls (batches)."),
                           ("failed_batches", "Engine calls that raised."),
                           ("rejected", "Requests refused because the queue was full."),
                           ("busy_seconds", "Seconds the engine was busy.")):
        out.scalar(f"attrimeter_runtime_{key}_total", "counter", help_text, stats.get(key))
    sizes = stats.get("batch_sizes")
    if sizes is not None:
        h = _Histogram(BATCH_BUCKETS)
        for size, n in sizes.items():
            h.counts[bisect.bisect_left(h.buckets, int(size))] += int(n)
            h.total += int(size) * int(n)
        out.histogram("attrimeter_runtime_batch_size", "Images per engine call.", [({}, h.cumulative(), h.total)])
    latency = stats.get("latency")
    if latency:
        out.histogram("attrimeter_runtime_latency_seconds", "Runtime call latency, by operation.",
                      [({"op": op}, [(math.inf if le == "+Inf" else le, n) for le, n in h["buckets"]], h["sum"])
                       for op, h in sorted(latency.items())])
    errors = stats.get("errors")
    if errors is not None:
        out.family("attrimeter_runtime_errors_total", "counter", "Runtime calls that raised, by operation.")
        for op, n in sorted(errors.items()):
            out.sample("attrimeter_runtime_errors_total", n, {"op": op})


# ------------------------------------------------------------------------------------------------------- server


class RuntimeServer(ThreadingHTTPServer):
    """A threading HTTP server that answers with one :class:`Runtime` (see the module docstring for the endpoints).

    Args:
        address: ``(host, port)``; port 0 picks a free port (read it back from ``server_address``).
        runtime: The runtime every request uses (thread-safe). The server does not close it.
        max_body_bytes: Largest request body accepted (``Content-Length``); larger ones are refused unread (413).
        max_images: Most images in one request (413 above).
        max_k: Largest ``k`` for search and most ids for explain (400 above): bounds the memory one request takes.
        request_timeout_s: Socket timeout and the deadline for receiving one request body (408 after it).
    """

    daemon_threads = True  # idle keep-alive connections must not keep the process alive; close() drains requests

    def __init__(self, address: tuple[str, int], runtime: Runtime, *, max_body_bytes: int = 16 * MiB,
                 max_images: int = 64, max_k: int = 1000, request_timeout_s: float = 30.0) -> None:
        for name, value in (("max_body_bytes", max_body_bytes), ("max_images", max_images), ("max_k", max_k)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be positive, got {request_timeout_s!r}")
        self.runtime = runtime
        self.max_body_bytes = max_body_bytes
        self.max_images = max_images
        self.max_k = max_k
        self.request_timeout_s = float(request_timeout_s)
        self.http_stats = _HttpStats()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        """``http://host:port`` of the listening socket."""
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def track(self, connection: socket.socket, alive: bool) -> None:
        """Registers (or forgets) an open client connection, so that :meth:`close` can end idle keep-alives."""
        with self._connections_lock:
            (self._connections.add if alive else self._connections.discard)(connection)

    def close(self, drain_s: float | None = None) -> None:
        """Waits for requests being answered (up to ``drain_s``), ends idle keep-alive connections, closes the socket.

        Call after ``serve_forever`` has returned (:meth:`shutdown`); the runtime is left open.
        """
        if not self.http_stats.drain(self.request_timeout_s if drain_s is None else drain_s):
            log.warning("closing with requests still being answered")
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:  # wake handler threads blocked reading the next keep-alive request
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()


def make_server(runtime: Runtime, host: str = "127.0.0.1", port: int = 8080, *, max_body_bytes: int = 16 * MiB,
                max_images: int = 64, request_timeout_s: float = 30.0, max_k: int = 1000) -> RuntimeServer:
    """Binds an HTTP server for ``runtime`` (not started: call ``serve_forever``, or use :func:`serve`).

    Args:
        runtime: The runtime to serve (thread-safe; not closed by the server).
        host: Interface to listen on (``127.0.0.1`` keeps it local; ``0.0.0.0`` exposes it).
        port: TCP port; 0 picks a free one.
        max_body_bytes: Largest request body accepted; larger ones get 413 without being read.
        max_images: Most images in one request.
        request_timeout_s: Socket timeout and deadline for receiving a request body.
        max_k: Largest search ``k`` and most explain ids in one request.

    Returns:
        The bound :class:`RuntimeServer` (a ``ThreadingHTTPServer``).
    """
    return RuntimeServer((host, port), runtime, max_body_bytes=max_body_bytes, max_images=max_images,
                         max_k=max_k, request_timeout_s=request_timeout_s)


def serve(runtime: Runtime, host: str = "127.0.0.1", port: int = 8080, **kwargs: Any) -> None:
    """Serves ``runtime`` over HTTP until SIGINT/SIGTERM, then drains requests and closes the runtime.

    Args:
        runtime: The runtime to serve; closed when serving ends.
        host: Interface to listen on.
        port: TCP port; 0 picks a free one.
        **kwargs: Limits passed to :func:`make_server`.
    """
    try:
        server = make_server(runtime, host, port, **kwargs)
    except BaseException:
        runtime.close()
        raise
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        if not stopping.is_set():  # shutdown() waits for serve_forever, so it must run off this (the main) thread
            stopping.set()
            log.info("received %s, shutting down", signal.Signals(signum).name)
            threading.Thread(target=server.shutdown, name="attrimeter-server-shutdown", daemon=True).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    gallery = "no gallery" if runtime.gallery is None else f"gallery of {len(runtime.gallery)}"
    log.info("serving at %s (%s on %s, %s, model %s)", server.url, runtime.backend.name, runtime.backend.device,
             gallery, str(runtime.manifest.get("source", {}).get("sha256", "?"))[:12])
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            server.close()
        finally:
            runtime.close()
        log.info("server stopped")


# ------------------------------------------------------------------------------------------------------ handler


class _Handler(BaseHTTPRequestHandler):
    server: RuntimeServer
    protocol_version = "HTTP/1.1"  # keep-alive: clients streaming many requests reuse one connection
    server_version = "attrimeter"
    error_content_type = _JSON

    ROUTES = {"/health": "GET", "/metrics": "GET", "/embed": "POST", "/search": "POST", "/explain": "POST",
              "/gallery/add": "POST"}

    def setup(self) -> None:
        self.timeout = self.server.request_timeout_s  # StreamRequestHandler applies it to the socket
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """JSON instead of the base class's HTML for errors it raises itself (bad request line, 501, 414...)."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: still answer with a status line
            self.request_version = "HTTP/1.0"
        self._send_quietly(code, {"error": message or self.responses.get(code, ("error",))[0], "status": code},
                           {"Connection": "close"})

    # every method goes through one dispatcher, so a known path with the wrong method is 405, not the base 501
    def do_GET(self) -> None:  # noqa: D102
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: D102
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: D102
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: D102
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: D102
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:  # noqa: D102
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:  # noqa: D102
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        start = time.perf_counter()
        try:
            path = urlsplit(self.path).path
        except ValueError:  # e.g. "http://[x/health": answered below as an unknown endpoint
            path = self.path
        endpoint = path if path in self.ROUTES else "other"  # unknown paths share a label: bounded cardinality
        stats = self.server.http_stats
        stats.begin()
        status, images = 500, 0
        self._body_pending = "Transfer-Encoding" in self.headers or self.headers.get("Content-Length", "0") != "0"
        try:
            if endpoint == "other":
                raise HttpError(404, f"no such endpoint: {path}; endpoints: {', '.join(self.ROUTES)}")
            allowed = self.ROUTES[path]
            if method != allowed:
                raise HttpError(405, f"{path} takes {allowed}, not {method}", headers={"Allow": allowed})
            if method == "GET":
                status, body, content_type = 200, *self._get(path)
            else:
                request = self._read_json()
                status, body, content_type = 200, self._post(path, request), _JSON
                images = len(request["images"]) if isinstance(request.get("images"), list) else 1
            self._send(status, body, content_type=content_type)
        except HttpError as e:
            status = e.status
            self._send_quietly(e.status, {"error": e.message, "status": e.status}, e.headers)
        except (ConnectionError, TimeoutError):  # the client went away mid-answer: nothing to send it
            status = 499
            self.close_connection = True
        except Exception:
            status = 500
            log.exception("error answering %s %s", method, path)
            self.close_connection = True
            self._send_quietly(500, {"error": "internal server error (logged on the server)", "status": 500},
                               {"Connection": "close"})
        finally:
            stats.end(endpoint, method, status, time.perf_counter() - start, images)

    # -------------------------------------------------------------------------------------------- request body

    def _read_json(self) -> dict[str, Any]:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise HttpError(411, "chunked bodies are not accepted: send Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise HttpError(411, "a request body with Content-Length is required")
        try:
            length = int(length_text)
        except ValueError:
            raise HttpError(400, f"Content-Length is not an integer: {length_text!r}") from None
        if length < 0:
            raise HttpError(400, f"Content-Length is negative: {length}")
        if length > self.server.max_body_bytes:
            # Read and drop a moderately oversized body so that the client, still sending, can read the 413 (a
            # hang-up mid-upload shows up as a broken pipe); far larger ones are cut off.
            if length <= _DISCARD_FACTOR * self.server.max_body_bytes:
                self._discard(length)
            raise HttpError(413, f"request body of {length} bytes exceeds the limit of {self.server.max_body_bytes}")
        data = self._read_body(length)
        self._body_pending = False
        try:
            body = json.loads(data, parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise HttpError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise HttpError(400, f"request body must be a JSON object, got {_json_type(body)}")
        return body

    def _discard(self, length: int) -> None:
        deadline = time.monotonic() + self.server.request_timeout_s
        left = length
        try:
            while left and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, _READ_CHUNK))
                if not chunk:
                    return
                left -= len(chunk)
        except (OSError, TimeoutError):
            return
        self._body_pending = left > 0

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it (``Expect: 100-continue``, e.g. curl's large uploads)."""
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.server.max_body_bytes:
            self.close_connection = True
            self._send_quietly(413, {"error": f"request body of {length} bytes exceeds the limit of "
                                              f"{self.server.max_body_bytes}", "status": 413}, {"Connection": "close"})
            return False
        return super().handle_expect_100()

    def _read_body(self, length: int) -> bytes:
        deadline = time.monotonic() + self.server.request_timeout_s
        parts, left = [], length
        while left:
            if time.monotonic() > deadline:  # a client trickling bytes must not hold a thread forever
                raise HttpError(408, f"request body not received within {self.server.request_timeout_s:g} s")
            try:
                chunk = self.rfile.read1(min(left, _READ_CHUNK))
            except TimeoutError:
                raise HttpError(408, f"request body not received within {self.server.request_timeout_s:g} s") from None
            if not chunk:
                raise HttpError(400, f"request body ended after {length - left} of {length} bytes")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    # ---------------------------------------------------------------------------------------------- endpoints

    def _get(self, path: str) -> tuple[Any, str]:
        runtime = self.server.runtime
        if path == "/health":
            gallery = runtime.gallery
            problem = runtime.stats().get("gallery_refresh_error")
            return {"status": "degraded" if problem else "ok", **({"problem": problem} if problem else {}),
                    "backend": runtime.backend.name, "device": runtime.backend.device,
                    "gallery": None if gallery is None else len(gallery),
                    "model": str(runtime.manifest.get("source", {}).get("sha256", ""))[:12]}, _JSON
        out = _Exposition()
        _runtime_metrics(out, runtime.stats())
        self.server.http_stats.write(out)
        return out.text(), _PROMETHEUS

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        server, runtime = self.server, self.server.runtime
        if path != "/embed" and runtime.gallery is None:
            raise HttpError(409, f"{path} needs a gallery and the server has none loaded (serve with --gallery)")
        try:
            if path == "/embed":
                embeddings = runtime.embed(_images(body, server.max_images))
                return {"embeddings": embeddings.to_dict(runtime.attributes, runtime.meanings)}
            if path == "/search":
                images = _images(body, server.max_images)
                k = _field(body, "k", int, "a positive integer", default=10)
                if not 1 <= k <= server.max_k:
                    raise HttpError(400, f"field 'k' must be in [1, {server.max_k}], got {k}")
                results = runtime.search(images, k=k, weights=_weights(body), overlays=_overlays(body))
                return {"results": [_query_result(r) for r in results]}
            if path == "/explain":
                image = _decode_image(_field(body, "image", str, "a base64-encoded JPEG/PNG image"), "image")
                ids = _field(body, "ids", list, "an array of gallery ids")
                if not ids:
                    raise HttpError(400, "field 'ids' is empty")
                if len(ids) > server.max_k:
                    raise HttpError(400, f"too many ids: {len(ids)} > {server.max_k}")
                for i, v in enumerate(ids):
                    if not _is_int(v):
                        raise HttpError(400, f"ids[{i}] must be an integer, got {_json_type(v)}")
                return _query_result(runtime.explain(image, ids, overlays=_overlays(body)))
            images = _images(body, server.max_images)
            keys = _optional_list(body, "keys", len(images), lambda v: isinstance(v, str), "a string")
            cameras = _optional_list(body, "cameras", len(images), lambda v: v is None or _is_int(v),
                                     "an integer or null")
            ids = runtime.add(images, keys=keys, cameras=cameras)
            return {"ids": [int(i) for i in ids], "gallery": len(runtime.gallery)}
        except (InputError, ImageError) as e:
            raise HttpError(400, str(e)) from None
        except UnknownIdError as e:
            raise HttpError(404, str(e)) from None
        except StorageError as e:
            log.error("gallery write failed: %s", e)
            raise HttpError(507, str(e)) from None
        except GalleryError as e:
            raise HttpError(409, str(e)) from None
        except OverloadedError as e:
            raise HttpError(503, str(e) or "server overloaded, retry later", headers={"Retry-After": "1"}) from None

    # ---------------------------------------------------------------------------------------------- response

    def _send_quietly(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        """Sends an error answer; a client that already hung up is not an error of the server's."""
        try:
            self._send(status, body, headers)
        except OSError:
            self.close_connection = True

    def _send(self, status: int, body: Any, headers: Mapping[str, str] | None = None, *,
              content_type: str = _JSON) -> None:
        if isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body, separators=(",", ":"), allow_nan=False, default=_json_default).encode()
        headers = dict(headers or {})
        if getattr(self, "_body_pending", False):  # an unread body would be parsed as the next request: hang up
            self.close_connection = True
            headers["Connection"] = "close"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
