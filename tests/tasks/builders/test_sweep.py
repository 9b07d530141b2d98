"""Sweeps over layer sets, scales, positions and normalize; fluency under a budget; the chosen setting stored with
the vector and used when a request names it without a scale."""

from __future__ import annotations

import math

import pytest
import torch

from steering.backends.hf import run_job
from steering.errors import InvalidRequestError, SteeringValidationError
from steering.sampling import SamplingParams
from steering.spec import SteeringApplication, SteeringSpec, resolve, stored_setting
from steering.tasks.builders import BuildRequest, FluencyConfig, SweepConfig, build, encode, sweep
from steering.tasks.builders.registry import BuilderParams
from steering.tasks.builders.sweep import greedy_continuations
from steering.vectors import SteeringVector
from tests.tiny import EXAMPLES, plain_logprob


@pytest.fixture(scope="module")
def caa(tiny_lm):
    return build(tiny_lm, BuildRequest(EXAMPLES, "caa")).vector


def _hooked_margins(lm, data, steer: dict[int, float], vec, normalize: bool):
    """Margins with plain forward hooks adding scale x v at each layer of ``steer`` (every position)."""
    hooks = []
    for layer, s in steer.items():
        v = vec.values[layer]

        def fn(m, a, o, v=v, s=s):
            h = o[0] if isinstance(o, tuple) else o
            new = h + s * v
            if normalize:
                new = new * h.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True)
            return (new,) + tuple(o[1:]) if isinstance(o, tuple) else new
        hooks.append(lm.layers[layer].register_forward_hook(fn))
    try:
        with torch.no_grad():
            return [float(plain_logprob(lm, e.prompt, e.preferred) - plain_logprob(lm, e.prompt, e.dispreferred))
                    for e in data]
    finally:
        for h in hooks:
            h.remove()


def test_layer_ranges_split_the_scale_and_the_grid_covers_positions_and_normalize(tiny_lm, caa):
    cfg = SweepConfig(scales=[1.0], layers=[1], layer_ranges=[[1, 2]], positions=["all", "generated"],
                      normalize=[True, False])
    res = sweep(tiny_lm, caa, EXAMPLES[:3], cfg)
    keys = [(tuple(r["layers"]), r["positions"], r["normalize"]) for r in res.table]
    assert keys == [((1,), "all", True), ((1,), "all", False), ((1,), "generated", True), ((1,), "generated", False),
                    ((1, 2), "all", True), ((1, 2), "all", False), ((1, 2), "generated", True),
                    ((1, 2), "generated", False)]
    norms = caa.metadata["hidden_norms"]
    pair = res.table[4]
    assert pair["scale_abs"] == [pytest.approx(0.5 * norms["1"], rel=1e-5), pytest.approx(0.5 * norms["2"], rel=1e-5)]
    data = encode(tiny_lm, EXAMPLES[:3], BuilderParams())
    ref = _hooked_margins(tiny_lm, data, {1: pair["scale_abs"][0], 2: pair["scale_abs"][1]}, caa, True)
    assert pair["margin"] == pytest.approx(sum(ref) / 3, abs=1e-3)
    # answer-only steering leaves the prompt alone: it differs from steering everything
    assert res.table[0]["margin"] != pytest.approx(res.table[2]["margin"], abs=1e-4)


def test_greedy_continuations_are_the_engines_greedy_generations(tiny_lm, make_engine, caa):
    """The sweep's cache-less continuations are what the engine generates, steered or not, for every position
    kind (the generated part starts after the prompt in both)."""
    from steering.spec import ResolvedApplication

    engine = make_engine()
    prompts = [e.prompt for e in encode(tiny_lm, EXAMPLES[:3], BuilderParams())]
    s = 2.0 * caa.metadata["hidden_norms"]["2"]
    for positions in ("all", "prompt", "generated"):
        app = [ResolvedApplication(None, {2: caa.values[2]}, s, positions, True)]
        conts = run_job(lambda ctx, app=app: greedy_continuations(
            ctx, prompts, [ctx.steering(app)] * len(prompts), 6, set(tiny_lm.eos_token_ids)), tiny_lm)
        for p, c in zip(prompts, conts, strict=True):
            spec = SteeringSpec.single(SteeringVector({2: caa.values[2]}), scale=s, positions=positions,
                                       normalize=True)
            got = engine.generate(p, SamplingParams(max_tokens=6, temperature=0), spec).token_ids
            assert c == [t for t in got if t not in tiny_lm.eos_token_ids]


