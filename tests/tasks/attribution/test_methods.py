"""Attribution methods against Captum, brute force and their own invariants; attribution as engine jobs."""

from __future__ import annotations

import time

import pytest
import torch

from steering.engine.jobs import JobCancelledError
from steering.errors import InvalidRequestError
from steering.sampling import SamplingParams
from steering.spec import SteeringSpec
from steering.tasks.attribution import (
    AttributionLimits,
    AttributionRequest,
    AttributionTarget,
    attribute,
    method_names,
)
from steering.tasks.attribution.gradients import integration_points
from steering.vectors import SteeringVector

BIG = AttributionLimits(max_n_steps=4096)


def token_logprobs(lm, prompt: list[int], cont: list[int]) -> torch.Tensor:
    """Reference: log P(cont_t | prompt, cont_<t) from a plain forward of the whole sequence."""
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0].double().log_softmax(-1)
    P = len(prompt)
    return logits[P - 1: P - 1 + len(cont)].gather(-1, torch.tensor(cont).unsqueeze(-1)).squeeze(-1)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding: even a float64 Llama computes its RMSNorms in float32."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * max(scale, 1e-3))


def run(lm, prompt, target, attribution_method="integrated_gradients", /, **params):
    reduction = params.pop("reduction", None)
    return attribute(lm, AttributionRequest(prompt, target, attribution_method, params, reduction), limits=BIG)


def test_integration_points_match_quadrature():
    for method in ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"):
        a, w = integration_points(64, method)
        assert abs(float(w.sum()) - 1) < 1e-12
        # integral of 3 a^2 over [0, 1] is 1
        assert abs(float((w * 3 * a**2).sum()) - 1) < (1e-12 if method == "gausslegendre" else 3e-2)


def test_ig_completeness(lm64, texts):
    prompt, yes, _ = texts
    res = run(lm64, prompt, AttributionTarget.continuation(yes), n_steps=128, baseline="eos")
    comp = res.info["completeness"]
    gap = comp["f_input"][0] - comp["f_baseline"][0]
    assert abs(gap) > 0.1  # a meaningful difference to explain
    assert abs(float(res.scores.sum()) - gap) < 1e-4 * max(1.0, abs(gap))
    assert abs(comp["delta"][0]) < 1e-4
    # the reported objective is the real summed log-probability of the continuation
    assert res.objective[0] == pytest.approx(float(token_logprobs(lm64, prompt, yes).sum()), abs=1e-5)


# float32 with a zero baseline and the trapezoid rule is left out: its a=0 point is the zero embedding, where
# RMSNorm's gradient is 1/sqrt(eps) and float32 rounding differs between any two batchings (float64 checks it).
@pytest.mark.parametrize(("dtype", "method", "baseline"), [
    (d, m, b) for d in ("float32", "float64") for m in ("gausslegendre", "riemann_trapezoid") for b in ("zeros", "eos")
    if (d, m, b) != ("float32", "riemann_trapezoid", "zeros")
])
def test_ig_matches_captum(tiny_lm, lm64, texts, method, baseline, dtype):
    import captum.attr as captum

    lm = tiny_lm if dtype == "float32" else lm64
    prompt, yes, _ = texts
    model, emb = lm.model, lm.model.get_input_embeddings()
    P = len(prompt)

    def f(prompt_embeds):  # the summed log-probability of `yes`, as Captum sees it
        tail = emb(torch.tensor(yes[:-1])).unsqueeze(0).expand(prompt_embeds.shape[0], -1, -1)
        logits = model(inputs_embeds=torch.cat([prompt_embeds, tail], 1)).logits[:, P - 1:].float()
        tgt = torch.tensor(yes).view(1, -1, 1).expand(prompt_embeds.shape[0], -1, 1)
        return logits.log_softmax(-1).gather(-1, tgt).squeeze(-1).sum(-1)

    x = emb(torch.tensor(prompt)).unsqueeze(0).detach()
    base = torch.zeros_like(x) if baseline == "zeros" else emb(torch.full((1, P), lm.tokenizer.eos_token_id)).detach()
    n = 48
    ref = captum.IntegratedGradients(f).attribute(x, baselines=base, n_steps=n, method=method)[0]
    if method == "riemann_trapezoid":
        # Captum's trapezoid weights are 1/n (halved at both ends), summing to (n-1)/n; ours are the trapezoid
        # rule's 1/(n-1), summing to 1 (so completeness holds). Same points, weights differ by n/(n-1).
        ref = ref * n / (n - 1)
    for reduction, reduce in (("sum", lambda t: t.sum(-1)), ("l2", lambda t: t.norm(dim=-1))):
        res = run(lm, prompt, AttributionTarget.continuation(yes), n_steps=n, method=method, baseline=baseline,
                  reduction=reduction, internal_batch_size=7)  # uneven chunks on purpose
        expected = reduce(ref)
        rel = (res.scores[0] - expected).abs().max() / expected.abs().max()
        assert rel <= 1e-3, (reduction, float(rel))


