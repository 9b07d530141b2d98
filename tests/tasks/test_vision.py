"""Model work with images on tiny vision-language models: packed scoring, attribution over text and image tokens,
GrAInS and CAA from image examples, sweeps and the TruthfulQA-style evaluation, each with the image actually
passed (checked against the models' own Hugging Face forward with the pixels)."""

from __future__ import annotations

import pytest
import torch

from steering.backends.hf import run_job
from steering.datasets import PreferenceExample, TruthfulQAItem
from steering.errors import InvalidRequestError
from steering.spec import SteeringApplication, SteeringSpec
from steering.tasks import activations
from steering.tasks import attribution as attr
from steering.tasks.builders import BuildRequest, SweepConfig, build, encode, sweep
from steering.tasks.builders.registry import BuilderParams
from steering.tasks.evaluation import QAFormat, TruthfulQARequest, evaluate_truthfulqa
from steering.tasks.evaluation.conditions import condition
from steering.tasks.scoring import score_answers
from tests.tiny import data_url, random_image

FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl", "gemma3"]


def model_logprob(lm, ids, placed, answer):
    """Reference: summed log P(answer | prompt with its image) from the model's own forward with the pixels."""
    ii = torch.tensor([ids + answer])
    kw = {"input_ids": ii, "attention_mask": torch.ones_like(ii), **{k: torch.cat([im.tensors[k] for im in placed])
                                                                      for k in placed[0].tensors}}
    if lm.vision.family == "gemma3":
        kw["token_type_ids"] = (ii == lm.vision.image_token_id).long()
    if lm.vision.family in ("qwen2_vl", "qwen2_5_vl"):
        kw["mm_token_type_ids"] = (ii == lm.vision.image_token_id).int()
    with torch.no_grad():
        lp = lm.model(**kw).logits[0].double().log_softmax(-1)
    P = len(ids)
    return float(lp[P - 1: P - 1 + len(answer)].gather(-1, torch.tensor(answer).unsqueeze(-1)).sum())


