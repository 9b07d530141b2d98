"""The server over its contract only: every route against the fake backend (no model is loaded), over real HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest

from steering.sampling import SamplingParams
from steering.spec import SteeringSpec
from steering.vectors import SteeringVector
from tests.fakes import FakeAnalysisBackend
from tests.live import live_server

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture
def fake(make_fake):
    return make_fake(max_running=2, max_waiting=2)


@pytest.fixture
def server(fake, tmp_path):
    with live_server(fake, vector_dir=tmp_path / "vectors") as (url, app):
        yield url, app


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def values(fake, seed: int) -> dict[str, list[float]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {str(i): torch.randn(fake.info.hidden_size, generator=g).tolist() for i in range(fake.info.num_layers)}


def test_chat_returns_the_backends_tokens_and_usage(server, fake):
    url, _ = server
    r = client(url).chat.completions.create(model="fake-model", messages=MSGS, max_tokens=7, temperature=0)
    prompt = fake.inputs.encode_chat(MSGS)
    expected = fake.reference(prompt, SamplingParams(max_tokens=7, temperature=0), None)
    assert r.choices[0].message.content == fake.inputs.decode(expected, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 7
    assert r.choices[0].finish_reason == "length"
    sent = fake.submitted[-1]
    assert sent.prompt_token_ids == prompt and sent.sampling.max_tokens == 7 and sent.steering is None


def test_steering_travels_to_the_backend_and_is_described(server, fake):
    url, _ = server
    vals = values(fake, 1)
    body = {"steering": {"vectors": [{"values": vals, "scale": 2.5, "layers": [1, 2], "positions": "generated",
                                      "normalize": True}]}}
    r = client(url).chat.completions.create(model="fake-model", messages=MSGS, max_tokens=6, temperature=0,
                                            extra_body=body)
    spec = fake.submitted[-1].steering
    assert isinstance(spec, SteeringSpec) and spec.applications[0].scale == 2.5
    resolved = fake.resolve_steering(spec)
    expected = fake.reference(fake.inputs.encode_chat(MSGS), SamplingParams(max_tokens=6, temperature=0), resolved)
    assert r.choices[0].message.content == fake.inputs.decode(expected, skip_special_tokens=True)
    assert r.model_extra["steering"] == [{"name": None, "scale": 2.5, "layers": [1, 2], "positions": "generated",
                                          "normalize": True}]


def test_named_vectors_come_from_the_store(server, fake):
    url, app = server
    vals = values(fake, 2)
    up = httpx.post(url + "/v1/steering/vectors", json={"name": "v1", "values": vals})
    assert up.status_code == 201 and up.json()["layers"] == list(range(fake.info.num_layers))
    named = client(url).completions.create(model="fake-model", prompt="Hello", max_tokens=5, temperature=0,
                                           extra_body={"steering": {"vectors": [{"name": "v1", "scale": 3}]}})
    inline = client(url).completions.create(model="fake-model", prompt="Hello", max_tokens=5, temperature=0,
                                            extra_body={"steering": {"vectors": [{"values": vals, "scale": 3}]}})
    assert named.choices[0].text == inline.choices[0].text
    assert app.state.steerserve.services.store.get("v1").name == "v1"
    missing = httpx.post(url + "/v1/completions", json={
        "model": "fake-model", "prompt": "Hello", "steering": {"vectors": [{"name": "nope"}]}})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_streaming_is_sse_with_done(server, fake):
    url, _ = server
    chunks = list(client(url).chat.completions.create(model="fake-model", messages=MSGS, max_tokens=5,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = fake.reference(fake.inputs.encode_chat(MSGS), SamplingParams(max_tokens=5, temperature=0), None)
    assert text == fake.inputs.decode(expected, skip_special_tokens=True)
    assert chunks[-1].usage.completion_tokens == 5
    with httpx.stream("POST", url + "/v1/completions", json={"model": "fake-model", "prompt": "Hi", "max_tokens": 3,
                                                              "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_tokenize_maps_roles_as_chat_does(server, fake):
    url, _ = server
    dev = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = httpx.post(url + "/tokenize", json={"model": "fake-model", "messages": dev}).json()
    assert r["tokens"] == fake.inputs.encode_chat(MSGS)  # developer is the system role, as in chat
    client(url).chat.completions.create(model="fake-model", messages=dev, max_tokens=2)
    assert fake.submitted[-1].prompt_token_ids == r["tokens"]


def test_analysis_routes_answer_501_on_a_generation_only_backend(server):
    url, _ = server
    for method, path, body in [("POST", "/v1/attributions", {"prompt": "x"}), ("GET", "/v1/jobs", None),
                               ("POST", "/v1/evaluations", {"type": "steer", "prompts": ["x"]}),
                               ("GET", "/v1/jobs/job-1", None)]:
        r = httpx.request(method, url + path, json=body)
        assert r.status_code == 501, (path, r.text)
        assert r.json()["error"]["type"] == "not_implemented_error" and "fake" in r.json()["error"]["message"]
    build = httpx.post(url + "/v1/steering/vectors/build", json={
        "name": "b", "examples": [{"prompt": "p", "preferred": "a", "dispreferred": "b"}]})
    assert build.status_code == 501
    paths = httpx.get(url + "/openapi.json").json()["paths"]
    assert "/v1/attributions" not in paths and "/v1/chat/completions" in paths


def test_analysis_routes_are_mounted_for_an_analysis_backend(make_fake, tmp_path):
    backend = make_fake(FakeAnalysisBackend)
    with live_server(backend, vector_dir=tmp_path) as (url, _):
        assert httpx.get(url + "/v1/jobs").json() == {"object": "list", "data": []}
        assert httpx.get(url + "/v1/jobs/job-x").status_code == 404
        assert "/v1/attributions" in httpx.get(url + "/openapi.json").json()["paths"]


def test_errors_are_openai_envelopes(server, fake):
    url, _ = server
    cases = [
        ({"model": "fake-model", "messages": MSGS, "steering": {"vector": "x"}}, 400, "steering.vectors"),
        ({"model": "other", "messages": MSGS}, 404, "model"),
        ({"model": "fake-model", "messages": MSGS, "steering": {"vectors": [{"values": {"0": [1.0]}}]}}, 400,
         "steering.vectors[0].values"),
        ({"model": "fake-model", "messages": MSGS, "max_tokens": 10_000}, 400, "max_tokens"),
    ]
    for body, status, param in cases:
        r = httpx.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["code"] == status
    r = httpx.post(url + "/v1/chat/completions", json=cases[0][0])
    assert "steering.vector: unknown field" in r.json()["error"]["message"]  # a typo is named, never ignored


def test_queue_full_is_503_with_retry_after(make_fake, tmp_path):
    import threading
    import time

    fake = make_fake(max_running=2, max_waiting=2, step_seconds=0.02)  # each stream lasts seconds
    with live_server(fake, vector_dir=tmp_path) as (url, _):
        body = {"model": "fake-model", "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
        streams = []
        for i in range(4):  # 2 running + 2 waiting fill the fake; each is in before the next is sent
            s = httpx.stream("POST", url + "/v1/completions", json=body)
            streams.append(s)
            threading.Thread(target=s.__enter__, daemon=True).start()
            deadline = time.time() + 10
            while fake.stats().running + fake.stats().waiting < i + 1:
                assert time.time() < deadline, fake.stats()
                time.sleep(0.005)
        r = httpx.post(url + "/v1/completions", json={**body, "stream": False})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "service_unavailable_error"
        for s in streams:
            s.__exit__(None, None, None)


def test_bearer_auth_and_its_openapi_scheme(fake, tmp_path):
    with live_server(fake, vector_dir=tmp_path, api_key="sekret") as (url, _):
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        ok = client(url, "sekret").models.list()
        assert [m.id for m in ok.data] == ["fake-model"]
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        spec = httpx.get(url + "/openapi.json").json()
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_shutdown_drains_running_requests(make_fake, tmp_path):
    fake = make_fake()
    with live_server(fake, vector_dir=tmp_path, drain_seconds=10) as (url, app):
        r = client(url).completions.create(model="fake-model", prompt="Hi", max_tokens=3)
        assert r.choices[0].finish_reason == "length"
    assert app.state.steerserve.draining and fake.stats().idle and fake.vectors is None


def test_the_store_belongs_to_one_server_at_a_time(fake, tmp_path):
    with live_server(fake, vector_dir=tmp_path / "a"):
        with pytest.raises(ValueError, match="already looks vectors up"):
            fake.use_vectors(type(fake.vectors)(tmp_path / "b", fake.info.identity()))
    fake.use_vectors(None)
    assert fake.generate(fake.inputs.encode_text("x"), SamplingParams(max_tokens=2),
                         SteeringSpec.single(SteeringVector({0: __import__("torch").ones(16)}))).token_ids
