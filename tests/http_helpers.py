"""HTTP helpers shared by the server tests: requests on fresh connections and raw-socket exchanges."""

import base64
import http.client
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def call(server, method, path, body=None, *, raw=None, headers=None):
    """One request on a fresh connection: (status, response, JSON or text)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        payload = resp.read()
        ctype = resp.getheader("Content-Type", "")
        if ctype.startswith("application/json"):
            return resp.status, resp, json.loads(payload)
        return resp.status, resp, payload if ctype.startswith("image/") else payload.decode()
    finally:
        conn.close()


def health(server):
    status, _, body = call(server, "GET", "/health")
    assert status == 200
    return body


def health_ok(server):
    body = health(server)
    assert body["status"] == "ok", body
    return body


def raw_exchange(server, data: bytes):
    """Sends bytes on a raw socket; returns (status, response, JSON body) of the first answer."""
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock, method="POST")
        resp.begin()
        return resp.status, resp, json.loads(resp.read())


def start_serve(args, timeout=120):
    """Run ``attrimeter serve ARGS`` and wait for its "serving at" line: (process, URL, stderr lines so far)."""
    cli = Path(sys.executable).with_name("attrimeter")
    proc = subprocess.Popen([str(cli), "serve", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"serving at (http://[\d.]+:\d+)", line)
        if match:
            return proc, match.group(1), lines
    proc.kill()
    pytest.fail(f"attrimeter serve {' '.join(map(str, args))} did not start:\n" + "".join(lines))
