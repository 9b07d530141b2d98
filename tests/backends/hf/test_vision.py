"""Vision-language models on the Hugging Face backend: images in prompts, through the engine, against the models'
own Hugging Face forward and generate."""

from __future__ import annotations

import pytest
import torch

from steering.backends.hf import EngineConfig, HFEngine
from steering.backends.hf.runner import ModelRunner
from steering.engine import GenerationRequest
from steering.errors import InvalidRequestError, SteeringValidationError
from steering.sampling import SamplingParams
from steering.spec import SteeringApplication, SteeringSpec
from steering.vectors import SteeringVector


def chat(lm, images, text="What is this?"):
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return lm.inputs.encode_chat_prompt([{"role": "user", "content": content}])


def hf_inputs(lm, ids, placed):
    """The model's own forward/generate inputs for a prompt (what its processor would give)."""
    ii = torch.tensor([ids])
    kw: dict = {"input_ids": ii, "attention_mask": torch.ones_like(ii)}
    for key in placed[0].tensors:
        kw[key] = torch.cat([im.tensors[key] for im in placed])
    family = lm.vision.family
    if family == "gemma3":
        kw["token_type_ids"] = (ii == lm.vision.image_token_id).long()
    if family in ("qwen2_vl", "qwen2_5_vl"):
        kw["mm_token_type_ids"] = (ii == lm.vision.image_token_id).int()
    return kw


def greedy(tokens=10):
    return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_greedy_generation_with_an_image_equals_the_models_own_generate(vlm, images, family):
    lm = vlm(family)
    ids, placed = chat(lm, [images(1)])
    assert [len(im.positions) for im in placed] == [placed[0].grid[0] * placed[0].grid[1]]
    with torch.no_grad():
        ref = lm.model.generate(**hf_inputs(lm, ids, placed), max_new_tokens=10, do_sample=False)[0, len(ids):]
    with HFEngine(lm, EngineConfig(max_batch_size=4)).start() as eng:
        got = eng.submit(GenerationRequest(ids, greedy(), images=placed)).result().token_ids
    assert got == ref.tolist()


def test_gemma3_images_attend_both_ways_and_the_prefill_is_the_models_own(vlm, images):
    lm = vlm("gemma3")
    ids, placed = chat(lm, [images(2)])
    kw = hf_inputs(lm, ids, placed)
    with torch.no_grad():
        want = lm.model(**kw).logits[0, -1].log_softmax(-1)
        causal = lm.model(**{**kw, "token_type_ids": torch.zeros_like(kw["token_type_ids"])}).logits[0, -1]
    assert (want - causal.log_softmax(-1)).abs().max() > 1e-3  # bidirectional attention matters here
    with HFEngine(lm, EngineConfig(max_batch_size=2)).start() as eng:
        out = eng.submit(GenerationRequest(ids, SamplingParams(max_tokens=1, temperature=0.0, logprobs=True,
                                                               top_logprobs=5), images=placed)).result()
    top = torch.topk(want, 5)
    assert out.token_ids[0] == int(top.indices[0])
    assert out.logprobs[0].logprob == pytest.approx(float(top.values[0]), abs=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl", "gemma3"])
@pytest.mark.parametrize("kv", [True, False], ids=["kv-cache", "no-cache"])
def test_batched_with_other_images_and_text_rows_equals_alone(vlm, images, family, kv):
    lm = vlm(family)
    prompts = [chat(lm, [images(1)]), chat(lm, [images(3, (24, 48)), images(4)], "Compare them."),
               (lm.inputs.encode_chat([{"role": "user", "content": "Hello there"}]), ())]
    with HFEngine(lm, EngineConfig(max_batch_size=4, use_kv_cache=kv)).start() as eng:
        alone = [eng.submit(GenerationRequest(ids, greedy(), images=im)).result().token_ids for ids, im in prompts]
        handles = [eng.submit(GenerationRequest(ids, greedy(), images=im)) for ids, im in prompts]
        together = [h.result().token_ids for h in handles]
    assert together == alone


def test_image_positions_steer_only_the_image_tokens(vlm, images):
    lm = vlm("qwen2_vl")
    ids, placed = chat(lm, [images(1)], "Describe the picture please.")
    vec = SteeringVector({1: torch.randn(lm.hidden_size)})
    with HFEngine(lm, EngineConfig(max_batch_size=2)).start() as eng:
        resolved = eng.check_request(GenerationRequest(ids, greedy(), SteeringSpec(
            [SteeringApplication(vec, 4.0, positions="image")]), images=placed))
        assert resolved.applications[0].positions == placed[0].positions
        with pytest.raises(SteeringValidationError, match="no image"):
            eng.check_request(GenerationRequest(ids[:5], greedy(), SteeringSpec(
                [SteeringApplication(vec, 4.0, positions="image")])))
    runner = ModelRunner(lm)
    seen: dict[str, torch.Tensor] = {}
    try:
        n = len(ids)
        pos = torch.arange(n).unsqueeze(0)
        embeds = runner.images.embed(torch.tensor([ids]), [placed])
        rope, _ = runner.images.rope(pos, [(ids, placed)])
        for name, apps in (("plain", None), ("steered", [runner.device_steering(resolved.applications)])):
            def capture(layer, h, name=name):
                if layer == 1:
                    seen[name] = h[0].clone()

            with torch.no_grad():
                runner.forward(positions=pos, prompt_lens=torch.tensor([n]), inputs_embeds=embeds,
                               keep=runner.causal(pos, n), steering=apps, capture=capture, rope_positions=rope)
    finally:
        runner.close()
    changed = (seen["steered"] != seen["plain"]).any(-1).nonzero().flatten().tolist()
    assert changed == list(placed[0].positions)


def test_telemetry_of_image_steering_counts_the_image_tokens_alone(vlm, images):
    """Steering telemetry through an image prompt's prefill (input embeddings, multimodal rotary positions) and
    decode: ``image`` positions steer exactly the image tokens at the vector's layer, and nothing after them."""
    lm = vlm("qwen2_vl")
    ids, placed = chat(lm, [images(2)], "Describe the picture please.")
    vec = SteeringVector({1: torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(3))})
    spec = SteeringSpec([SteeringApplication(vec, 4.0, positions="image", normalize=True)])
    with HFEngine(lm, EngineConfig(max_batch_size=2)).start() as eng:
        res = eng.submit(GenerationRequest(ids, greedy(4), spec, images=placed)).result()
    tel = res.steering_telemetry
    assert tel is not None
    assert tel.layer_tokens == {1: len(placed[0].positions)}
    assert tel.relative_change > 0


def test_a_text_model_refuses_images_and_a_vlm_refuses_placeholders_written_in_text(tiny_lm, vlm, images):
    with pytest.raises(InvalidRequestError, match="does not take images"):
        chat(tiny_lm, [images(0)])
    lm = vlm("llava")
    with pytest.raises(InvalidRequestError, match="placeholder"):
        chat(lm, [images(0)], "look: <image>")
    with HFEngine(tiny_lm, EngineConfig(max_batch_size=2)).start() as eng:
        _, placed = chat(lm, [images(0)])
        with pytest.raises(InvalidRequestError, match="without images"):
            eng.submit(GenerationRequest([1, 2, 3] * 10, greedy(), images=placed))
