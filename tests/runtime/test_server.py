"""HTTP server end-to-end on loopback (uvicorn + the FastAPI app): answers equal the Runtime's, metrics parse, bad
input is 4xx and harmless, graceful stop on a signal."""

import base64
import http.client
import io
import json
import logging
import math
import os
import re
import signal
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from http_helpers import b64, call, health_ok, raw_exchange
from PIL import Image

from attrimeter.runtime.errors import OverloadedError
from attrimeter.runtime.runtime import Runtime, RuntimeConfig
from attrimeter.runtime.server import RuntimeServer, ServerLimits, serve

MAX_IMAGES = 6
MAX_BODY = 256 * 1024


# --------------------------------------------------------------------------------------------------------- helpers


def assert_close(a, b, path="$"):
    """Same JSON structure; floats equal to 1e-4 (batching may change the last bits of a float32 result)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, str):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4), (path, a, b)
    else:
        assert a == b, (path, a, b)


def gallery_files(runtime):
    return {p.relative_to(runtime.gallery.path): p.read_bytes()
            for p in sorted(runtime.gallery.path.rglob("*")) if p.is_file()}


def png_header(width, height):
    """A valid PNG signature + IHDR claiming width x height, with one tiny IDAT: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def random_png(rng, size=(64, 32)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tiny_data):
    rng = np.random.default_rng()
    gallery = sorted((tiny_data / "bounding_box_test").glob("*.jpg"))
    queries = sorted((tiny_data / "query").glob("*.jpg"))
    train = sorted((tiny_data / "bounding_box_train").glob("*.jpg"))
    pick = rng.choice(len(gallery), size=12, replace=False)
    return {"gallery": [gallery[i] for i in sorted(pick)], "queries": queries, "train": train}


@pytest.fixture(scope="module")
def runtime(tiny_export, files, tmp_path_factory):
    rt = Runtime(tiny_export, tmp_path_factory.mktemp("served") / "gallery",
                 RuntimeConfig(create_gallery=True, max_wait_ms=1.0, threads=1))
    rt.add(files["gallery"], keys=[p.name for p in files["gallery"]], cameras=[int(p.name.split("_")[1][1])
                                                                              for p in files["gallery"]])
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def server(runtime):
    limits = ServerLimits(max_body_bytes=MAX_BODY, max_images=MAX_IMAGES, request_timeout_s=10.0)
    with RuntimeServer(runtime, port=0, limits=limits) as srv:
        yield srv


@pytest.fixture(scope="module")
def bare(tiny_export):
    """A server whose runtime has no gallery."""
    rt = Runtime(tiny_export, config=RuntimeConfig(threads=1))
    with RuntimeServer(rt, port=0) as srv:
        yield srv
    rt.close()


# ---------------------------------------------------------------------------------------------------------- health


def test_health(server, runtime):
    body = health_ok(server)
    assert body["backend"] == runtime.backend.name == "onnxruntime"
    assert body["device"] == runtime.backend.device
    assert body["gallery"] == len(runtime.gallery) >= 12
    assert body["model"] and runtime.manifest.source.sha256.startswith(body["model"])


