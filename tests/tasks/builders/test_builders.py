"""Vector builders (GrAInS, CAA, PCA, probe), sweeps and build jobs."""

from __future__ import annotations

import time

import pytest
import torch

from steering.datasets import PreferenceExample, dataset_hash
from steering.errors import InvalidRequestError, JobCancelledError
from steering.sampling import SamplingParams
from steering.tasks.builders import BuildRequest, SweepConfig, build, encode, sweep
from steering.tasks.builders.grains import masked, select
from steering.tasks.builders.registry import BuilderParams, principal_direction
from steering.vectors import SteeringVector
from tests.tiny import EXAMPLES, plain_logprob


def test_select_takes_top_k_of_the_sign_among_candidates():
    scores = [5.0, -1.0, 3.0, 0.0, 9.0, -7.0, 2.0]
    cand = [True, True, True, True, False, True, True]  # position 4 is special
    assert select(scores, cand, 2, negative=False) == [0, 2]
    assert select(scores, cand, 10, negative=False) == [0, 2, 6]  # only positive scores qualify
    assert select(scores, cand, 1, negative=True) == [5]
    assert select(scores, cand, 10, negative=True) == [1, 5]
    assert select([0.0, 0.0], [True, True], 3, negative=False) == []


def test_masking_touches_only_the_chosen_tokens():
    ids = [10, 11, 12, 13, 14]
    out = masked(ids, [1, 3], 99)
    assert out == [10, 99, 12, 99, 14] and ids == [10, 11, 12, 13, 14]


def test_principal_direction_is_sign_aligned_with_the_mean():
    g = torch.Generator().manual_seed(0)
    axis = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    for sign in (1.0, -1.0):
        coef = sign * (3.0 + torch.randn(40, 1, generator=g))  # spread along the axis, mean along sign*axis
        d = coef * axis + 0.01 * torch.randn(40, 16, generator=g)
        u, ev = principal_direction(d)
        assert float(u.norm()) == pytest.approx(1.0, abs=1e-6)
        assert float(torch.dot(u, d.mean(0))) > 0
        assert float(torch.dot(u, axis)) == pytest.approx(sign, abs=1e-2)
        assert 0.9 < ev <= 1.0


def test_grains_modes_layers_and_metadata(tiny_lm):
    both = build(tiny_lm, BuildRequest(EXAMPLES, "grains", {"k": 3, "n_steps": 8}))
    pos = build(tiny_lm, BuildRequest(EXAMPLES, "grains", {"k": 3, "n_steps": 8, "mode": "pos"}))
    sub = build(tiny_lm, BuildRequest(EXAMPLES, "grains", {"k": 3, "n_steps": 8, "layers": [3, 1]}))
    vb, vp = both.vector, pos.vector
    assert vb.layers == list(range(tiny_lm.num_layers)) and sub.vector.layers == [1, 3]
    for layer in vb.layers:
        assert float(vb.values[layer].norm()) == pytest.approx(1.0, abs=1e-5)
        # pos: u+ (unit, PCA); both: u+ - u-, stored unit with its raw norm: u- recovered is unit too
        assert vp.metadata["raw_norms"][str(layer)] == pytest.approx(1.0, abs=1e-5)
        u_neg = vp.values[layer] - vb.metadata["raw_norms"][str(layer)] * vb.values[layer]
        assert float(u_neg.norm()) == pytest.approx(1.0, abs=1e-4)
    for layer in (1, 3):  # one pass for all layers gives what a per-layer build gives
        torch.testing.assert_close(sub.vector.values[layer], vb.values[layer], atol=1e-5, rtol=1e-4)
    md = vb.metadata
    assert md["method"] == "grains" and md["params"]["k"] == 3 and md["params"]["mode"] == "both"
    assert md["model"] == tiny_lm.info.identity().as_dict()
    assert md["dataset"] == {"hash": dataset_hash(EXAMPLES), "examples": len(EXAMPLES)}
    assert all(n > 0 for n in md["hidden_norms"].values())
    assert all(len(s["pos"]) <= 3 and len(s["neg"]) <= 3 for s in md["info"]["selections"])
    mean = build(tiny_lm, BuildRequest(EXAMPLES, "grains", {"k": 3, "n_steps": 8, "aggregate": "mean"}))
    assert "explained_variance_pos" not in mean.vector.metadata["stats"]
    assert float(torch.dot(mean.vector.values[2], vb.values[2])) != pytest.approx(1.0)


def test_grains_never_selects_special_tokens(tiny_lm):
    """With the chat template the prompt is full of special markers; even k=100 never picks one."""
    res = build(tiny_lm, BuildRequest(EXAMPLES, "grains", {"k": 100, "n_steps": 4, "prompt_format": "chat"}))
    specials = {tiny_lm.tokenizer.decode([i]) for i in tiny_lm.special_token_ids}
    chosen = [t for s in res.vector.metadata["info"]["selections"] for t in s["pos"] + s["neg"]]
    assert chosen and not specials & set(chosen)
    only_prompt = build(tiny_lm, BuildRequest(EXAMPLES[:1], "grains", {"k": 100, "n_steps": 4,
                                                                       "select_from": "prompt", "mode": "pos"}))
    prompt_tokens = {tiny_lm.tokenizer.decode([t]) for t in encode(tiny_lm, EXAMPLES[:1], BuilderParams())[0].prompt}
    assert set(only_prompt.vector.metadata["info"]["selections"][0]["pos"]) <= prompt_tokens


def _answer_states(lm, e, layer):
    """Reference: mean decoder-layer output over each answer's tokens, from plain forwards."""
    out = []
    for ans in (e.preferred, e.dispreferred):
        got: dict = {}

        def keep(m, a, o, got=got):
            got.setdefault("h", o[0] if isinstance(o, tuple) else o)

        h = lm.layers[layer].register_forward_hook(keep)
        try:
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([e.prompt + ans]))
        finally:
            h.remove()
        out.append(got["h"][0, len(e.prompt):].mean(0))
    return out