def prompt(lm, image, text="What is in the picture?"):
    return lm.inputs.encode_prompt_images(text, [image], "chat")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_scoring_with_images_equals_the_models_own_forward(vlm, images, family):
    lm = vlm(family)
    ids, placed = prompt(lm, images(1))
    answers = [lm.inputs.encode_continuation(a) for a in ("a red cat", "the sea at night")]
    text_ids = lm.inputs.encode_prompt("Hello there", "chat")
    scored = run_job(lambda ctx: score_answers(ctx, [(ids, answers), (text_ids, answers)], images=[placed, ()]), lm)
    for a, got in zip(answers, scored[0].logprobs, strict=True):
        assert got == pytest.approx(model_logprob(lm, ids, placed, a), abs=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_integrated_gradients_attribute_image_tokens_with_the_image_passed(vlm, images, family):
    lm = vlm(family)
    ids, placed = prompt(lm, images(2))
    target = lm.inputs.encode_continuation("a red cat")
    res = attr.attribute(lm, attr.AttributionRequest(ids, attr.AttributionTarget.continuation(target),
                                                     "integrated_gradients", {"n_steps": 64, "baseline": "eos"},
                                                     images=placed))
    comp = res.info["completeness"]
    assert comp["f_input"][0] == pytest.approx(model_logprob(lm, ids, placed, target), abs=1e-3)
    assert abs(comp["delta"][0]) < 0.05 * abs(comp["f_input"][0] - comp["f_baseline"][0])
    [grid] = res.image_grids()
    assert (grid["rows"], grid["columns"]) == placed[0].grid and len(grid["scores"]) == grid["rows"]
    assert all(len(r) == grid["columns"] for r in grid["scores"])
    assert sum(abs(x) for r in grid["scores"] for x in r) > 0
    assert not any(res.special[p] for p in placed[0].positions)  # image tokens rank with the text
    occl = attr.attribute(lm, attr.AttributionRequest(ids, attr.AttributionTarget.continuation(target), "occlusion",
                                                      {"mode": "replace"}, images=placed))
    assert any(occl.totals[p] != 0 for p in placed[0].positions)
    if family == "qwen2_vl":  # removing a token would move the multimodal rotary positions
        with pytest.raises(InvalidRequestError, match="replace"):
            attr.attribute(lm, attr.AttributionRequest(ids, attr.AttributionTarget.continuation(target),
                                                       "occlusion", {"mode": "remove"}, images=placed))


def _image_examples(n=4):
    words = [("bright and good", "dark and bad"), ("happy", "sad"), ("a calm sea", "a storm"), ("yes", "no")]
    return [PreferenceExample("Describe the picture.", *words[i % 4], image=data_url(random_image(10 + i)))
            for i in range(n)]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_grains_from_image_examples_chooses_across_text_and_image_and_masks_only_its_choice(vlm, family,
                                                                                          monkeypatch):
    lm = vlm(family)
    seen = {}
    original = activations.collect

    def spy(ctx, rows, groups, layers=None, stage="activations", replace=None):
        seen["rows"], seen["replace"] = rows, replace
        return (yield from original(ctx, rows, groups, layers, stage, replace))

    monkeypatch.setattr(activations, "collect", spy)
    examples = _image_examples()
    res = build(lm, BuildRequest(examples, "grains", {"k": 50, "n_steps": 4, "prompt_format": "chat",
                                                      "replacement": "pad"}))
    info = res.vector.metadata["info"]
    assert info["chosen_parts"]["pos"]["image"] > 0  # top k across text and image tokens
    data = encode(lm, examples, BuilderParams(prompt_format="chat"))
    swaps = seen["replace"][0]
    check_masking(lm, data, info["selections"], seen["rows"], swaps, "pad")
    seen.clear()
    deleted = build(lm, BuildRequest(examples, "grains", {"k": 50, "n_steps": 4, "prompt_format": "chat",
                                                          "replacement": "delete"}))
    check_masking(lm, data, deleted.vector.metadata["info"]["selections"], seen["rows"], seen["replace"][0],
                  "delete")
    caa = build(lm, BuildRequest(examples, "caa", {"prompt_format": "chat"}))
    assert caa.vector.layers == res.vector.layers


def check_masking(lm, data, selections, rows, swaps, replacement):
    """Each masked sequence differs from its original only at the chosen tokens: chosen text tokens replaced (or
    deleted, the images' positions moving with them), chosen image tokens given the baseline's embedding."""
    for k, (e, sel) in enumerate(zip(data, selections, strict=True)):
        original_row, masked_row = rows[2 * k], rows[2 * k + 1]
        assert original_row[0].images == e.images and swaps[2 * k] == []  # the originals are not touched
        img = set(e.images[0].positions)
        for which, (seg, seq) in enumerate(zip(masked_row, (e.prompt + e.preferred, e.prompt + e.dispreferred))):
            chosen = [i for i, _ in sel["pos_at" if which == 0 else "neg_at"]]
            text = [i for i in chosen if i not in img]
            if replacement == "delete":
                kept = [t for i, t in enumerate(seq) if i not in text]
                assert list(seg.ids) == kept
                moved = [p - sum(1 for i in text if i < p) for p in e.images[0].positions]
                assert list(seg.images[0].positions) == moved
                assert all(seg.ids[p] == lm.vision.image_token_id for p in moved)
                new_index = {p: p - sum(1 for i in text if i < p) for p in img}
            else:
                differs = [i for i, (a, b) in enumerate(zip(seg.ids, seq, strict=True)) if a != b]
                assert differs == [i for i in text if seq[i] != lm.pad_id]  # only the chosen text tokens
                assert seg.images == e.images  # replaced in place: the image stays where it was
                new_index = {p: p for p in img}
            offset = 0 if which == 0 else len(masked_row[0].ids)
            swapped = [i - offset for i in swaps[2 * k + 1] if (i >= len(masked_row[0].ids)) == (which == 1)]
            assert sorted(swapped) == sorted(new_index[i] for i in chosen if i in img)  # the baseline's embedding


def test_sweeps_and_evaluations_score_image_examples_with_image_positions(vlm):
    lm = vlm("llava")
    examples = _image_examples(3)
    vec = build(lm, BuildRequest(examples, "caa", {"prompt_format": "chat"})).vector
    result = sweep(lm, vec, examples, SweepConfig(scales=[0.5], layers=[1, 2], positions=["image", "all"]))
    assert {r["positions"] for r in result.table} == {"image", "all"}
    data = encode(lm, examples, BuilderParams(prompt_format="chat"))
    plain = [model_logprob(lm, e.prompt, e.images, e.preferred) - model_logprob(lm, e.prompt, e.images,
                                                                                   e.dispreferred) for e in data]
    assert result.baseline["accuracy"] == sum(m > 0 for m in plain) / len(plain)
    with pytest.raises(InvalidRequestError, match="no image"):
        sweep(lm, vec, [PreferenceExample("Describe it.", "yes", "no")], SweepConfig(scales=[0.5], layers=[1],
                                                                                     positions="image"))
    items = [TruthfulQAItem.from_preference(e) for e in examples]
    spec = SteeringSpec([SteeringApplication(vec, 8.0, layers=[1], positions="image")])
    report = evaluate_truthfulqa(lm, TruthfulQARequest(items, [condition(spec, label="img")],
                                                       QAFormat("{question}", "chat")))
    base, steered = report.conditions
    assert base.metrics["binary"] == pytest.approx(result.baseline["accuracy"])  # binary = the sweep's accuracy
    assert steered.metrics["margin"] != base.metrics["margin"]  # steering the image tokens moved the answers
    with pytest.raises(InvalidRequestError, match="no image"):
        evaluate_truthfulqa(lm, TruthfulQARequest([TruthfulQAItem("Is it?", "yes", (), ("no",))],
                                                  [condition(spec, label="img")], QAFormat("{question}", "chat")))
