"""Bounded work per request, and inputs that used to break the server: each answers a clear 4xx, never a 500 or a
dropped connection, and the server keeps serving."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
import torch

from tests.live import live_server

MSGS = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def fake(make_fake):
    return make_fake(max_running=2, max_waiting=3)


@pytest.fixture
def server(fake, tmp_path):
    with live_server(fake, vector_dir=tmp_path / "vectors", max_prompt_chars=2000, body_timeout_seconds=1.0,
                     max_body_bytes=64 * 1024) as (url, app):
        yield url, app


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30)


def assert_error(r: httpx.Response, status: int, param: str | None = None, words: str = "") -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and words in err["message"], err
    if param is not None:
        assert err["param"] == param, err


def test_request_bounds_answer_400_naming_the_field(server):
    url, _ = server
    chat = {"model": "fake-model", "messages": MSGS, "max_tokens": 2}
    assert_error(post(url, "/v1/chat/completions", {**chat, "stop": [f"s{i}" for i in range(17)]}), 400, "stop",
                 "at most 16")
    assert_error(post(url, "/v1/chat/completions", {**chat, "stop": ["x" * 257]}), 400, "stop", "at most 256")
    assert_error(post(url, "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "y" * 2001}]}),
                 400, "messages", "at most 2000")
    assert_error(post(url, "/v1/completions", {"model": "fake-model", "prompt": "z" * 2001}), 400, "prompt")
    assert_error(post(url, "/tokenize", {"model": "fake-model", "prompt": "z" * 2001}), 400, "prompt")
    # n larger than the queue can ever hold: retrying cannot help, so not a 503
    assert_error(post(url, "/v1/completions", {"model": "fake-model", "prompt": "hi", "n": 4}), 400, "n",
                 "can never be queued")
    assert post(url, "/v1/completions", {"model": "fake-model", "prompt": "hi", "n": 3}).status_code == 200


def test_lone_surrogates_are_refused_everywhere(server):
    url, _ = server
    s = "bad \ud800 text"
    cases = [
        ("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user", "content": s}]}),
        ("/v1/chat/completions", {"model": s, "messages": MSGS}),
        ("/v1/completions", {"model": "fake-model", "prompt": "hi", "stop": [s]}),
        ("/v1/completions", {"model": "fake-model", "prompt": s}),
        ("/tokenize", {"model": "fake-model", "prompt": s}),
        ("/v1/steering/vectors", {"name": "v", "values": {"0": [0.0] * 16}, "description": s}),
        ("/v1/chat/completions", {"model": "fake-model", "messages": MSGS,
                                  "steering": {"vectors": [{"name": s}]}}),
    ]
    for path, body in cases:
        raw = json.dumps(body).encode()  # json.dumps writes the surrogate as the escape \ud800
        r = httpx.post(url + path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text  # read as Unicode it is refused; a strict JSON parser refuses it too
        words = ("surrogate", "not valid JSON", "vector name", "unicode string")
        assert any(w in r.json()["error"]["message"] for w in words), r.text
    assert post(url, "/v1/chat/completions", {"model": "fake-model", "messages": MSGS}).status_code == 200


def test_vector_names_and_files_that_used_to_break_the_store(server, tmp_path):
    url, _ = server
    r = post(url, "/v1/steering/vectors", {"name": "ok\n", "values": {"0": [0.0] * 16}})
    assert_error(r, 400, "name", "vector name")
    # a safetensors file whose embedded metadata has the wrong types: refused at upload, not at use
    from safetensors.torch import save_file

    for meta in ({"steerserve": json.dumps({"name": 3})}, {"steerserve": json.dumps({"metadata": ["x"]})},
                 {"steerserve": json.dumps({"metadata": {"model": "llama"}})},
                 {"steerserve": json.dumps({"metadata": {"hidden_norms": {"0": "big"}}})},
                 {"steerserve": "{not json"}):
        path = tmp_path / "v.safetensors"
        save_file({"layer.0": torch.zeros(16)}, str(path), metadata=meta)
        r = httpx.post(url + "/v1/steering/vectors", data={"name": "m"},
                       files={"file": ("v.safetensors", path.read_bytes())})
        assert_error(r, 400, words="metadata")
    good = httpx.post(url + "/v1/steering/vectors", json={"name": "m", "values": {"0": [1.0] * 16}})
    assert good.status_code == 201
    gguf = httpx.get(url + "/v1/steering/vectors/m/gguf")
    assert_error(gguf, 400, "layers", "only layer 0")


def test_bodies_too_large_or_too_slow(server):
    url, _ = server
    big = json.dumps({"model": "fake-model", "prompt": "x" * 70_000}).encode()
    assert_error(httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"}),
                 413, words="larger than")

    def chunks():
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    chunked = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(chunked, 413, words="larger than")  # no Content-Length: counted as it streams in
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # a body that trickles in
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{")
        t0 = time.monotonic()
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5
    assert post(url, "/v1/completions", {"model": "fake-model", "prompt": "hi"}).status_code == 200


def test_templates_cannot_blow_up_the_prompts(make_fake, tmp_path):
    from tests.fakes import FakeAnalysisBackend

    backend = make_fake(FakeAnalysisBackend)
    with live_server(backend, vector_dir=tmp_path) as (url, _):
        r = post(url, "/v1/evaluations", {
            "type": "truthfulqa", "template": "{question:>99999999}",
            "questions": [{"question": "q", "best_answer": "a", "incorrect_answers": ["b"]}]})
        assert_error(r, 400, "template", "format spec")


def test_a_huge_prompt_tokenizes_off_the_event_loop(make_fake, tmp_path):
    """While a near-limit prompt is being tokenized, the probes answer at once."""
    import threading

    fake = make_fake()
    with live_server(fake, vector_dir=tmp_path, max_prompt_chars=3_000_000) as (url, _):
        body = {"model": "fake-model", "prompt": "Hello world, how are you? " * 110_000, "max_tokens": 1}
        done = threading.Event()

        def big() -> None:
            httpx.post(url + "/tokenize", json={"model": "fake-model", "prompt": body["prompt"]}, timeout=120)
            done.set()

        t = threading.Thread(target=big)
        t0 = time.monotonic()
        t.start()
        slowest = 0.0
        while not done.is_set() and time.monotonic() - t0 < 60:
            t1 = time.monotonic()
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            slowest = max(slowest, time.monotonic() - t1)
            time.sleep(0.05)
        t.join(120)
        tokenize_seconds = time.monotonic() - t0
        assert tokenize_seconds > 0.5, "the prompt was too small to tell"
        # on the event loop, a probe would wait for the whole tokenisation; off it, for a scheduling slice
        assert slowest < tokenize_seconds / 4, (slowest, tokenize_seconds)
