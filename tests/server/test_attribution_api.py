"""POST /v1/attributions over real HTTP against a live server on the tiny model."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from steering.backends.hf import EngineConfig, HFEngine
from steering.sampling import SamplingParams
from steering.tasks.attribution import AttributionRequest as CoreRequest
from steering.tasks.attribution import AttributionTarget, attribute, method_names
from tests.live import live_server, metrics, vec_values

PROMPT = "The quick brown fox jumps over"
MSGS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(tiny_lm):
    eng = HFEngine(tiny_lm, EngineConfig(max_batch_size=8, job_chunk_tokens=256)).start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def url(engine, tmp_path_factory):
    with live_server(engine, vector_dir=tmp_path_factory.mktemp("vectors"),
                     attribution_max_input_tokens=64) as (u, _):
        yield u


def post(url: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(url + "/v1/attributions", json=body, timeout=timeout)


def test_continuation_matches_library(url, tiny_lm):
    body = {"prompt": PROMPT, "target": " the lazy dog", "method": "integrated_gradients",
            "params": {"n_steps": 16}, "top_k": 3}
    r = post(url, body)
    assert r.status_code == 200, r.text
    out = r.json()
    tok = tiny_lm.tokenizer
    ids = tiny_lm.inputs.encode_text(PROMPT)
    target = tok(" the lazy dog", add_special_tokens=False)["input_ids"]
    ref = attribute(tiny_lm, CoreRequest(ids, AttributionTarget.continuation(target), "integrated_gradients",
                                         {"n_steps": 16}))
    assert [t["id"] for t in out["input_tokens"]] == ids
    assert [t["text"] for t in out["input_tokens"]] == [tok.decode([i]) for i in ids]
    scores = torch.tensor([t["score"] for t in out["input_tokens"]])
    torch.testing.assert_close(scores, ref.scores[0], rtol=1e-5, atol=1e-6)
    assert [t["id"] for t in out["target"]] == target
    assert out["objective"][0] == pytest.approx(sum(t["logprob"] for t in out["target"]), abs=1e-4)
    assert out["target_type"] == "continuation" and out["reduction"] == "sum" and not out["generated_target"]
    assert out["params"] == {"n_steps": 16, "method": "gausslegendre", "baseline": "zeros",
                             "internal_batch_size": None}
    top = out["top_positive"]
    assert len(top) <= 3 and all(t["score"] > 0 for t in top)
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert top[0]["score"] == max(scores.tolist())
    assert all(t["score"] < 0 for t in out["top_negative"])
    cost = out["cost"]
    assert cost["forward_passes"] >= 2 and cost["backward_passes"] >= 1 and cost["compute_seconds"] > 0
    assert cost["seconds"] >= cost["compute_seconds"] * 0.5 and cost["queue_seconds"] >= 0
    assert set(out["info"]["completeness"]) == {"f_input", "f_baseline", "sum_of_attributions", "delta"}


def test_per_token_matrix_from_chat_messages(url, tiny_lm):
    r = post(url, {"messages": MSGS, "target": "Paris is", "per_token": True, "method": "occlusion"})
    assert r.status_code == 200, r.text
    out = r.json()
    ids = tiny_lm.inputs.encode_chat(MSGS)
    matrix = torch.tensor(out["matrix"])
    assert matrix.shape == (len(out["target"]), len(ids))
    torch.testing.assert_close(matrix.sum(0), torch.tensor([t["score"] for t in out["input_tokens"]]),
                               rtol=1e-5, atol=1e-5)
    special = [t["special"] for t in out["input_tokens"]]
    assert special[0] and not all(special)  # <|im_start|> is flagged, the question's words are not
    ranked = {t["position"] for t in out["top_positive"] + out["top_negative"]}
    assert not any(special[p] for p in ranked)
    assert out["reduction"] is None and out["params"] == {"mode": "remove"}


def test_contrast(url):
    r = post(url, {"prompt": PROMPT, "contrast": {"preferred": " the lazy dog", "dispreferred": " a happy cat"},
                   "method": "input_x_gradient", "reduction": "l2"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["target_type"] == "contrastive" and out["target"] is None
    lp_pref = sum(t["logprob"] for t in out["preferred"])
    lp_dis = sum(t["logprob"] for t in out["dispreferred"])
    assert out["objective"][0] == pytest.approx(lp_pref - lp_dis, abs=1e-4)
    assert out["reduction"] == "l2"


def test_generated_target_is_the_greedy_completion(url, engine, tiny_lm):
    r = post(url, {"prompt": PROMPT, "max_tokens": 5, "method": "saliency", "per_token": True})
    assert r.status_code == 200, r.text
    out = r.json()
    greedy = engine.generate(tiny_lm.inputs.encode_text(PROMPT), SamplingParams(max_tokens=5, temperature=0))
    assert out["generated_target"] and [t["id"] for t in out["target"]] == greedy.token_ids
    assert len(out["matrix"]) == len(greedy.token_ids)
    assert out["cost"]["generation_seconds"] > 0


def test_steered_attribution(url, tiny_lm):
    steering = {"vectors": [{"values": vec_values(tiny_lm, 3, [1]), "scale": 8}]}
    plain = post(url, {"prompt": PROMPT, "target": " the lazy dog", "method": "occlusion"}).json()
    steered = post(url, {"prompt": PROMPT, "target": " the lazy dog", "method": "occlusion",
                         "steering": steering}).json()
    assert steered["steering"][0]["scale"] == 8 and plain["steering"] is None
    assert steered["objective"][0] != pytest.approx(plain["objective"][0])


def test_methods_listing(url):
    r = httpx.get(url + "/v1/attributions/methods")
    assert r.status_code == 200
    data = {m["name"]: m for m in r.json()["data"]}
    assert sorted(data) == method_names()
    assert data["integrated_gradients"]["gradient"] and not data["occlusion"]["gradient"]
    assert data["reagent"]["params"]["properties"]["keep_top_n"]["default"] == 5


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": PROMPT, "target": "x", "method": "shap"}, "method", "integrated_gradients"),
    ({"prompt": PROMPT, "target": "x", "params": {"nsteps": 8}}, "params.nsteps", "n_steps"),
    ({"prompt": PROMPT, "target": "x", "params": {"n_steps": 513}}, "params.n_steps", "at most 512"),
    ({"prompt": PROMPT, "target": "x", "method": "reagent", "params": {"num_probes": 65}}, "params.num_probes",
     "at most 64"),
    ({"prompt": PROMPT, "target": "x", "method": "occlusion", "reduction": "l2"}, "reduction", "gradient"),
    ({"prompt": PROMPT, "target": "x", "n_steps": 8}, "n_steps", "unknown field"),
    ({"prompt": PROMPT, "messages": MSGS, "target": "x"}, None, "exactly one"),
    ({"prompt": PROMPT, "contrast": {"preferred": "a", "dispreferred": "b"}, "per_token": True}, None,
     "per_token"),
    ({"prompt": PROMPT, "target": "x", "max_tokens": 4}, None, "max_tokens"),
    ({"prompt": "word " * 80, "target": "x"}, "prompt", "at most 64"),
    ({"prompt": PROMPT, "target": "x", "model": "gpt-4"}, "model", "does not exist"),
    ({"prompt": PROMPT, "target": "x", "steering": {"vectors": [{"nme": "v"}]}}, None, "unknown field"),
])
def test_bad_requests(url, body, param, words):
    r = post(url, body)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param
    assert words in err["message"]


def test_attribution_does_not_block_streaming(tiny_lm, tmp_path):
    """A long attribution (many chunks) and a streamed chat at once: tokens keep flowing while it runs."""
    eng = HFEngine(tiny_lm, EngineConfig(job_chunk_tokens=48)).start()
    try:
        with live_server(eng, vector_dir=tmp_path) as (url, _):
            result: dict = {}

            def run_attribution():
                result["r"] = post(url, {"prompt": PROMPT, "target": " the lazy dog", "per_token": True,
                                         "params": {"n_steps": 512}})
                result["t"] = time.monotonic()

            th = threading.Thread(target=run_attribution)
            th.start()
            while eng.stats().jobs == 0:
                time.sleep(0.001)
            body = {"model": tiny_lm.name, "prompt": "Hello", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                frames = [line for line in r.iter_lines() if line.startswith("data: ")]
            stream_done = time.monotonic()
            assert eng.stats().jobs == 1, "the attribution should still be running"
            th.join(120)
            assert frames[-1] == "data: [DONE]" and '"finish_reason":"length"' in frames[-2]
            assert result["r"].status_code == 200 and result["t"] > stream_done
            values = metrics(url)
            key = 'steerserve_attribution_requests_total{"method": "integrated_gradients", "status": "ok"}'
            assert values[key] == 1
            assert values['steerserve_num_jobs{}'] == 0
    finally:
        eng.shutdown()
