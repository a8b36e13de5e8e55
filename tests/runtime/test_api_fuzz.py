"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis + hypothesis): requests that fit
the schema and requests that break it, a bounded number per operation, against the real server (uvicorn on
loopback). No answer may be a 5xx, every answer must match the documented status codes, content types and bodies, and
schema-breaking requests must be refused with a 4xx."""

import json
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from attrimeter.runtime.runtime import Runtime, RuntimeConfig
from attrimeter.runtime.server import RuntimeServer, ServerLimits

# Requests per operation and mode: positive data fits the schema (some of it gets past the strict validation to the
# model), negative data breaks it. Both modes took 15 s on this 2-core CPU (longer while a failure is being shrunk).
EXAMPLES = {GenerationMode.POSITIVE: 100, GenerationMode.NEGATIVE: 40}

POSITIVE_CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance, content_type_conformance,
                   response_schema_conformance]


@pytest.fixture(scope="module")
def server(tiny_export, tiny_data, tmp_path_factory):
    images = sorted((tiny_data / "bounding_box_test").glob("*.jpg"))[:8]
    gallery = tmp_path_factory.mktemp("fuzz") / "gallery"
    with Runtime(tiny_export, gallery, RuntimeConfig(create_gallery=True, threads=1)) as rt:
        rt.add(images)
        with RuntimeServer(rt, port=0, limits=ServerLimits(max_images=8, max_k=50, max_body_bytes=1 << 20)) as srv:
            yield srv


def _operations(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /health", "GET /metrics", "POST /embed", "POST /search", "POST /explain", "POST /gallery/add"}
    return operations


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_request_gets_a_server_error(server, mode):
    checks = POSITIVE_CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    statuses = {}
    for operation in _operations(server):
        if mode is GenerationMode.NEGATIVE and not (operation.body or any(operation.iter_parameters())):
            continue  # nothing in the request to break (GET /health)
        @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=False,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            response = case.call(base_url=server.url, timeout=60)
            statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            case.validate_response(response, checks=checks)

        fuzz()
    assert all(code < 500 for codes in statuses.values() for code in codes), statuses


def test_the_documented_examples_are_answered(server):
    """Each request body's example in the schema (a real image) is answered 200 with a body that fits the schema."""
    operations = {op.path: op for op in _operations(server) if op.method.upper() == "POST"}
    components = json.loads(urllib.request.urlopen(f"{server.url}/openapi.json", timeout=60).read())["components"]
    for path, operation in operations.items():
        name = operation.definition.raw["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
        for example in components["schemas"][name]["examples"]:
            case = operation.Case(body=example, media_type="application/json")
            response = case.call(base_url=server.url, timeout=60)
            assert response.status_code == 200, (path, response.text[:300])
            case.validate_response(response, checks=POSITIVE_CHECKS)
