"""The OpenAI-compatible API over real HTTP on a tiny model: chat, completions, SSE, steering, errors, metrics,
the vector store."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from steering.backends.hf import EngineConfig, HFEngine
from steering.sampling import SamplingParams
from steering.vectors import SteeringVector
from tests.live import live_server, m, metrics, vec_values

MSGS = [{"role": "user", "content": "What is the capital of France?"}]








def test_models_and_probes(server, client, model_name):
    url, _ = server
    models = client.models.list()
    assert [x.id for x in models.data] == [model_name]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/ready").status_code == 200
    assert "version" in httpx.get(url + "/version").json()


def test_chat_matches_engine_and_usage(server, client, engine, tiny_lm, model_name):
    r = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=12, temperature=0)
    ids = tiny_lm.inputs.encode_chat(MSGS)
    plain = engine.generate(ids, SamplingParams(max_tokens=12, temperature=0))
    assert r.choices[0].message.content == plain.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(plain.token_ids)
    assert r.choices[0].finish_reason == plain.finish_reason


def test_completion_with_logprobs_and_n(server, client, engine, tiny_lm, model_name):
    r = client.completions.create(model=model_name, prompt="The quick brown fox", max_tokens=6, temperature=0,
                                  logprobs=2)
    plain = engine.generate(tiny_lm.inputs.encode_text("The quick brown fox"),
                            SamplingParams(max_tokens=6, temperature=0))
    assert r.choices[0].text == plain.text
    assert len(r.choices[0].logprobs.token_logprobs) == 6
    assert all(len(t) <= 2 for t in r.choices[0].logprobs.top_logprobs)
    many = client.completions.create(model=model_name, prompt="Hello", max_tokens=5, temperature=1.0, seed=3, n=3)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    again = client.completions.create(model=model_name, prompt="Hello", max_tokens=5, temperature=1.0, seed=3, n=3)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]


def test_streaming_chat_with_usage(server, client, model_name):
    full = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_sse_framing(server, model_name):
    url, _ = server
    body = {"model": model_name, "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = raw.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    events = [json.loads(f[6:]) for f in frames[:-2]]
    assert all(f.startswith("data: ") for f in frames[:-1])
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_extra_body_steering_changes_output(server, client, tiny_lm, model_name):
    plain = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=12, temperature=0)
    steering = {"vectors": [{"values": vec_values(tiny_lm, 1), "scale": 30, "positions": "all",
                             "normalize": True}]}
    steered = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=12, temperature=0,
                                             extra_body={"steering": steering})
    assert steered.choices[0].message.content != plain.choices[0].message.content
    applied = steered.model_extra["steering"]
    assert applied[0]["scale"] == 30 and applied[0]["layers"] == list(range(tiny_lm.num_layers))
    again = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == plain.choices[0].message.content
    assert "steering" not in (again.model_extra or {}) or again.model_extra["steering"] is None


def test_named_vector_store_roundtrip(server, client, tiny_lm, model_name, tmp_path):
    url, app = server
    values = vec_values(tiny_lm, 2, layers=[1, 2])
    r = httpx.post(url + "/v1/steering/vectors", json={"name": "happy", "values": values, "description": "test"})
    assert r.status_code == 201, r.text
    assert r.json()["layers"] == [1, 2] and r.json()["metadata"]["description"] == "test"
    assert httpx.post(url + "/v1/steering/vectors", json={"name": "happy", "values": values}).status_code == 409
    names = [v["name"] for v in httpx.get(url + "/v1/steering/vectors").json()["data"]]
    assert "happy" in names
    # safetensors upload
    vec = SteeringVector({0: torch.randn(tiny_lm.hidden_size)})
    vec.save(tmp_path / "f.safetensors")
    with open(tmp_path / "f.safetensors", "rb") as fh:
        r = httpx.post(url + "/v1/steering/vectors", data={"name": "fromfile"},
                       files={"file": ("f.safetensors", fh, "application/octet-stream")})
    assert r.status_code == 201, r.text
    # usable by name
    plain = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=10, temperature=0)
    steered = client.chat.completions.create(
        model=model_name, messages=MSGS, max_tokens=10, temperature=0,
        extra_body={"steering": {"vectors": [{"name": "happy", "scale": 40}]}})
    assert steered.choices[0].message.content != plain.choices[0].message.content
    # the registry is reloaded from disk by a new app over the same directory
    services = app.state.steerserve.services
    vec_dir = services.store.root
    assert sorted(p.name for p in vec_dir.iterdir()) == ["fromfile.safetensors", "happy.safetensors"]
    assert httpx.delete(url + "/v1/steering/vectors/fromfile").status_code == 200
    assert httpx.get(url + "/v1/steering/vectors/fromfile").status_code == 404
    m_ = metrics(url)
    assert m(m_, "steerserve_steering_vectors_loaded") == len(services.store)
    assert m(m_, "steerserve_steered_requests_total", vector="happy") >= 1


def test_vector_store_rejects_bad_vectors(server, tiny_lm):
    url, _ = server
    r = httpx.post(url + "/v1/steering/vectors", json={"name": "bad", "values": {"0": [1.0, 2.0]}})
    assert r.status_code == 400 and "hidden size" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/steering/vectors",
                   json={"name": "bad", "values": {"99": [0.0] * tiny_lm.hidden_size}})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/steering/vectors", json={"name": "../evil", "values": {"0": [0.0] * 64}})
    assert r.status_code == 400
    r = httpx.post(url + "/v1/steering/vectors", json={"name": "x", "valuez": {}})
    assert r.status_code == 400


def test_misspelled_steering_is_rejected(server, client, tiny_lm, model_name):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=4,
                                       extra_body={"steering": {"vectors": [{"name": "happy", "scal": 4}]}})
    assert "scal" in str(exc.value) and exc.value.status_code == 400
    body = exc.value.body
    assert set(body) >= {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, messages=MSGS, extra_body={"steerin": {"vectors": []}})
    with pytest.raises(openai.BadRequestError, match="positions"):
        client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=4, extra_body={
            "steering": {"vectors": [{"values": vec_values(tiny_lm, 0), "positions": "late"}]}})
    with pytest.raises(openai.BadRequestError, match="hidden size"):
        client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=4, extra_body={
            "steering": {"vectors": [{"values": {"0": [1.0]}}]}})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=4, extra_body={
            "steering": {"vectors": [{"name": "nope"}]}})


def test_error_envelopes(server, model_name):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", json={"model": "gpt-4", "messages": MSGS})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": model_name, "messages": MSGS, "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(url + "/v1/completions", json={"model": model_name, "prompt": "x", "max_tokens": 100000})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"model": model_name, "prompt": "x" * 20_000_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_tokenize_detokenize(server, tiny_lm, model_name):
    url, _ = server
    r = httpx.post(url + "/tokenize", json={"model": model_name, "prompt": "Hello world"}).json()
    assert r["tokens"] == tiny_lm.inputs.encode_text("Hello world") and r["count"] == len(r["tokens"])
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Hello world"
    r = httpx.post(url + "/tokenize", json={"messages": MSGS}).json()
    assert r["tokens"] == tiny_lm.inputs.encode_chat(MSGS)
    assert httpx.post(url + "/detokenize", json={"tokens": [10**9]}).status_code == 400


def test_disconnect_cancels_and_metrics_match_traffic(server, model_name):
    url, _ = server
    before = metrics(url)
    body = {"model": model_name, "prompt": "Hello", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
            if got >= 3:
                break
        running = m(metrics(url), "steerserve_num_requests_running")
        assert running >= 1
    deadline = time.time() + 10
    while m(metrics(url), "steerserve_num_requests_running") and time.time() < deadline:
        time.sleep(0.05)
    after = metrics(url)
    assert m(after, "steerserve_num_requests_running") == 0
    assert m(after, "steerserve_request_success_total", finished_reason="abort") == m(
        before, "steerserve_request_success_total", finished_reason="abort") + 1
    # counters follow traffic exactly
    before = after
    usage_tokens = 0
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c:
        for i in range(3):
            r = c.completions.create(model=model_name, prompt=f"Count {i}", max_tokens=5 + i, temperature=0,
                                     extra_body={"ignore_eos": True})
            usage_tokens += r.usage.completion_tokens
            prompt_tokens = r.usage.prompt_tokens
    after = metrics(url)
    assert m(after, "steerserve_generation_tokens_total") - m(before, "steerserve_generation_tokens_total") == \
        usage_tokens == 5 + 6 + 7
    assert m(after, "steerserve_prompt_tokens_total") - m(before, "steerserve_prompt_tokens_total") >= prompt_tokens
    assert m(after, "steerserve_request_success_total", finished_reason="length") - m(
        before, "steerserve_request_success_total", finished_reason="length") == 3
    assert m(after, "steerserve_e2e_request_latency_seconds_count") - m(
        before, "steerserve_e2e_request_latency_seconds_count") == 3
    assert m(after, "steerserve_time_to_first_token_seconds_count") > 0
    assert m(after, "steerserve_inter_token_latency_seconds_count") > 0
    assert m(after, "steerserve_request_queue_time_seconds_count") > 0


def test_queue_full_is_503_with_retry_after(tiny_lm, tmp_path):
    eng = HFEngine(tiny_lm, EngineConfig(max_batch_size=1, max_queue_size=1)).start()
    try:
        with live_server(eng, vector_dir=tmp_path) as (url, _), httpx.Client(timeout=60) as c:
            body = {"model": tiny_lm.name, "prompt": "Hello", "max_tokens": 500, "ignore_eos": True}
            with ThreadPoolExecutor(2) as pool:
                first = pool.submit(c.post, url + "/v1/completions", json=body)  # takes the only slot
                deadline = time.time() + 10
                while m(metrics(url), "steerserve_num_requests_running") < 1 and time.time() < deadline:
                    time.sleep(0.005)
                second = pool.submit(c.post, url + "/v1/completions", json=body)  # fills the queue
                while m(metrics(url), "steerserve_num_requests_waiting") < 1 and time.time() < deadline:
                    time.sleep(0.005)
                r3 = c.post(url + "/v1/completions", json=body)
                assert r3.status_code == 503 and r3.headers["retry-after"] == "1"
                assert r3.json()["error"]["type"] == "service_unavailable_error"
                assert m(metrics(url), "steerserve_request_failure_total", reason="queue_full") == 1
                assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        eng.shutdown()


def test_api_key(tiny_lm, make_engine, tmp_path):
    with live_server(make_engine(), vector_dir=tmp_path, api_key="sekret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0).models.list()
        assert ok.data[0].id == tiny_lm.name
        assert httpx.get(url + "/health").status_code == 200  # probes stay open


def test_error_after_stream_started(tiny_lm, tmp_path):
    eng = HFEngine(tiny_lm).start()
    with live_server(eng, vector_dir=tmp_path) as (url, _):
        body = {"model": tiny_lm.name, "prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as r:
            it = r.iter_lines()
            first = next(line for line in it if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            eng.shutdown()  # the engine dies under a running stream
            rest = [line for line in it if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])
        assert set(err["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(url + "/health").status_code == 503
        assert httpx.get(url + "/ready").status_code == 503


def test_registry_reload_and_model_mismatch(tiny_lm, make_engine, tmp_path):
    engine = make_engine()
    values = vec_values(tiny_lm, 4, layers=[0])
    with live_server(engine, vector_dir=tmp_path) as (url, _):
        assert httpx.post(url + "/v1/steering/vectors", json={"name": "keep", "values": values}).status_code == 201
    foreign = SteeringVector({0: torch.zeros(tiny_lm.hidden_size)},
                             metadata={"model": {"name": "other", "hidden_size": 999, "num_layers": 2}})
    foreign.save(tmp_path / "foreign.safetensors")
    with live_server(engine, vector_dir=tmp_path) as (url, app):
        names = [v["name"] for v in httpx.get(url + "/v1/steering/vectors").json()["data"]]
        assert names == ["keep"]
        assert "foreign.safetensors" in app.state.steerserve.services.store.skipped


def test_app_loads_model_in_background(tiny_dir, tmp_path):
    with live_server(None, model=str(tiny_dir), device="cpu", vector_dir=tmp_path) as (url, _):
        deadline = time.time() + 60
        while httpx.get(url + "/ready").status_code != 200 and time.time() < deadline:
            assert httpx.get(url + "/health").status_code == 200  # alive while loading
            time.sleep(0.05)
        assert httpx.get(url + "/ready").json()["status"] == "ready"
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == tiny_dir.name


def test_app_reports_a_model_that_fails_to_load(tmp_path):
    with live_server(None, model=str(tmp_path / "missing"), vector_dir=tmp_path) as (url, _):
        deadline = time.time() + 30
        while httpx.get(url + "/health").status_code == 200 and time.time() < deadline:
            time.sleep(0.05)
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "not found" in health.json()["error"]
        assert httpx.get(url + "/ready").status_code == 503
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
