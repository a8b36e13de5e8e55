"""``attrimeter serve`` as a user runs it (a child process): its options, the viewer page, and a graceful stop on
SIGTERM that finishes the answer in progress."""

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from http_helpers import b64, call, start_serve

from attrimeter.runtime.runtime import Runtime, RuntimeConfig
from attrimeter.runtime.server import RuntimeServer


def test_cli_serve_options_viewer_and_sigterm(tiny_export, tiny_data, tmp_path):
    gallery = tmp_path / "gallery"
    with Runtime(tiny_export, gallery, RuntimeConfig(create_gallery=True, threads=1)) as rt:
        rt.index_folder(tiny_data / "query", progress=False)
    proc, url, _ = start_serve(["--export", str(tiny_export), "--gallery", str(gallery), "--writable", "--port", "0",
                           "--threads", "1", "--max-connections", "8", "--backlog", "256", "--queue-timeout", "0.5",
                           "--request-timeout", "5", "--decode-workers", "1", "--max-images", "2"])
    try:
        with urllib.request.urlopen(f"{url}/", timeout=30) as page:  # redirected to the viewer
            assert page.url.endswith("/viewer/") and b"explanation viewer" in page.read()
        for asset in ("viewer.js", "viewer.css"):
            with urllib.request.urlopen(f"{url}/viewer/{asset}", timeout=30) as answer:
                assert answer.status == 200 and len(answer.read()) > 500
        image = b64(next((tiny_data / "query").glob("*.jpg")).read_bytes())
        request = urllib.request.Request(f"{url}/gallery/add", data=json.dumps({"images": [image] * 3}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:  # --max-images 2
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 413
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "server stopped" in err


@pytest.mark.parametrize("bad", [["--queue-timeout", "0"], ["--max-connections", "0"], ["--request-timeout", "inf"]])
def test_cli_serve_refuses_bad_limits(bad):
    cli = Path(sys.executable).with_name("attrimeter")
    run = subprocess.run([str(cli), "serve", "--export", "nowhere", *bad], capture_output=True, text=True, check=False)
    assert run.returncode == 2 and bad[0] in run.stderr


def test_stopping_finishes_the_answer_in_progress(tiny_export, tiny_data, monkeypatch):
    image = b64(next((tiny_data / "query").glob("*.jpg")).read_bytes())
    with Runtime(tiny_export, config=RuntimeConfig(threads=1)) as rt:
        embed = rt.embed
        entered = threading.Event()

        def slow(*args, **kwargs):
            entered.set()
            time.sleep(1.0)
            return embed(*args, **kwargs)

        monkeypatch.setattr(rt, "embed", slow)
        server = RuntimeServer(rt, port=0).start()
        answers = []
        client = threading.Thread(target=lambda: answers.append(call(server, "POST", "/embed", {"images": [image]})))
        client.start()
        assert entered.wait(30)
        t0 = time.monotonic()
        server.stop()  # while the request is being answered
        client.join(30)
        assert answers and answers[0][0] == 200 and len(answers[0][2]["embeddings"]) == 1
        assert time.monotonic() - t0 < 10
        with pytest.raises(OSError):  # and no longer listening
            call(server, "GET", "/health")