@pytest.mark.parametrize("method", ["integrated_gradients", "saliency", "input_x_gradient", "occlusion",
                                    "attention", "attention_rollout", "reagent"])
def test_contrastive_is_difference_and_matrix_sums(lm64, texts, method):
    prompt, yes, no = texts
    params = {"n_steps": 16, "baseline": "eos"} if method == "integrated_gradients" else {}
    if method == "reagent":
        params = {"max_steps": 4, "num_probes": 4}
    c_yes = run(lm64, prompt, AttributionTarget.continuation(yes), method, **params)
    c_no = run(lm64, prompt, AttributionTarget.continuation(no), method, **params)
    contrast = run(lm64, prompt, AttributionTarget.contrastive(yes, no), method, **params)
    if method != "reagent":  # reagent's random draws differ between one and two continuations
        assert_same(contrast.scores[0], c_yes.scores[0] - c_no.scores[0])
    assert contrast.objective[0] == pytest.approx(c_yes.objective[0] - c_no.objective[0], abs=1e-5)
    matrix = run(lm64, prompt, AttributionTarget.per_token(yes), method, **params)
    assert matrix.scores.shape == (len(yes), len(prompt))
    assert_same(matrix.scores.sum(0), c_yes.scores[0])


@pytest.mark.parametrize("method", ["integrated_gradients", "saliency", "input_x_gradient", "occlusion",
                                    "attention", "attention_rollout"])
def test_per_token_matrix_equals_per_token_runs(lm64, texts, method):
    """Row t of the matrix (one shared forward per chunk) equals attributing log P(y_t | x, y_<t) alone."""
    prompt, yes, _ = texts
    params = {"n_steps": 12, "baseline": "eos"} if method == "integrated_gradients" else {}
    matrix = run(lm64, prompt, AttributionTarget.per_token(yes), method, **params)
    lps = token_logprobs(lm64, prompt, yes)
    for t in range(len(yes)):
        # log P(y_t | x, y_<t) alone: y_0 directly; later tokens as log P(y_<=t) - log P(y_<t), whose shared
        # prefix cancels exactly.
        target = (AttributionTarget.continuation(yes[:1]) if t == 0
                  else AttributionTarget.contrastive(yes[: t + 1], yes[:t]))
        single = run(lm64, prompt, target, method, **params)
        assert_same(matrix.scores[t], single.scores[0])
        assert matrix.objective[t] == pytest.approx(float(lps[t]), abs=1e-5)
    # the forward is shared: the matrix costs the forwards of one run, with one backward per target token
    if method == "integrated_gradients":
        one = run(lm64, prompt, AttributionTarget.continuation(yes), method, **params)
        assert matrix.cost.forward_passes == one.cost.forward_passes
        assert matrix.cost.backward_passes == len(yes) * one.cost.backward_passes


