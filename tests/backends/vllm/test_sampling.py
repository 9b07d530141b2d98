"""The OpenAI sampling fields through the vLLM backend: penalties and logit_bias give the Hugging Face engine's
greedy tokens, a JSON schema constrains the output, prompt logprobs (also with ``max_tokens`` 0) equal the Hugging
Face engine's, under steering too; a bad grammar is refused at submission. One engine start for the module."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from steering.engine.types import GenerationRequest
from steering.errors import InvalidRequestError
from steering.sampling import SamplingParams, StructuredOutput
from steering.spec import SteeringSpec
from tests.backends.vllm.conftest import ENGINE, PROMPTS, env
from tests.backends.vllm.test_engine import app

pytestmark = pytest.mark.vllm

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def backend(vllm_model, vllm_cache):
    from steering.backends.vllm.engine import VLLMBackend, VLLMConfig

    with env(VLLM_CACHE_ROOT=str(vllm_cache / "sampling")):
        b = VLLMBackend(VLLMConfig(model=str(vllm_model), enforce_eager=True, **ENGINE)).start()
    yield b
    b.shutdown()


def both(backend, hf_ref, prompt, sampling, steering=None):
    return [e.submit(GenerationRequest(list(prompt), sampling, steering)) for e in (backend, hf_ref)]


def test_penalties_and_logit_bias_are_honoured_as_in_the_hf_engine(backend, hf_ref):
    prompt = PROMPTS[3]  # its greedy continuation repeats tokens, so every penalty changes it
    plain = backend.generate(list(prompt), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    forced = backend.generate(list(prompt), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                           logit_bias={42: 100.0}))
    assert forced.token_ids == [42] * 4
    cases = [dict(frequency_penalty=1.5), dict(presence_penalty=2.0), dict(repetition_penalty=3.0),
             dict(logit_bias={plain.token_ids[0]: -100.0, 7: 3.0}, frequency_penalty=0.5)]
    changed = 0
    for kw in cases:
        sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, **kw)
        ours, ref = (h.result().token_ids for h in both(backend, hf_ref, prompt, sp))
        assert ours == ref, kw
        changed += ours != plain.token_ids
    assert changed >= 3  # the penalties did something


def test_a_json_schema_constrains_the_output_under_steering(backend):
    steer = SteeringSpec([app(1, scale=2.0)])
    for st in (None, steer):
        res = backend.generate(list(PROMPTS[0]), SamplingParams(max_tokens=40, temperature=0,
                                                                structured=StructuredOutput(json_schema=SCHEMA)), st)
        assert res.finish_reason == "stop", res.text
        jsonschema.validate(json.loads(res.text), SCHEMA)
    with pytest.raises(InvalidRequestError) as err:
        backend.submit(GenerationRequest(list(PROMPTS[0]), SamplingParams(
            structured=StructuredOutput(json_schema={"type": "no-such-type"}))))
    assert err.value.param == "response_format"


@pytest.mark.parametrize("steered", [False, True])
def test_prompt_logprobs_equal_the_hf_engines_and_max_tokens_zero_scores_only(backend, hf_ref, steered):
    steer = SteeringSpec([app(2, scale=3.0)]) if steered else None
    prompt = PROMPTS[3]  # 45 tokens: prefilled in two chunks by vLLM
    for max_tokens in (0, 3):
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, prompt_logprobs=2)
        ours, ref = ([o for o in h] for h in both(backend, hf_ref, prompt, sp, steer))
        a, b = ours[0].prompt_logprobs, ref[0].prompt_logprobs
        assert a is not None and len(a) == len(prompt) and a[0] is None
        assert [e.token_id for e in a[1:]] == list(prompt[1:])
        assert torch.allclose(torch.tensor([e.logprob for e in a[1:]]), torch.tensor([e.logprob for e in b[1:]]),
                              atol=2e-3)
        assert [len(e.top) for e in a[1:]] == [2] * (len(prompt) - 1)
        assert sum(len(o.token_ids) for o in ours) == max_tokens
        assert ours[-1].finish_reason == "length"
