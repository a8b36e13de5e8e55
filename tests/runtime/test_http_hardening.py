"""The HTTP server under attack: framing (request smuggling), slow heads, bursts, connection floods, decode memory,
huge keys, ids of every wrong kind, and a gallery whose files are corrupt or malformed. Raw sockets where the bytes
matter."""

import hashlib
import json
import select
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from http_helpers import b64, call, health, health_ok, raw_exchange

import attrimeter.runtime.app as app_module
from attrimeter.cli import main
from attrimeter.runtime.errors import InputError
from attrimeter.runtime.runtime import MAX_KEY_CHARS, Runtime, RuntimeConfig
from attrimeter.runtime.server import RuntimeServer, ServerLimits


@pytest.fixture(scope="module")
def images(tiny_data):
    return sorted((tiny_data / "bounding_box_test").glob("*.jpg"))[:10]


@pytest.fixture(scope="module")
def runtime(tiny_export, images, tmp_path_factory):
    rt = Runtime(tiny_export, tmp_path_factory.mktemp("hardening") / "gallery",
                 RuntimeConfig(create_gallery=True, threads=1))
    rt.add(images[:6], keys=[p.name for p in images[:6]])
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def server(runtime):
    with RuntimeServer(runtime, port=0, limits=ServerLimits(request_timeout_s=1.0)) as srv:
        yield srv


def _head(extra: bytes, body: bytes = b"") -> bytes:
    return b"POST /embed HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n" + body


@pytest.mark.parametrize(("headers", "reason"), [
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", "conflicting Content-Length"),
    (b"Content-Length: 5, 6\r\n", "conflicting Content-Length"),
    (b"Content-Length: 1_0\r\n", "bad Content-Length"),
    (b"Content-Length:  +0002 \r\n", "bad Content-Length"),
    (b"Content-Length: -1\r\n", "bad Content-Length"),
    (b"Content-Length: 0x10\r\n", "bad Content-Length"),
    (b"Transfer-Encoding: gzip\r\n", "Transfer-Encoding"),
])
def test_ambiguous_framing_is_refused(server, headers, reason):
    status, resp, body = raw_exchange(server, _head(headers, b"{}"))
    assert status in (400, 431, 501) and body["status"] == status and reason in body["error"], body
    assert resp.will_close
    health_ok(server)


def test_an_endless_head_is_refused_early(server):
    with socket.create_connection(server.server_address, timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        while sent < 1 << 20 and not select.select([sock], [], [], 0.01)[0]:  # until the server answers
            sock.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
            sent += 1012
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert sent < 64 * 1024 and answer.startswith(b"HTTP/1.1 431") and b"malformed HTTP request" in answer
    health_ok(server)


def test_both_lengths_are_refused_and_equal_duplicates_read_as_one(server, images):
    status, resp, body = raw_exchange(server, _head(b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
                                                    b"0\r\n\r\n"))
    assert status == 400 and "both Content-Length and Transfer-Encoding" in body["error"] and resp.will_close
    # identical duplicates carry one unambiguous length (RFC 9112 6.3): the body is read as a body, never as a request
    payload = json.dumps({"images": [b64(images[0].read_bytes())]}).encode()
    smuggled = b"GET /attributes HTTP/1.1\r\nHost: x\r\n\r\n"
    status, _, body = raw_exchange(server, _head(b"Content-Length: %d\r\nContent-Length: %d\r\n" % (
        (len(payload),) * 2), payload + smuggled))
    assert status == 200 and len(body["embeddings"]) == 1


def test_slow_heads_are_cut_off(server):
    limit = server.limits.request_timeout_s
    with socket.create_connection(server.server_address, timeout=30) as sock:  # half a head, then nothing
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Len")
        t0 = time.monotonic()
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408") and b"request head not received" in answer
        assert sock.recv(1024) == b"" and limit * 0.8 < time.monotonic() - t0 < limit + 5
    with socket.create_connection(server.server_address, timeout=30) as sock:  # a byte at a time
        t0 = time.monotonic()
        try:
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n":
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
        except OSError:  # closed under us: that is the point
            pass
        assert time.monotonic() - t0 < limit + 5
    with socket.create_connection(server.server_address, timeout=30) as sock:  # connected, silent: closed quietly
        assert sock.recv(1024) == b""
    health_ok(server)


def test_a_burst_of_connections_is_queued_not_reset(server):
    port = server.server_address[1]
    ss = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=False)
    if ss.returncode == 0 and ss.stdout.strip():  # a listening socket's Send-Q is its backlog
        assert int(ss.stdout.split()[2]) == server.limits.backlog >= 1024
    barrier = threading.Barrier(48)

    def one(_):
        barrier.wait(30)
        return call(server, "GET", "/health")[0]

    with ThreadPoolExecutor(48) as pool:
        assert list(pool.map(one, range(48))) == [200] * 48