@pytest.mark.parametrize("mode", ["remove", "replace"])
def test_occlusion_equals_brute_force(lm64, texts, mode):
    prompt, yes, _ = texts
    res = attribute(lm64, AttributionRequest(prompt, AttributionTarget.per_token(yes), "occlusion", {"mode": mode}),
                    chunk_tokens=40)  # several chunks
    full = token_logprobs(lm64, prompt, yes)
    pad = lm64.tokenizer.pad_token_id
    for i in range(len(prompt)):
        variant = prompt[:i] + prompt[i + 1:] if mode == "remove" else prompt[:i] + [pad] + prompt[i + 1:]
        expected = full - token_logprobs(lm64, variant, yes)
        assert_same(res.scores[:, i].double(), expected)


def test_attention_rows_are_distributions(tiny_lm, texts):
    prompt, yes, _ = texts
    res = run(tiny_lm, prompt, AttributionTarget.per_token(yes), "attention")
    # rows over the prompt only: non-negative and at most 1 (the rest of the mass is on continuation tokens)
    assert bool((res.scores >= 0).all()) and bool((res.scores.sum(-1) <= 1 + 1e-5).all())
    assert float(res.scores[0].sum()) == pytest.approx(1.0, abs=1e-5)  # y_0's query sees only the prompt
    assert tiny_lm.model.config._attn_implementation == "sdpa"  # switched back after the forward
    roll = run(tiny_lm, prompt, AttributionTarget.per_token(yes), "attention_rollout")
    assert float(roll.scores[0].sum()) == pytest.approx(1.0, abs=1e-5)


def test_reagent_scores_are_a_reproducible_distribution(tiny_lm):
    tok = tiny_lm.tokenizer
    prompt = tok("Paris Berlin Rome Madrid capital France")["input_ids"]
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    target = [int(logits.argmax())]  # the model's own top prediction: the original state is in the top-k
    res = attribute(tiny_lm, AttributionRequest(prompt, AttributionTarget.continuation(target), "reagent",
                                                {"num_probes": 8, "max_steps": 40, "keep_top_n": 3, "seed": 1}))
    scores = res.scores[0]
    assert float(scores.sum()) == pytest.approx(1.0, abs=1e-5) and bool((scores >= 0).all())
    assert res.info["steps"] <= 40
    again = attribute(tiny_lm, AttributionRequest(prompt, AttributionTarget.continuation(target), "reagent",
                                                  {"num_probes": 8, "max_steps": 40, "keep_top_n": 3, "seed": 1}))
    torch.testing.assert_close(again.scores, res.scores)  # seeded: reproducible
    model_sampler = attribute(tiny_lm, AttributionRequest(
        prompt, AttributionTarget.continuation(target), "reagent",
        {"num_probes": 4, "max_steps": 5, "sampler": "model"}))
    assert model_sampler.scores.shape == (1, len(prompt))


def test_special_tokens_flagged_and_excluded_from_top(tiny_lm, texts):
    prompt, yes, _ = texts
    ids = [tiny_lm.tokenizer.convert_tokens_to_ids("<|im_start|>")] + prompt
    res = run(tiny_lm, ids, AttributionTarget.continuation(yes), "occlusion")
    assert res.special[0] and not any(res.special[1:])
    assert all(not res.special[i] for i, _ in res.top(10) + res.top(10, negative=True))


def test_steering_changes_attribution_and_objective(tiny_lm, texts):
    prompt, yes, _ = texts
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector({1: torch.randn(tiny_lm.hidden_size, generator=g) * 4})
    plain = run(tiny_lm, prompt, AttributionTarget.continuation(yes), n_steps=8)
    steered = attribute(tiny_lm, AttributionRequest(prompt, AttributionTarget.continuation(yes),
                                                    "integrated_gradients", {"n_steps": 8},
                                                    steering=SteeringSpec.single(vec, scale=1.0)))
    assert steered.objective[0] != pytest.approx(plain.objective[0])
    assert not torch.allclose(steered.scores, plain.scores)
    zero = attribute(tiny_lm, AttributionRequest(prompt, AttributionTarget.continuation(yes), "integrated_gradients",
                                                 {"n_steps": 8}, steering=SteeringSpec.single(vec, scale=0.0)))
    torch.testing.assert_close(zero.scores, plain.scores)