def test_fluency_budget_decides_the_choice(tiny_lm, caa):
    fl = FluencyConfig(prompts=3, max_tokens=6, budget=1.2)
    cfg = SweepConfig(scales=[0.25, 8.0], layers=[1, 2], metric="margin")
    free = sweep(tiny_lm, caa, EXAMPLES[:4], cfg)
    res = sweep(tiny_lm, caa, EXAMPLES[:4], SweepConfig(scales=[0.25, 8.0], layers=[1, 2], metric="margin",
                                                         fluency=fl))
    assert free.fluency is None and "perplexity_ratio" not in free.best
    assert res.fluency["prompts"] == 3 and res.baseline["perplexity_ratio"] == 1.0
    for r in res.table:
        assert math.isfinite(r["perplexity_ratio"])
        assert r["within_budget"] == (r["perplexity_ratio"] <= 1.2)
    assert [r["within_budget"] for r in res.table] == [r["scale"] == 0.25 for r in res.table]  # x8 wrecks the text
    # without a budget the best margin is a disfluent setting; within it, the best of the fluent ones
    assert free.best["scale"] == 8.0
    eligible = [r for r in res.table if r["within_budget"]]
    assert res.best["scale"] == 0.25 and res.best["margin"] == max(r["margin"] for r in eligible)
    # a budget nothing meets: no choice, so nothing would be stored
    strict = sweep(tiny_lm, caa, EXAMPLES[:4], SweepConfig(scales=[8.0], layers=[1, 2],
                                                            fluency=FluencyConfig(3, 6, 1.0)))
    assert not any(r["within_budget"] for r in strict.table) and strict.best == {}


def test_build_stores_the_choice_and_a_request_without_scale_uses_it(tiny_lm, make_engine):
    fl = FluencyConfig(prompts=2, max_tokens=4, budget=50.0)
    res = build(tiny_lm, BuildRequest(EXAMPLES, "caa", validation=EXAMPLES[:3],
                                      sweep=SweepConfig(scales=[0.5, 1.0], layers=[1], layer_ranges=[[2, 3]],
                                                        positions="generated", fluency=fl)))
    vec = res.vector
    setting = vec.metadata["setting"]
    best = res.sweep.best
    assert setting["layers"] == best["layers"] and setting["scale"] == best["scale"]
    assert setting["positions"] == "generated" and setting["source"]["budget"] == 50.0
    assert setting["source"]["perplexity_ratio"] == best["perplexity_ratio"]
    vec = SteeringVector(vec.values, name="chosen", metadata=vec.metadata)
    st = stored_setting(vec)
    assert st is not None and st.layers == best["layers"]

    def lookup(name):
        assert name == "chosen"
        return vec

    kw = dict(hidden_size=tiny_lm.hidden_size, num_layers=tiny_lm.num_layers, lookup=lookup)
    r = resolve(SteeringSpec.single("chosen"), **kw)
    assert [(a.layers, a.scale, a.positions, a.normalize) for a in r.applications] == [
        ([x], pytest.approx(s), "generated", setting["normalize"]) for x, s in zip(best["layers"], best["scale_abs"])]
    # an in-process vector object with a stored setting steers the same way (no store needed), and the
    # evaluation's sweep choice is that setting
    from steering.tasks.evaluation import sweep_choice

    obj = resolve(SteeringSpec([sweep_choice(vec)]), hidden_size=tiny_lm.hidden_size, num_layers=tiny_lm.num_layers)
    assert [(a.layers, a.scale) for a in obj.applications] == [(a.layers, a.scale) for a in r.applications]
    # request fields other than the scale still win; other layers need a scale; a scale means no stored setting
    r = resolve(SteeringSpec.single("chosen", positions="all", normalize=False), **kw)
    assert all(a.positions == "all" and not a.normalize for a in r.applications)
    with pytest.raises(SteeringValidationError, match="give a scale"):
        resolve(SteeringSpec.single("chosen", layers=[0]), **kw)
    r = resolve(SteeringSpec.single("chosen", scale=2.0), **kw)
    assert [(a.layers, a.scale) for a in r.applications] == [(vec.layers, 2.0)]
    # without a stored setting: scale 1, positions all, normalize off (as before)
    plain = SteeringVector(vec.values, name="plain")
    r = resolve(SteeringSpec([SteeringApplication("plain")]), hidden_size=tiny_lm.hidden_size,
                num_layers=tiny_lm.num_layers, lookup=lambda n: plain)
    assert [(a.scale, a.positions, a.normalize) for a in r.applications] == [(1.0, "all", False)]


def test_sweep_is_checked_before_any_model_work(tiny_lm, caa):
    cases = [
        (SweepConfig(layer_ranges=[[]]), "layer range is empty"),
        (SweepConfig(layer_ranges=[[1, 99]]), "do not exist"),
        (SweepConfig(positions=["all", "everywhere"]), "unknown positions"),
        (SweepConfig(positions=()), "non-empty list"),
        (SweepConfig(positions=["all", ()]), "non-empty list"),
        (SweepConfig(normalize=[]), "must not be empty"),
        (SweepConfig(fluency=FluencyConfig(budget=0.5)), "budget"),
        (SweepConfig(fluency=FluencyConfig(max_tokens=0)), "max_tokens"),
        (SweepConfig(scales=[1.0] * 60, layers=list(range(4)), positions=["all", "prompt", "generated"],
                     normalize=[True, False], fluency=FluencyConfig(prompts=256, max_tokens=256)), "scored rows"),
    ]
    for cfg, msg in cases:
        with pytest.raises(InvalidRequestError, match=msg):
            sweep(tiny_lm, caa, EXAMPLES[:3], cfg)