# --------------------------------------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(?:\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*)?\})?'
    r' (?P<value>[+-]?(?:Inf|NaN|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?))$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """Checks the text exposition format 0.0.4 line by line; returns {(name, labels): value} and the families."""
    assert text.endswith("\n")
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert re.match(r"^# HELP [a-zA-Z_:][a-zA-Z0-9_:]* \S", line), line
        elif line.startswith("# TYPE "):
            m = re.match(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$", line)
            assert m, line
            assert m.group(1) not in types, f"family {m.group(1)} declared twice"
            types[m.group(1)] = m.group(2)
        else:
            m = _SAMPLE.match(line)
            assert m, f"not an exposition sample line: {line!r}"
            name, labels = m.group("name"), tuple(sorted(_LABEL.findall(m.group("labels") or "")))
            family = next((f for f in (name, re.sub(r"_(bucket|sum|count)$", "", name)) if f in types), None)
            assert family is not None, f"sample {name} has no # TYPE before it"
            if types[family] == "counter":
                assert name.endswith("_total"), name
            assert (name, labels) not in samples, f"duplicate sample {line}"
            samples[name, labels] = float(m.group("value").replace("Inf", "inf"))
    for family, kind in types.items():
        if kind != "histogram":
            continue
        series = {}
        for (name, labels), v in samples.items():
            if name == f"{family}_bucket":
                rest = tuple(kv for kv in labels if kv[0] != "le")
                series.setdefault(rest, []).append((float(dict(labels)["le"].replace("Inf", "inf")), v))
        for rest, buckets in series.items():
            buckets.sort()
            counts = [c for _, c in buckets]
            assert buckets[-1][0] == math.inf and counts == sorted(counts), (family, rest)
            assert samples[f"{family}_count", rest] == counts[-1]
            assert (f"{family}_sum", rest) in samples
    return samples, types


def test_metrics_parse_and_count(server, runtime, files):
    status, resp, text = call(server, "GET", "/metrics")
    assert status == 200 and resp.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    before, types = parse_metrics(text)
    assert types["attrimeter_http_request_duration_seconds"] == "histogram"
    assert types["attrimeter_runtime_latency_seconds"] == "histogram"
    assert types["attrimeter_gallery_entries"] == types["attrimeter_runtime_queue_depth"] == "gauge"
    assert types["attrimeter_runtime_images_total"] == "counter"

    assert types["attrimeter_runtime_errors_total"] == "counter"

    n = int(np.random.default_rng().integers(1, 4))
    status, _, _ = call(server, "POST", "/embed", {"images": [b64(p.read_bytes()) for p in files["queries"][:n]]})
    assert status == 200
    assert call(server, "POST", "/embed", {"images": 3})[0] == 400  # refused before any runtime call
    zero = dict.fromkeys(runtime.attributes, 0.0)  # the runtime refuses it: a search error
    query = b64(files["queries"][0].read_bytes())
    assert call(server, "POST", "/search", {"images": [query], "weights": zero})[0] == 400
    after, _ = parse_metrics(call(server, "GET", "/metrics")[2])

    def get(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    for op, errors in (("embed", 0), ("search", 1)):  # the server times each runtime call and counts its errors
        assert (get(after, "attrimeter_runtime_latency_seconds_count", op=op)
                == get(before, "attrimeter_runtime_latency_seconds_count", op=op) + 1), op
        assert (get(after, "attrimeter_runtime_errors_total", op=op)
                == get(before, "attrimeter_runtime_errors_total", op=op) + errors), op

    ok = {"endpoint": "/embed", "method": "POST", "code": "200"}
    bad = {**ok, "code": "400"}
    for labels in (ok, bad):
        name = "attrimeter_http_requests_total"
        assert get(after, name, **labels) == get(before, name, **labels) + 1, labels
    assert get(after, "attrimeter_runtime_images_total") >= get(before, "attrimeter_runtime_images_total") + n
    assert (get(after, "attrimeter_http_request_duration_seconds_count", endpoint="/embed")
            == get(before, "attrimeter_http_request_duration_seconds_count", endpoint="/embed") + 2)
    assert get(after, "attrimeter_runtime_latency_seconds_count", op="embed") >= 1
    assert get(after, "attrimeter_gallery_entries") >= 12


# ------------------------------------------------------------------------------------------------ embed/search/...


def test_embed_equals_runtime(server, runtime, files, rng):
    paths = [files["queries"][i] for i in rng.choice(len(files["queries"]), size=3, replace=False)]
    data = [p.read_bytes() for p in paths]
    status, _, body = call(server, "POST", "/embed", {"images": [b64(d) for d in data]})
    assert status == 200 and len(body["embeddings"]) == 3
    ref = runtime.embed(data)
    assert_close(body["embeddings"], ref.to_dict(runtime.attributes, runtime.meanings))
    for i, e in enumerate(body["embeddings"]):
        np.testing.assert_allclose(e["embedding"], ref.embedding[i], rtol=1e-4, atol=1e-5)
        assert np.asarray(e["attr_embeddings"]).shape == ref.attr_embeddings[i].shape
        assert set(e["attributes"]) == set(runtime.attributes)


def test_search_equals_runtime(server, runtime, files, rng):
    paths = [files["queries"][i] for i in rng.choice(len(files["queries"]), size=2, replace=False)]
    data = [p.read_bytes() for p in paths]
    k = int(rng.integers(3, 8))
    status, _, body = call(server, "POST", "/search", {"images": [b64(d) for d in data], "k": k})
    assert status == 200 and len(body["results"]) == 2
    ref = runtime.search(data, k=k)
    assert_close(body["results"], [r.to_dict() for r in ref])
    assert [m["id"] for m in body["results"][0]["matches"]] == [m.id for m in ref[0].matches]

    # weighted, as a mapping and as a list
    off = [str(a) for a in rng.choice(runtime.attributes, size=3, replace=False)]
    weights = {a: 0.0 for a in off}
    status, _, body = call(server, "POST", "/search", {"images": [b64(data[0])], "k": k, "weights": weights})
    assert status == 200
    assert_close(body["results"], [r.to_dict() for r in runtime.search(data[0], k=k, weights=weights)])
    as_list = [0.0 if a in off else 1.0 for a in runtime.attributes]
    status, _, listed = call(server, "POST", "/search", {"images": [b64(data[0])], "k": k, "weights": as_list})
    assert status == 200
    assert_close(listed, body)


def test_explain_and_overlays(server, runtime, files, rng):
    data = files["queries"][int(rng.integers(len(files["queries"])))].read_bytes()
    ids = [int(i) for i in rng.choice(len(runtime.gallery), size=3, replace=False)]
    status, _, body = call(server, "POST", "/explain", {"image": b64(data), "ids": ids})
    assert status == 200
    assert [m["id"] for m in body["matches"]] == ids
    assert_close(body, runtime.explain(data, ids).to_dict())

    status, _, body = call(server, "POST", "/search", {"images": [b64(data)], "k": 2, "overlays": 2})
    assert status == 200
    h, w = runtime.image_size
    for match in body["results"][0]["matches"]:
        assert len(match["overlays"]) == 2
        for o in match["overlays"]:
            assert o["attribute"] in runtime.attributes
            for side in ("query", "gallery"):  # the gallery was indexed from files: both pictures exist
                with Image.open(io.BytesIO(base64.b64decode(o[side]))) as im:
                    assert im.format == "PNG" and im.size == (w, h)


def test_add_then_search_finds_it(server, runtime, files, rng):
    base = np.asarray(Image.open(files["train"][int(rng.integers(len(files["train"])))]).convert("RGB"))
    noisy = np.clip(base.astype(np.int16) + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="PNG")  # lossless: the server sees exactly these pixels
    data, key, camera = buf.getvalue(), f"added-{rng.integers(1 << 30)}", int(rng.integers(1, 9))
    n = len(runtime.gallery)
    status, _, body = call(server, "POST", "/gallery/add", {"images": [b64(data)], "keys": [key], "cameras": [camera]})
    assert status == 200, body
    assert body["ids"] == [n] and body["gallery"] == n + 1 == health_ok(server)["gallery"]
    status, _, body = call(server, "POST", "/search", {"images": [b64(data)], "k": 3})
    assert status == 200
    top = body["results"][0]["matches"][0]
    assert (top["id"], top["key"], top["camera"], top["rank"]) == (n, key, camera, 1)
    assert top["d"] < 1e-3


def test_concurrent_requests_get_their_own_answers(server, runtime, files, rng):
    paths = [files["queries"][i] for i in rng.choice(len(files["queries"]), size=8, replace=False)]
    data = [p.read_bytes() for p in paths]
    ref = runtime.embed(data).embedding
    top = [r.matches[0].id for r in runtime.search(data, k=1)]
    spread = min(np.linalg.norm(ref[i] - ref[j]) for i in range(8) for j in range(i))
    assert spread > 1e-3  # mixed-up answers would be caught

    def one(job):
        i, kind = job
        if kind == "embed":
            status, _, body = call(server, "POST", "/embed", {"images": [b64(data[i])]})
            assert status == 200
            return i, kind, np.asarray(body["embeddings"][0]["embedding"])
        status, _, body = call(server, "POST", "/search", {"images": [b64(data[i])], "k": 1})
        assert status == 200
        return i, kind, body["results"][0]["matches"][0]["id"]

    jobs = [(int(i), str(kind)) for i, kind in zip(rng.integers(0, 8, 48), rng.choice(["embed", "search"], 48),
                                                   strict=True)]
    with ThreadPoolExecutor(6) as pool:
        for i, kind, answer in pool.map(one, jobs):
            if kind == "embed":
                np.testing.assert_allclose(answer, ref[i], rtol=1e-4, atol=1e-5)
            else:
                assert answer == top[i]


# ------------------------------------------------------------------------------------------------------- bad input


def _bad_cases(files, rng, attributes):
    ok = b64(files["queries"][0].read_bytes())
    attribute = str(rng.choice(attributes))
    jpeg = files["queries"][1].read_bytes()
    return [
        # name, path, body (dict, or raw bytes), status, message fragment
        ("invalid json", "/embed", b'{"images": [', 400, "not valid JSON"),
        ("not utf-8", "/embed", b'\xff\xfe{"images": 1}', 400, "not valid JSON"),
        ("array body", "/search", b"[1, 2]", 400, "must be a JSON object"),
        ("missing images", "/search", {"k": 3}, 400, "missing field 'images'"),
        ("images not array", "/embed", {"images": ok}, 400, "'images' must be an array"),
        ("no images", "/embed", {"images": []}, 400, "'images' is empty"),
        ("image not string", "/search", {"images": [ok, 7]}, 400, "images[1] must be a base64 string"),
        ("bad base64", "/gallery/add", {"images": [ok, "not*base64!"]}, 400, "images[1] is not valid base64"),
        ("corrupt image", "/search", {"images": [b64(rng.bytes(300))]}, 400, "images[0]"),
        ("truncated jpeg", "/gallery/add", {"images": [ok, b64(jpeg[: len(jpeg) // 2])]}, 400, "images[1]"),
        ("huge image", "/embed", {"images": [b64(png_header(30000, 30000))]}, 400, "pixels"),
        ("NaN weight", "/search", b'{"images": ["%s"], "weights": {"%s": NaN}}' % (ok.encode(), attribute.encode()),
         400, "NaN"),
        ("inf weight", "/search", b'{"images": ["%s"], "weights": {"%s": 1e999}}' % (ok.encode(), attribute.encode()),
         400, "finite"),
        ("negative weight", "/search", {"images": [ok], "weights": {attribute: -1}}, 400, "weights"),
        ("zero weights", "/search", {"images": [ok], "weights": dict.fromkeys(attributes, 0)}, 400, "all zero"),
        ("unknown attribute", "/search", {"images": [ok], "weights": {"nosuchattr": 0}}, 400, "nosuchattr"),
        ("weight not number", "/search", {"images": [ok], "weights": {attribute: "0"}}, 400, "weights must be"),
        ("weights short", "/search", {"images": [ok], "weights": [1.0, 0.0]}, 400, "one value per attribute"),
        ("k zero", "/search", {"images": [ok], "k": 0}, 400, "'k'"),
        ("k string", "/search", {"images": [ok], "k": "5"}, 400, "'k' must be"),
        ("k bool", "/search", {"images": [ok], "k": True}, 400, "'k' must be"),
        ("k huge", "/search", {"images": [ok], "k": 10**9}, 400, "'k'"),
        ("overlays negative", "/search", {"images": [ok], "overlays": -1}, 400, "overlays"),
        ("too many images", "/search", {"images": [ok] * (MAX_IMAGES + 1)}, 413, "too many images"),
        ("explain no image", "/explain", {"ids": [0]}, 400, "missing field 'image'"),
        ("explain bad ids", "/explain", {"image": ok, "ids": [0, "1"]}, 400, "ids[1]"),
        ("explain no ids", "/explain", {"image": ok, "ids": []}, 400, "'ids' is empty"),
        ("explain unknown id", "/explain", {"image": ok, "ids": [0, 10**6]}, 404, "1000000"),
        ("explain negative id", "/explain", {"image": ok, "ids": [-1]}, 404, "-1"),
        ("add keys length", "/gallery/add", {"images": [ok, ok], "keys": ["a"]}, 400, "'keys' has 1 entries"),
        ("add key type", "/gallery/add", {"images": [ok], "keys": [3]}, 400, "keys[0] must be a string"),
        ("add camera type", "/gallery/add", {"images": [ok], "cameras": ["c1"]}, 400, "cameras[0]"),
        ("add camera bool", "/gallery/add", {"images": [ok], "cameras": [True]}, 400, "cameras[0]"),
        ("unknown path", "/nothing/here", {"images": [ok]}, 404, "no such endpoint"),
        ("wrong method", "/health", {}, 405, "takes GET"),
    ]


def test_bad_input_is_4xx_and_harmless(server, runtime, files, rng):
    before = gallery_files(runtime)
    n = len(runtime.gallery)
    for name, path, body, status, fragment in _bad_cases(files, rng, runtime.attributes):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, _, answer = call(server, "POST", path, raw=raw)
        assert got == status, (name, got, answer)
        assert answer["status"] == status and fragment in answer["error"], (name, answer)
        health_ok(server)
    assert len(runtime.gallery) == n
    assert gallery_files(runtime) == before


def test_wrong_methods_and_paths(server):
    status, resp, body = call(server, "GET", "/search")
    assert (status, resp.getheader("Allow"), body["status"]) == (405, "POST", 405)
    assert call(server, "DELETE", "/gallery/add")[0] == 405
    assert call(server, "PUT", "/metrics", raw=b"x")[0] == 405
    status, _, body = call(server, "GET", "/nothing")
    assert status == 404 and "/search" in body["error"]  # the answer lists the endpoints
    status, resp, _ = call(server, "GET", "/")
    assert status == 307 and resp.getheader("Location") == "/viewer/"
    assert call(server, "GET", "/health?verbose=1")[0] == 200
    health_ok(server)


def test_body_limits(server, runtime, files):
    before = gallery_files(runtime)
    # over the limit: refused from Content-Length alone, the body is never sent
    status, _, body = raw_exchange(server, b"POST /gallery/add HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                                    % (MAX_BODY + 1))
    assert status == 413 and str(MAX_BODY) in body["error"]
    status, _, body = raw_exchange(server, b"POST /search HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 411 and "Content-Length" in body["error"]
    # chunked bodies are read (and limited) as they stream in
    status, _, body = raw_exchange(server, b"POST /search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"5\r\nhello\r\n0\r\n\r\n")
    assert status == 400 and "not valid JSON" in body["error"]
    big = b"x" * (MAX_BODY // 2 + 1)
    status, _, body = raw_exchange(server, b"POST /embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    + b"".join(b"%x\r\n%s\r\n" % (len(big), big) for _ in range(3)) + b"0\r\n\r\n")
    assert status == 413 and "exceeds the limit" in body["error"]
    ok = json.dumps({"images": [b64(files["queries"][0].read_bytes())]}).encode()
    status, _, body = raw_exchange(server, b"POST /embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(ok), ok))
    assert status == 200 and len(body["embeddings"]) == 1
    status, _, body = raw_exchange(server, b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert status == 400 and "Content-Length" in body["error"]
    status, _, body = raw_exchange(server, b"GET /health HTTP/x.y\r\n\r\n")
    assert status == 400 and body["status"] == 400
    status, _, body = raw_exchange(server, b"BREW /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and body["status"] == 405
    # a client that hangs up mid-body gets no answer (there is no one to read it), and nothing breaks
    with socket.create_connection(server.server_address, timeout=30) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"images\": ")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1024) == b""
    health_ok(server)
    assert gallery_files(runtime) == before


def test_slow_body_times_out(runtime):
    with RuntimeServer(runtime, port=0, limits=ServerLimits(request_timeout_s=0.5)) as srv:
        status, _, body = raw_exchange(srv, b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                                        b'{"images": ')  # and then nothing: the connection stays open
        assert status == 408 and "not received" in body["error"]
        health_ok(srv)


def test_keep_alive_connection_serves_many_requests(server, files):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        data = json.dumps({"images": [b64(files["queries"][0].read_bytes())]}).encode()
        for path, body, status in (("/embed", data, 200), ("/embed", b"{", 400), ("/health", None, 405),
                                   ("/embed", data, 200)):
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == status and not resp.will_close
            json.loads(resp.read())
    finally:
        conn.close()


def test_an_unread_body_is_never_read_as_a_request(server):
    # refused without reading its body, a request's body must be skipped by its length, never parsed as the next
    # request (a body that looks like a request would be smuggled past a proxy)
    inner = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(server.server_address, timeout=30) as sock:
        sock.sendall(b"POST /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(inner), inner)
                     + b"GET /attributes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = b""
        while chunk := sock.recv(65536):
            answers += chunk
    first, second = answers.split(b"HTTP/1.1 ")[1:]  # exactly two answers
    assert first.startswith(b"404") and second.startswith(b"200") and b'"attributes"' in second  # not /health's


def test_no_gallery_is_409(bare, files):
    ok = b64(files["queries"][0].read_bytes())
    assert health_ok(bare)["gallery"] is None
    assert call(bare, "POST", "/embed", {"images": [ok]})[0] == 200
    for path, body in (("/search", {"images": [ok]}), ("/explain", {"image": ok, "ids": [0]}),
                       ("/gallery/add", {"images": [ok]})):
        status, _, answer = call(bare, "POST", path, body)
        assert status == 409 and "gallery" in answer["error"], (path, answer)
    health_ok(bare)


def test_overload_is_503_disk_failure_507_and_crashes_500(server, runtime, files, monkeypatch, caplog):
    ok = b64(files["queries"][0].read_bytes())
    before = gallery_files(runtime)

    def overloaded(*args, **kwargs):
        raise OverloadedError("the request queue is full")

    monkeypatch.setattr(runtime, "embed", overloaded)
    status, resp, body = call(server, "POST", "/embed", {"images": [ok]})
    assert status == 503 and resp.getheader("Retry-After") and "queue is full" in body["error"]

    def disk_full(*args, **kwargs):  # where a real disk would fail: the gallery turns it into a StorageError
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with caplog.at_level(logging.ERROR, logger="attrimeter.runtime.app"):
        status, _, body = call(server, "POST", "/gallery/add", {"images": [ok]})
    assert status == 507 and "No space left" in body["error"] and body["status"] == 507
    monkeypatch.undo()

    secret = f"secret-{np.random.default_rng().integers(1 << 30)}"

    def crash(*args, **kwargs):
        raise RuntimeError(secret)

    monkeypatch.setattr(runtime, "add", crash)
    with caplog.at_level(logging.ERROR, logger="attrimeter.runtime.app"):
        status, _, body = call(server, "POST", "/gallery/add", {"images": [ok]})
    assert status == 500 and secret not in body["error"] and body["status"] == 500
    assert any(secret in (r.exc_text or "") for r in caplog.records)  # the traceback is logged, not sent
    monkeypatch.undo()
    health_ok(server)
    assert call(server, "POST", "/embed", {"images": [ok]})[0] == 200
    assert gallery_files(runtime) == before


def test_limits_are_checked():
    for kwargs in ({"max_body_bytes": 0}, {"max_images": -1}, {"request_timeout_s": 0}, {"max_connections": True},
                   {"decode_workers": 1.5}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ServerLimits(**kwargs)


def test_serve_stops_on_signal_and_closes_runtime(tiny_export, files, caplog):
    rt = Runtime(tiny_export, config=RuntimeConfig(threads=1))
    closed = threading.Event()
    close = rt.close
    rt.close = lambda: (closed.set(), close())
    result = {}
    previous = signal.getsignal(signal.SIGTERM)

    def client():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "url" not in result:
            for r in caplog.records:
                m = re.search(r"serving at http://([\d.]+):(\d+)", r.getMessage())
                if m:
                    result["url"] = m.groups()
            time.sleep(0.05)
        host, port = result["url"]
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/health")
        result["health"] = conn.getresponse().status
        conn.close()
        os.kill(os.getpid(), signal.SIGTERM)

    watchdog = threading.Timer(120, lambda: os.kill(os.getpid(), signal.SIGINT))  # never hang the suite
    watchdog.start()
    thread = threading.Thread(target=client, daemon=True)
    try:
        with caplog.at_level(logging.INFO, logger="attrimeter.runtime.server"):
            thread.start()
            serve(rt, port=0)  # blocks until the client's SIGTERM
    finally:
        watchdog.cancel()
    thread.join(10)
    assert result.get("health") == 200
    assert closed.is_set()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert any("stopped" in r.getMessage() for r in caplog.records)


def test_oversized_bodies_get_a_readable_413(tiny_export):
    with Runtime(tiny_export) as runtime, RuntimeServer(runtime, limits=ServerLimits(max_body_bytes=1 << 16),
                                                        port=0) as server:
        port = server.server_address[1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/embed", body=b"x" * (3 << 16), headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        assert answer.status == 413 and "exceeds the limit" in json.loads(answer.read())["error"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("POST", "/embed")
        conn.putheader("Content-Length", str(50 << 20))
        conn.putheader("Expect", "100-continue")
        conn.endheaders()  # no body: the server must answer before it is sent
        answer = conn.getresponse()
        assert answer.status == 413 and answer.will_close