def test_over_the_connection_limit_is_a_json_503(runtime):
    with RuntimeServer(runtime, port=0, limits=ServerLimits(max_connections=2)) as srv:
        idle = [socket.create_connection(srv.server_address, timeout=30) for _ in range(2)]
        time.sleep(0.2)  # the server has taken them
        try:
            status, resp, body = call(srv, "GET", "/health")
            assert status == 503 and resp.getheader("Retry-After") and "limit of 2 connections" in body["error"]
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        health_ok(srv)


def test_decoding_is_bounded_over_all_requests(runtime, images, monkeypatch):
    workers = 2
    active, peak, lock = [0], [0], threading.Lock()
    real = app_module.load_image

    def counting(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.05)  # a large image takes a while: let the requests pile up
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(app_module, "load_image", counting)
    data = b64(images[1].read_bytes())
    with RuntimeServer(runtime, port=0, limits=ServerLimits(decode_workers=workers)) as srv:
        with ThreadPoolExecutor(16) as pool:  # single-image and multi-image requests at once
            statuses = list(pool.map(lambda i: call(srv, "POST", "/embed", {"images": [data] * (1 + i % 3)})[0],
                                     range(24)))
    assert statuses == [200] * 24
    assert peak[0] == workers  # never more decodes at once than the pool, and the pool was used in full


def test_keys_are_bounded(server, runtime, images):
    data = b64(images[2].read_bytes())
    n = len(runtime.gallery)
    status, _, body = call(server, "POST", "/gallery/add", {"images": [data], "keys": ["k" * (MAX_KEY_CHARS + 1)]})
    assert status == 400 and f"keys[0] is longer than {MAX_KEY_CHARS}" in body["error"]
    with pytest.raises(InputError, match="keys"):
        runtime.add(images[2], keys=["k" * (MAX_KEY_CHARS + 1)])
    assert len(runtime.gallery) == n
    status, _, body = call(server, "POST", "/gallery/add", {"images": [data], "keys": ["k" * MAX_KEY_CHARS]})
    assert status == 200 and body["ids"] == [n]


def test_ids_of_every_wrong_kind(server, runtime, images):
    data, n = b64(images[3].read_bytes()), len(runtime.gallery)
    for ids, status in ((["1"], 400), ([1.5], 400), ([True], 400), ([None], 400), ([[1]], 400),  # malformed
                        ([-1], 404), ([2**70], 404), ([2**63], 404), ([n + 5], 404), ([0, -(2**70)], 404)):  # unknown
        got, _, body = call(server, "POST", "/explain", {"image": data, "ids": ids})
        assert (got, body["status"]) == (status, status), (ids, body)
    for path, status in (("abc", 400), ("1.5", 400), ("-1", 404), (str(2**70), 404), (str(n + 5), 404)):
        got, _, body = call(server, "GET", f"/gallery/{path}/image")
        assert got == status, (path, body)
    status, resp, png = call(server, "GET", "/gallery/0/image")
    assert status == 200 and resp.getheader("Content-Type") == "image/png" and png.startswith(b"\x89PNG")
    health_ok(server)