def test_caa_pca_probe(tiny_lm):
    data = encode(tiny_lm, EXAMPLES, BuilderParams())
    caa = build(tiny_lm, BuildRequest(EXAMPLES, "caa")).vector
    for layer in (0, 2):
        diffs = torch.stack([a - b for a, b in (_answer_states(tiny_lm, e, layer) for e in data)])
        ref = diffs.mean(0)
        torch.testing.assert_close(caa.values[layer], ref / ref.norm(), atol=1e-5, rtol=1e-4)
        assert caa.metadata["raw_norms"][str(layer)] == pytest.approx(float(ref.norm()), rel=1e-4)
        pca = build(tiny_lm, BuildRequest(EXAMPLES, "pca", {"layers": [layer]})).vector
        u, _ = principal_direction(diffs)
        torch.testing.assert_close(pca.values[layer], u, atol=1e-4, rtol=1e-3)
    probe = build(tiny_lm, BuildRequest(EXAMPLES, "probe", {"l2": 1e-4})).vector
    acc = probe.metadata["stats"]["train_accuracy"]
    assert max(acc.values()) == 1.0  # 5 pairs in 64 dimensions are separable
    cos = [float(torch.dot(probe.values[x], caa.values[x])) for x in probe.layers]
    assert sum(c > 0 for c in cos) >= len(cos) - 1  # the probe points the way the mean difference does


def test_bad_build_requests_fail_before_model_work(tiny_lm):
    cases = [
        (dict(method="nope"), "unknown vector method"),
        (dict(params={"kk": 1}), "kk: unknown parameter"),
        (dict(params={"k": 0}), "grains: k: Input should be greater"),
        (dict(params={"layers": [99]}), "do not exist"),
        (dict(params={"mode": "neg"}), "mode"),
        (dict(sweep=SweepConfig()), "a sweep needs validation examples"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(InvalidRequestError, match=msg):
            build(tiny_lm, BuildRequest(EXAMPLES, **kwargs))
    with pytest.raises(InvalidRequestError, match="encode to tokens"):
        build(tiny_lm, BuildRequest([PreferenceExample("", "a", "b")]))


def test_sweep_scores_each_layer_and_scale_like_a_hooked_forward(tiny_lm):
    vec = build(tiny_lm, BuildRequest(EXAMPLES, "caa")).vector
    res = sweep(tiny_lm, vec, EXAMPLES[:3], SweepConfig(scales=[0.5, 2.0], layers=[1, 2]))
    assert [(r["layer"], r["scale"]) for r in res.table] == [(1, 0.5), (1, 2.0), (2, 0.5), (2, 2.0)]
    assert res.best in res.table and res.examples == 3
    data = encode(tiny_lm, EXAMPLES[:3], BuilderParams())

    def margins(layer=None, s=0.0):
        v = vec.values[layer] if layer is not None else None
        hook = None
        if layer is not None:
            def steer(m, a, o):
                h = o[0] if isinstance(o, tuple) else o
                new = (h + s * v) * h.norm(dim=-1, keepdim=True) / (h + s * v).norm(dim=-1, keepdim=True)
                return (new,) + tuple(o[1:]) if isinstance(o, tuple) else new
            hook = tiny_lm.layers[layer].register_forward_hook(steer)
        try:
            with torch.no_grad():
                return [float(plain_logprob(tiny_lm, e.prompt, e.preferred)
                              - plain_logprob(tiny_lm, e.prompt, e.dispreferred)) for e in data]
        finally:
            if hook:
                hook.remove()

    base = margins()
    assert res.baseline["margin"] == pytest.approx(sum(base) / 3, abs=1e-4)
    assert res.baseline["accuracy"] == pytest.approx(sum(m > 0 for m in base) / 3)
    row = res.table[3]
    absolute = 2.0 * vec.metadata["hidden_norms"]["2"]
    assert row["scale_abs"] == pytest.approx(absolute, rel=1e-5)
    ref = margins(2, absolute)
    assert row["margin"] == pytest.approx(sum(ref) / 3, abs=1e-3)
    assert row["margin"] != pytest.approx(res.baseline["margin"], abs=1e-3)
    with pytest.raises(InvalidRequestError, match="relative scales need"):
        sweep(tiny_lm, SteeringVector({1: vec.values[1]}), EXAMPLES[:1], SweepConfig(layers=[1]))
    build_then_sweep = build(tiny_lm, BuildRequest(EXAMPLES, "caa", validation=EXAMPLES[:3],
                                                   sweep=SweepConfig(scales=[0.5, 2.0], layers=[1, 2])))
    assert build_then_sweep.sweep.table == res.table
    assert build_then_sweep.vector.metadata["sweep"]["best"] == res.best


def test_build_job_runs_between_generation_steps_and_cancels(make_engine, tiny_lm):
    from steering.tasks.builders import prepare_build

    engine = make_engine(job_chunk_tokens=64)
    prep = prepare_build(tiny_lm, BuildRequest(EXAMPLES * 4, "grains", {"n_steps": 64}))
    job = engine.submit_job(prep.work, "vector-build")
    while job.metrics.chunks < 2:
        time.sleep(0.001)
    gen = engine.generate([5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert len(gen.token_ids) == 8
    assert not job.done(), "generation waited for the whole build"
    assert job.progress.stage == "attribution" and 0 < job.progress.overall() < 1
    job.cancel()
    with pytest.raises(JobCancelledError):
        job.result(timeout=30)
    assert engine.generate([5, 6], SamplingParams(max_tokens=2, temperature=0)).token_ids
