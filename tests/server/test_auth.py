"""API keys with roles, and jobs owned by the key that made them."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fakes import FakeAnalysisBackend
from tests.live import live_server

KEYS = [{"key": "reader-key", "role": "read", "name": "rita"},
        {"key": "gen-key-1", "role": "generate", "name": "gus"},
        {"key": "gen-key-2", "role": "generate", "name": "gwen"}]


def h(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture
def server(make_fake, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": KEYS[1:]}))
    backend = make_fake(FakeAnalysisBackend)
    with live_server(backend, vector_dir=tmp_path / "v", api_key="admin-key", api_keys=KEYS[:1], api_keys_file=keys,
                     metrics_require_key=True) as (url, app):
        yield url


def test_roles_nest(server):
    url = server
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    vec = {"name": "v", "values": {"0": [1.0] * 16}}
    r = httpx.post(url + "/v1/chat/completions", json=chat)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(url + "/v1/chat/completions", json=chat, headers=h("wrong")).status_code == 401
    # read: look, but not run or change
    assert httpx.get(url + "/v1/models", headers=h("reader-key")).status_code == 200
    assert httpx.get(url + "/v1/steering/vectors", headers=h("reader-key")).status_code == 200
    denied = httpx.post(url + "/v1/chat/completions", json=chat, headers=h("reader-key"))
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    # generate: run the model, but not change the store
    assert httpx.post(url + "/v1/chat/completions", json=chat, headers=h("gen-key-1")).status_code == 200
    assert httpx.post(url + "/v1/steering/vectors", json=vec, headers=h("gen-key-1")).status_code == 403
    # admin: everything
    assert httpx.post(url + "/v1/steering/vectors", json=vec, headers=h("admin-key")).status_code == 201
    assert httpx.delete(url + "/v1/steering/vectors/v", headers=h("gen-key-2")).status_code == 403
    assert httpx.delete(url + "/v1/steering/vectors/v", headers=h("admin-key")).status_code == 200
    # metrics can require a key too
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/metrics", headers=h("reader-key")).status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # probes stay open


def test_jobs_belong_to_their_key(server):
    url = server
    body = {"type": "steer", "prompts": ["hi"], "scorer": None}
    job = httpx.post(url + "/v1/evaluations", json=body, headers=h("gen-key-1"))
    assert job.status_code == 202, job.text
    jid = job.json()["id"]
    assert httpx.get(f"{url}/v1/jobs/{jid}", headers=h("gen-key-1")).status_code == 200
    assert httpx.get(f"{url}/v1/jobs/{jid}", headers=h("gen-key-2")).status_code == 404  # not someone else's
    assert httpx.post(f"{url}/v1/jobs/{jid}/cancel", headers=h("gen-key-2")).status_code == 404
    assert [j["id"] for j in httpx.get(url + "/v1/jobs", headers=h("gen-key-2")).json()["data"]] == []
    assert jid in [j["id"] for j in httpx.get(url + "/v1/jobs", headers=h("admin-key")).json()["data"]]
    assert httpx.get(f"{url}/v1/jobs/{jid}", headers=h("admin-key")).status_code == 200
