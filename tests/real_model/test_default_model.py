"""The embedded default model, SmolLM2-135M-Instruct (marked real_model; run in CI)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from steering.backends.hf import HFEngine
from steering.backends.hf.loading import _COMPLETE_MARKER, default_gguf_path
from steering.engine import GenerationRequest
from steering.sampling import SamplingParams
from steering.spec import SteeringSpec
from steering.vectors import SteeringVector

pytestmark = pytest.mark.real_model


def test_default_model_identity(real_lm):
    assert real_lm.name == "SmolLM2-135M-Instruct"
    assert real_lm.num_layers == 30 and real_lm.hidden_size == 576
    assert type(real_lm.model).__name__ == "LlamaForCausalLM"
    text = real_lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_chat_answer_and_steering_changes_it(real_lm):
    ids = real_lm.inputs.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    sp = SamplingParams(max_tokens=24, temperature=0)
    with HFEngine(real_lm).start() as engine:
        plain = engine.generate(ids, sp)
        assert "Paris" in plain.text and plain.finish_reason == "stop"
        g = torch.Generator().manual_seed(0)
        vec = SteeringVector({l: torch.randn(576, generator=g) for l in range(8, 16)})
        steered = engine.generate(ids, sp, SteeringSpec.single(vec, scale=40.0, normalize=True))
        assert steered.token_ids != plain.token_ids
        # the unsteered request inside a batch of steered ones is unchanged
        handles = [engine.submit(GenerationRequest(ids, sp, SteeringSpec.single(vec, scale=40.0 + i)))
                   for i in range(3)]
        handles.append(engine.submit(GenerationRequest(ids, sp)))
        results = [h.result() for h in handles]
        assert results[-1].token_ids == plain.token_ids


def test_concurrent_conversion_into_fresh_cache(tmp_path):
    """Two processes converting the GGUF at once into the same cache both succeed; one copy remains."""
    code = ("import sys; from pathlib import Path; "
            "from steering.backends.hf.loading import convert_gguf, default_gguf_path;"
            "print(convert_gguf(default_gguf_path(), Path(sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    models = list((tmp_path / "models").iterdir())
    assert len(models) == 1 and (models[0] / _COMPLETE_MARKER).exists()
    assert (models[0] / "model.safetensors").stat().st_size > 100_000_000
    assert default_gguf_path().suffix == ".gguf"


def test_openai_sdk_against_default_model(real_lm, tmp_path):
    import openai

    from tests.live import live_server

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    g = torch.Generator().manual_seed(1)
    values = {l: torch.randn(576, generator=g).tolist() for l in (10, 11, 12)}
    with HFEngine(real_lm).start() as engine, live_server(engine, vector_dir=tmp_path) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].id == "SmolLM2-135M-Instruct"
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=20,
                                           temperature=0)
        assert "Paris" in r.choices[0].message.content
        plain = engine.generate(real_lm.inputs.encode_chat(msgs), SamplingParams(max_tokens=20, temperature=0))
        assert r.choices[0].message.content == plain.text
        stream = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=20, temperature=0, stream=True,
            extra_body={"steering": {"vectors": [{"values": values, "scale": 60, "normalize": True,
                                                  "positions": "generated"}]}})
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text and text != r.choices[0].message.content


def test_structured_tools_and_echo_on_default_model(real_lm, tmp_path):
    """The default model (its 49152-token vocabulary through llguidance, its tool-less chat template through the
    Hermes preamble): a json_schema answer parses and validates, a required tool call names the tool with valid
    arguments, and echo's prompt logprobs equal a direct forward's."""
    import json

    import openai

    from tests.live import live_server

    msgs = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                               "country": {"type": "string", "maxLength": 40}},
              "required": ["city", "country"], "additionalProperties": False}
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                "parameters": {"type": "object", "properties": {
                                                    "city": {"type": "string", "maxLength": 40}},
                                                    "required": ["city"]}}}
    with HFEngine(real_lm).start() as engine, live_server(engine, vector_dir=tmp_path) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=60, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}})
        answer = json.loads(r.choices[0].message.content)
        assert set(answer) == {"city", "country"} and "Paris" in answer["city"]
        call = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "What's the weather in Rome?"}],
            max_tokens=60, temperature=0, tools=[weather], tool_choice="required").choices[0]
        assert call.finish_reason == "tool_calls"
        assert call.message.tool_calls[0].function.name == "get_weather"
        assert "city" in json.loads(call.message.tool_calls[0].function.arguments)
        ids = real_lm.inputs.encode_text("The capital of France is Paris")
        echo = client.completions.create(model="SmolLM2-135M-Instruct", prompt=ids, max_tokens=0, echo=True,
                                         logprobs=1).choices[0].logprobs.token_logprobs
        with torch.no_grad():
            lp = torch.log_softmax(real_lm.model(torch.tensor([ids])).logits[0].float(), -1)
        want = [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]
        assert echo[0] is None and echo[1:] == pytest.approx(want, abs=1e-3)


def test_attribution_on_default_model(real_lm, tmp_path):
    """Over HTTP on the default model: the answer 'Paris' is driven by 'France' (occlusion), IG's completeness
    report is present, and the per-token matrix of the model's own answer has a row per generated token."""
    import httpx

    from tests.live import live_server

    prompt = "The capital of France is"
    with HFEngine(real_lm).start() as engine, live_server(engine, vector_dir=tmp_path) as (url, _):
        r = httpx.post(url + "/v1/attributions", json={"prompt": prompt, "target": " Paris", "method": "occlusion",
                                                       "top_k": 3}, timeout=300)
        assert r.status_code == 200, r.text
        out = r.json()
        assert any("France" in t["text"] for t in out["top_positive"]), out["top_positive"]
        ig = httpx.post(url + "/v1/attributions", json={"prompt": prompt, "target": " Paris", "top_k": 3,
                                                        "params": {"n_steps": 16}}, timeout=300).json()
        comp = ig["info"]["completeness"]
        assert comp["sum_of_attributions"][0] == pytest.approx(sum(t["score"] for t in ig["input_tokens"]),
                                                               rel=1e-4, abs=1e-4)
        gen = httpx.post(url + "/v1/attributions", json={"messages": [{"role": "user", "content": "Hi!"}],
                                                         "max_tokens": 4, "per_token": True,
                                                         "method": "input_x_gradient"}, timeout=300).json()
        assert gen["generated_target"] and len(gen["matrix"]) == len(gen["target"]) <= 4
        assert gen["input_tokens"][0]["special"]  # <|im_start|>