@pytest.mark.parametrize("bad, param", [
    (dict(method="gradcam"), "method"),
    (dict(params={"n_step": 8}), "params.n_step"),
    (dict(params={"n_steps": 0}), "params.n_steps"),
    (dict(params={"n_steps": 100000}), "params.n_steps"),
    (dict(params={"method": "riemann_trapezoid", "n_steps": 1}), "params"),
    (dict(method="reagent", params={"num_probes": 1000}), "params.num_probes"),
    (dict(method="occlusion", reduction="l2"), "reduction"),
    (dict(prompt_ids=[]), "prompt"),
    (dict(prompt_ids=[10**6]), "prompt"),
    (dict(target=AttributionTarget.continuation([])), "target"),
])
def test_bad_requests_fail_before_running(tiny_lm, texts, bad, param):
    prompt, yes, _ = texts
    fields = dict(prompt_ids=prompt, target=AttributionTarget.continuation(yes), method="integrated_gradients",
                  params={}, reduction=None)
    fields.update(bad)
    with pytest.raises(InvalidRequestError) as info:
        attribute(tiny_lm, AttributionRequest(**fields))
    assert info.value.param is not None and info.value.param.startswith(param)
    if param == "method":
        assert all(name in info.value.message for name in method_names())


def test_job_runs_between_generation_steps(make_engine, tiny_lm, texts):
    """A long attribution is chunked: a generation submitted after it finishes long before it does."""
    prompt, yes, _ = texts
    engine = make_engine(job_chunk_tokens=64)
    from steering.tasks.attribution import prepare

    prep = prepare(tiny_lm, AttributionRequest(prompt, AttributionTarget.per_token(yes), "integrated_gradients",
                                               {"n_steps": 256}))
    job = engine.submit_job(prep.work, "attribution")
    while job.metrics.chunks < 2:  # the job is under way
        time.sleep(0.001)
    gen = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert len(gen.token_ids) == 8
    assert not job.done(), "generation waited for the whole attribution"
    res = job.result(timeout=120)
    assert job.metrics.chunks > 20
    assert res.scores.shape == (len(yes), len(prompt))
    # the same result as running it alone
    alone = attribute(tiny_lm, AttributionRequest(prompt, AttributionTarget.per_token(yes), "integrated_gradients",
                                                  {"n_steps": 256}))
    torch.testing.assert_close(res.scores, alone.scores, atol=1e-5, rtol=1e-4)


def test_job_cancel_and_failure_leave_engine_serving(make_engine, tiny_lm, texts):
    prompt, yes, _ = texts
    engine = make_engine(job_chunk_tokens=64)
    from steering.tasks.attribution import prepare

    prep = prepare(tiny_lm, AttributionRequest(prompt, AttributionTarget.per_token(yes), "integrated_gradients",
                                               {"n_steps": 512}))
    job = engine.submit_job(prep.work, "attribution")
    while job.metrics.chunks < 2:
        time.sleep(0.001)
    job.cancel()
    with pytest.raises(JobCancelledError):
        job.result(timeout=30)

    def broken(ctx):
        yield None
        raise RuntimeError("boom")

    failed = engine.submit_job(broken)
    with pytest.raises(RuntimeError, match="boom"):
        failed.result(timeout=30)
    assert engine.stats().jobs == 0 and engine.alive()
    assert len(engine.generate(prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)).token_ids) == 3
    ok = engine.submit_job(prep.work)
    ok.result(timeout=120)
    assert ok.metrics.compute_seconds > 0
