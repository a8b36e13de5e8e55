"""The runtime in a virtual environment without torch and triton: import, index, search, CLI (architecture §2, §6).

The environment gets only the runtime's own dependencies (numpy, Pillow, onnxruntime, faiss-cpu, tqdm, PyYAML and the
HTTP server's FastAPI, uvicorn and prometheus_client, at the versions of the test environment, so pip takes them from
its cache) and the project without dependencies.
"""

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
RUNTIME_PACKAGES = ("numpy", "pillow", "onnxruntime", "faiss-cpu", "tqdm", "pyyaml", "fastapi", "uvicorn",
                    "prometheus-client")

SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    assert importlib.util.find_spec("torch") is None, "torch is installed here"
    assert importlib.util.find_spec("triton") is None, "triton is installed here"
    from attrimeter.runtime import Runtime, RuntimeConfig
    import urllib.request
    from attrimeter.runtime.server import RuntimeServer  # the HTTP server too
    export, gallery, images, query = sys.argv[1:5]
    with Runtime(export, gallery, RuntimeConfig(create_gallery=True)) as rt:
        added = rt.index_folder(images, progress=False).added
        result = rt.search(query, k=3, overlays=1)[0]
        emb = rt.embed(query)
        backend = rt.backend.name
    doc, text = result.to_dict(overlays=1), result.to_text()  # the result type's JSON, PNG overlays and text
    with Runtime(export, gallery) as rt, RuntimeServer(rt, port=0) as server:
        health = json.loads(urllib.request.urlopen(server.url + "/health", timeout=60).read())
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton"))
    print(json.dumps({"added": added, "backend": backend, "loaded": loaded, "health": health,
                      "ids": [m.id for m in result.matches], "d": [m.d for m in result.matches],
                      "overlays": [len(m["overlays"]) for m in doc["matches"]], "lines": len(text.splitlines()),
                      "shares": [m.shares.tolist() for m in result.matches],
                      "embedding": emb.embedding[0].tolist()}))
""")


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory):
    """A venv holding the runtime's dependencies and the project, but neither torch nor triton."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pins = [f"{name}=={version(name)}" for name in RUNTIME_PACKAGES]
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *pins], check=True, timeout=600)
    subprocess.run([*pip, "--no-deps", "-e", str(REPO)], check=True, timeout=600)
    return venv


def test_runtime_runs_without_torch_and_triton(bare_venv, tiny_export, tiny_data, tmp_path):
    from attrimeter.runtime import Runtime, RuntimeConfig

    images = tiny_data / "bounding_box_test"
    query = sorted((tiny_data / "query").glob("*.jpg"))[0]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    run = subprocess.run([str(bare_venv / "bin" / "python"), "-c", SCRIPT, str(tiny_export), str(tmp_path / "g1"),
                          str(images), str(query)], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    bare = json.loads(run.stdout.splitlines()[-1])
    assert bare["loaded"] == [] and bare["backend"] == "onnxruntime"
    assert bare["overlays"] == [1, 1, 1] and bare["lines"] >= 6  # a header and the shares per hit, at least
    assert bare["health"]["status"] == "ok" and bare["health"]["gallery"] == bare["added"]
    assert bare["added"] == len(list(images.glob("*.jpg")))

    # The same work here (torch installed) gives the same answer.
    with Runtime(tiny_export, tmp_path / "g2", RuntimeConfig(create_gallery=True)) as rt:
        rt.index_folder(images, progress=False)
        here = rt.search(query, k=3)[0]
        emb = rt.embed(query)
    assert bare["ids"] == [m.id for m in here.matches]
    np.testing.assert_allclose(bare["d"], [m.d for m in here.matches], rtol=1e-5)
    np.testing.assert_allclose(bare["shares"], [m.shares for m in here.matches], atol=1e-5)
    np.testing.assert_allclose(bare["embedding"], emb.embedding[0], rtol=1e-5, atol=1e-6)

    # The CLI too: index (resumes: nothing new) and search --json, with no torch in the process.
    cli = bare_venv / "bin" / "attrimeter"
    out = subprocess.run([str(cli), "index", "--export", str(tiny_export), "--images", str(images), "--out",
                          str(tmp_path / "g1"), "-q"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0 and "added 0 images" in out.stdout, out.stderr
    out = subprocess.run([str(cli), "search", "--export", str(tiny_export), "--gallery", str(tmp_path / "g1"),
                          str(query), "--k", "2", "--json", "-q"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert [m["id"] for m in json.loads(out.stdout)[0]["matches"]] == bare["ids"][:2]