def test_grains_build_and_sweep_on_default_model(real_lm):
    """GrAInS on a few TruthfulQA rows (building split) with a sweep on others: unit vectors for every layer,
    hidden norms growing with depth as SmolLM2's do, and a sweep that changes the unsteered scores."""
    from pathlib import Path

    from steering.datasets import load_examples
    from steering.tasks.builders import BuildRequest, SweepConfig, build

    data = Path(__file__).parents[2].parent / "shared" / "data" / "truthfulqa_dev.csv"
    if not data.exists():
        pytest.skip("../shared/data/truthfulqa_dev.csv is not beside the project")
    res = build(real_lm, BuildRequest(load_examples(data, "0-3"), "grains", {"k": 5, "n_steps": 4},
                                      validation=load_examples(data, "200-203"),
                                      sweep=SweepConfig(scales=[0.5], layers=[10, 20])))
    vec = res.vector
    assert vec.layers == list(range(30))
    assert all(abs(float(v.norm()) - 1) < 1e-4 for v in vec.values.values())
    norms = [vec.metadata["hidden_norms"][str(i)] for i in range(30)]
    assert norms[29] > 5 * norms[0]
    sel = vec.metadata["info"]["selections"]
    assert len(sel) == 4 and all(len(s["pos"]) <= 5 and len(s["neg"]) <= 5 for s in sel)
    assert len(res.sweep.table) == 2
    assert any(abs(r["margin"] - res.sweep.baseline["margin"]) > 1e-3 for r in res.sweep.table)


def test_truthfulqa_eval_agrees_with_the_sweep_baseline(real_lm):
    """TruthfulQA on the default model: binary accuracy from the evaluation equals the builders' sweep baseline on
    the same rows (two code paths, one protocol), and MC1 <= binary (MC1 also beats every other wrong answer)."""
    from pathlib import Path

    from steering.datasets import load_examples, parse_rows, read_truthfulqa
    from steering.tasks.builders import SweepConfig, sweep
    from steering.tasks.evaluation import TruthfulQARequest, evaluate_truthfulqa
    from steering.vectors import SteeringVector

    data = Path(__file__).parents[2].parent / "shared" / "data" / "truthfulqa_dev.csv"
    if not data.exists():
        pytest.skip("../shared/data/truthfulqa_dev.csv is not beside the project")
    items = read_truthfulqa(data)
    items = [items[i] for i in parse_rows("0-11", len(items))]
    rep = evaluate_truthfulqa(real_lm, TruthfulQARequest(items, [], per_question=True)).as_dict()
    base = rep["conditions"][0]
    vec = SteeringVector({5: torch.ones(576) / 24}, metadata={"hidden_norms": {"5": 1.0}})
    sw = sweep(real_lm, vec, load_examples(data, "0-11"), SweepConfig(scales=[0.0], layers=[5]))
    assert base["metrics"]["binary"] == pytest.approx(sw.baseline["accuracy"])
    assert base["metrics"]["margin"] == pytest.approx(sw.baseline["margin"], abs=1e-3)
    assert all(q["mc1"] <= q["binary"] for q in base["per_question"])
    assert 0 < base["metrics"]["mc2"] < 1


def test_sentiment_vector_shifts_vader_on_neutral_prompts(real_lm):
    """A CAA vector from the hand-written positive/negative pairs in docs/data raises the VADER score of greedy
    answers to neutral prompts, at a bounded perplexity cost (the setting chosen in docs/experiments.md)."""
    from pathlib import Path

    from steering.datasets import load_examples
    from steering.spec import SteeringSpec
    from steering.tasks.builders import BuildRequest, build
    from steering.tasks.evaluation import Condition, SteerEvalRequest, prepare_steer, relative_applications, start_steer

    docs = Path(__file__).parents[2] / "docs" / "data"
    vec = build(real_lm, BuildRequest(load_examples(docs / "sentiment_pairs.jsonl"), "caa",
                                      {"prompt_format": "chat", "layers": [10]})).vector
    vec.name = "sentiment"
    prompts = (docs / "neutral_prompts.txt").read_text().splitlines()[:6]
    cond = Condition("s", SteeringSpec(relative_applications(vec, 0.25, [10])))
    with HFEngine(real_lm).start() as engine:
        req = SteerEvalRequest(prompts, [cond], max_tokens=32, chat=True)  # as in docs/experiments.md
        rep = start_steer(engine, prepare_steer(real_lm, req)).result()
    steered = rep.as_dict()["conditions"][1]
    assert steered["versus_baseline"]["score"]["diff"] > 0.1, rep.markdown()
    assert steered["versus_baseline"]["perplexity"]["ratio"] < 2.0, rep.markdown()
