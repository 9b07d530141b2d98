"""The OpenAPI document says what the server does: real statuses with the error envelope, no 422, a body schema
for every request (uploads included), the bearer scheme; OPTIONS lists the methods that exist."""

from __future__ import annotations

import httpx
import pytest

from tests.live import live_server


@pytest.fixture
def url(make_fake, tmp_path):
    from tests.fakes import FakeAnalysisBackend

    with live_server(make_fake(FakeAnalysisBackend), vector_dir=tmp_path) as (url, _):
        yield url


def test_every_operation_documents_its_real_errors(url):
    doc = httpx.get(url + "/openapi.json").json()
    envelope = {"$ref": "#/components/schemas/ErrorResponse"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = op["responses"]
            assert "422" not in codes, (method, path)
            if path.startswith(("/v1", "/tokenize", "/detokenize")):
                for code in ("400", "401", "403", "503"):
                    assert codes[code]["content"]["application/json"]["schema"] == envelope, (method, path, code)
                assert op["security"] == [{"HTTPBearer": []}], (method, path)
                ok = next(c for c in codes if c.startswith("2"))
                assert codes[ok].get("content") or method == "delete", (method, path)
    assert doc["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "the server's API key, when it has one"}
    upload = doc["paths"]["/v1/steering/vectors"]["post"]["requestBody"]["content"]
    assert set(upload) == {"application/json", "multipart/form-data"}
    assert "409" in doc["paths"]["/v1/steering/vectors"]["post"]["responses"]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert len(metrics) == 1 and next(iter(metrics)).startswith("text/plain")  # not JSON


def test_options_lists_the_methods_that_exist(url):
    r = httpx.options(url + "/v1/steering/vectors/some-name")
    assert r.status_code == 204 and r.headers["allow"] == "GET, DELETE, OPTIONS"
    r = httpx.options(url + "/v1/chat/completions")
    assert r.headers["allow"] == "POST, OPTIONS"
    assert httpx.options(url + "/no/such/path").status_code == 404
    wrong = httpx.put(url + "/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == 405