def test_keys_with_controls_and_lone_surrogates(server, runtime, images, capsys):
    data = images[7].read_bytes()  # not in the gallery yet: its own entry is the best hit
    status, _, body = call(server, "POST", "/gallery/add", {"images": [b64(data)], "keys": ["bad\ud800key"]})
    assert status == 400 and "keys[0] is not valid Unicode" in body["error"]
    # such keys still reach a gallery through the Python API (e.g. from undecodable file names): served escaped
    key = "evil\ud800\x1b[2J\u202e\nkey"
    runtime.add(data, keys=[key])
    status, _, body = call(server, "POST", "/search", {"images": [b64(data)], "k": 1})
    assert status == 200 and body["results"][0]["matches"][0]["key"] == key
    query = runtime.gallery.path.parent / "query.jpg"
    query.write_bytes(data)
    assert main(["search", "--export", str(runtime.export_dir), "--gallery", str(runtime.gallery.path), str(query),
                 "--k", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "evil\\ud800\\x1b[2J\\u202e\\nkey" in out and "\x1b" not in out
    out.encode("utf-8")  # printable: no lone surrogate left


def _corrupt_rows(gallery_dir, rows):
    """Write NaN into stored attribute rows and update the manifest's checksum, as an attacker (or a bad disk
    controller) could: the files still match gallery.json."""
    manifest_path = gallery_dir / "gallery.json"
    manifest = json.loads(manifest_path.read_text())
    segment = manifest["segments"][0]
    path = gallery_dir / "segments" / segment["name"] / "attr.npy"
    attr = np.load(path)
    attr[rows] = np.nan
    np.save(path, attr)
    segment["files"]["attr.npy"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


def test_corrupt_stored_rows_are_named_and_health_degrades(tiny_export, images, tmp_path):
    gallery = tmp_path / "gallery"
    with Runtime(tiny_export, gallery, RuntimeConfig(create_gallery=True, threads=1)) as rt:
        rt.add(images[:6])
    _corrupt_rows(gallery, [2])
    with Runtime(tiny_export, gallery, RuntimeConfig(threads=1)) as rt, RuntimeServer(rt, port=0) as srv:
        health_ok(srv)
        data = b64(images[2].read_bytes())
        status, _, body = call(srv, "POST", "/search", {"images": [data], "k": 6})
        assert status == 500 and "[2]" in body["error"] and "corrupt" in body["error"]
        status, _, body = call(srv, "POST", "/explain", {"image": data, "ids": [2]})
        assert status == 500 and "[2]" in body["error"]
        assert call(srv, "POST", "/explain", {"image": data, "ids": [0, 1]})[0] == 200  # the sound rows still serve
        state = health(srv)
        assert state["status"] == "degraded" and "[2]" in state["problem"]


@pytest.mark.parametrize("manifest", [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser goes
    "nul",  # a segment name with a NUL byte
    b'{"format": "attrimeter-gallery", "version": 1, "dim": {"a": [[[]]]}}',
])
def test_a_malformed_manifest_leaves_searches_served_and_health_degraded(tiny_export, images, tmp_path, manifest):
    gallery = tmp_path / "gallery"
    with Runtime(tiny_export, gallery, RuntimeConfig(create_gallery=True, threads=1)) as rt:
        rt.add(images[:4])
    path = gallery / "gallery.json"
    good = path.read_bytes()
    if manifest == "nul":
        doc = json.loads(good)
        doc["segments"][0]["name"] = "seg\x00ment"
        manifest = json.dumps(doc).encode()
    with Runtime(tiny_export, gallery, RuntimeConfig(threads=1, refresh_s=0.0)) as rt, RuntimeServer(rt, port=0) as srv:
        path.write_bytes(manifest)
        data = b64(images[1].read_bytes())
        status, _, body = call(srv, "POST", "/search", {"images": [data], "k": 2})
        assert status == 200 and len(body["results"][0]["matches"]) == 2  # the entries read before still serve
        state = health(srv)
        assert state["status"] == "degraded" and "gallery.json" in state["problem"]
        path.write_bytes(good)
        assert call(srv, "POST", "/search", {"images": [data], "k": 2})[0] == 200
        health_ok(srv)
