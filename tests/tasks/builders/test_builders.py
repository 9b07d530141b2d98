"""Vector builders (GrAInS, CAA, PCA, probe), sweeps and build jobs."""

from __future__ import annotations

import time

import pytest
import torch

from steering.backends.hf import run_job
from steering.datasets import PreferenceExample, dataset_hash
from steering.errors import InvalidRequestError, JobCancelledError
from steering.sampling import SamplingParams
from steering.tasks.builders import BuildRequest, SweepConfig, build, encode, grains, sweep
from steering.tasks.builders.grains import masked, select, template_affixes, unshared
from steering.tasks.builders.registry import BuilderParams, Encoded, principal_direction
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
    p = {"k": 3, "n_steps": 8, "aggregate": "pca"}
    both = build(tiny_lm, BuildRequest(EXAMPLES, "grains", p))
    pos = build(tiny_lm, BuildRequest(EXAMPLES, "grains", {**p, "mode": "pos"}))
    sub = build(tiny_lm, BuildRequest(EXAMPLES, "grains", {**p, "layers": [3, 1]}))
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
    assert md["params"]["select_from"] == "differing" and md["params"]["aggregate"] == "pca"
    assert md["model"] == tiny_lm.info.identity().as_dict()
    assert md["dataset"] == {"hash": dataset_hash(EXAMPLES), "examples": len(EXAMPLES)}
    assert all(n > 0 for n in md["hidden_norms"].values())
    assert all(len(s["pos"]) <= 3 and len(s["neg"]) <= 3 for s in md["info"]["selections"])
    mean = build(tiny_lm, BuildRequest(EXAMPLES, "grains", {**p, "aggregate": "mean"}))
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


# Pairs whose answers differ in their behaviour words only (the shape of docs/data/sentiment_pairs.jsonl).
DIFFERING = [
    PreferenceExample("Tell me about your day.", "It is wonderful and happy today.", "It is awful and sad today."),
    PreferenceExample("How was the movie?", "I love this movie, it is wonderful.", "I hate this film, it is awful."),
    PreferenceExample("How are you today?", "I am fine, thank you, happy.", "I am sad, thank you, awful."),
    PreferenceExample("What is the capital of France?", "Paris is wonderful.", "Paris is awful."),
]


def _planted_pairs(lm):
    """Chat prompts with answers that differ only in planted behaviour tokens (one or two, the same number in
    both, so the masked sequences are the same for every replacement)."""
    tok = lm.tokenizer
    good, bad = tok.convert_tokens_to_ids(["hap", "py"]), tok.convert_tokens_to_ids(["wful", "ad"])
    out = []
    for i, (prompt, answer) in enumerate([("Tell me about your day.", "It is fine and you are fine today."),
                                          ("How was the movie?", "The movie is fine, thank you."),
                                          ("How are you today?", "I am fine, thank you."),
                                          ("What is the capital of France?", "Paris is the capital of France.")]):
        base = tok(answer, add_special_tokens=False)["input_ids"]
        j, n = 2 + i % 2, 1 + i % 2
        p_ids = encode(lm, [PreferenceExample(prompt, "x", "y")], BuilderParams(prompt_format="chat"))[0].prompt
        out.append(Encoded(p_ids, base[:j] + good[:n] + base[j + n:], base[:j] + bad[:n] + base[j + n:]))
    return out


def _planted_scores(data, template):
    """Integrated-gradients scores shaped like the default model's on the sentiment pairs: the template's
    tokens get the largest scores of both signs ('\\n' +14.5, 'system' -4.7 there), the tokens both answers
    share large ones (' was' +17.3 in y+, -14.5 in y-), and the behaviour words where the answers differ smaller
    ones (' wonderful' +6.6, ' awful' -8.2); an answer's last token 0."""
    out = []
    for e in data:
        P, pre, suf = len(e.prompt), *template
        prompt = [(10.0 if i % 2 else -10.0) if i < pre or i >= P - suf else (0.1 if i % 2 else -0.1)
                  for i in range(P)]
        parts = []
        for ans, other, sign in ((e.preferred, e.dispreferred, 1.0), (e.dispreferred, e.preferred, -1.0)):
            parts.append([sign * (1.0 if d else 5.0) for d in unshared(ans, other)[:-1]] + [0.0])
        out.append(torch.tensor(prompt + parts[0] + parts[1]))
    return out


@pytest.mark.parametrize("replacement", ["pad", "delete"])
def test_grains_recovers_the_contrast_when_answers_differ_in_the_behaviour_tokens(tiny_lm, monkeypatch, replacement):
    """Known direction: when y+ and y- differ only in their behaviour tokens, masking exactly those tokens in
    both leaves the same sequence, so delta+ - delta- = h(S+) - h(S-) at the last token for every example: the
    mean of the deltas' difference is the last-token contrast (CAA at position 'last'), at every layer. With the
    reference code's choices (candidates: every token; PCA of the deltas) the template and the shared tokens are
    masked instead and the direction is unrelated to the contrast (on the default model that vector moved VADER
    the wrong way: -0.24 at layer 6, x0.25)."""
    from steering.tasks.builders.contrast import CAA
    from steering.tasks.builders.grains import Grains

    data = _planted_pairs(tiny_lm)
    template = template_affixes([e.prompt for e in data])
    assert template[0] > 0 and template[1] > 0

    def planted(ctx, rows, *args, **kwargs):
        yield from ()
        return _planted_scores(data, template)

    monkeypatch.setattr(grains, "cached_integrated_gradients", planted)
    layers = list(range(tiny_lm.num_layers))

    def directions(builder, **params):
        out = run_job(lambda ctx: builder().run(ctx, data, layers, builder.Params(**params)), tiny_lm)
        return {x: v / v.norm() for x, v in out.values.items()}, out.info

    ref, _ = directions(CAA, position="last")
    got, info = directions(Grains, replacement=replacement)
    for layer in layers:
        assert float(torch.dot(got[layer], ref[layer])) > 0.9999, layer
    assert info["chosen_parts"]["pos"]["answer"] == info["chosen_parts"]["neg"]["answer"] == 6  # 1+2+1+2
    assert info["chosen_parts"]["pos"]["template"] == info["chosen_parts"]["neg"]["prompt"] == 0
    if replacement == "pad":  # the reference code's choices on the same scores: template and shared tokens, PCA
        old, _ = directions(Grains, select_from="sequence", skip_template=False, aggregate="pca")
        assert min(float(torch.dot(old[x], ref[x])) for x in layers) < 0.9


def test_template_affixes_and_unshared_tokens():
    assert template_affixes([[1, 2, 5, 6, 9], [1, 2, 7, 9], [1, 2, 8, 8, 8, 9]]) == (2, 1)
    assert template_affixes([[1, 2, 3]]) == (0, 0)
    assert template_affixes([[1, 2], [1, 2, 2]]) == (2, 0)  # prefix and suffix never overlap
    assert unshared([5, 6, 7, 8], [5, 9, 7, 8]) == [False, True, False, False]
    assert unshared([5, 6], [7, 8, 9]) == [True, True]
    assert masked([10, 11, 12, 13], [1, 3], None) == [10, 12]  # delete


def test_grains_candidates_on_real_attributions(tiny_lm):
    """With real (tiny-model) attributions: 'differing' never chooses a prompt token or a token both answers
    share; 'sequence' with the template skipped never chooses a token of the chat markup around the prompt."""
    data = encode(tiny_lm, DIFFERING, BuilderParams(prompt_format="chat"))
    pre, suf = template_affixes([e.prompt for e in data])
    res = build(tiny_lm, BuildRequest(DIFFERING, "grains", {"k": 100, "n_steps": 4, "prompt_format": "chat"}))
    info = res.vector.metadata["info"]
    assert info["chosen_parts"]["pos"]["answer"] > 0 and info["chosen_parts"]["neg"]["answer"] > 0
    for e, sel in zip(data, info["selections"], strict=True):
        P = len(e.prompt)
        for key, ans, other in (("pos_at", e.preferred, e.dispreferred), ("neg_at", e.dispreferred, e.preferred)):
            diff = unshared(ans, other)
            assert all(i >= P and diff[i - P] for i, _ in sel[key])
    seq = build(tiny_lm, BuildRequest(DIFFERING, "grains", {"k": 100, "n_steps": 4, "prompt_format": "chat",
                                                             "select_from": "sequence"})).vector
    chosen = [(i, len(e.prompt)) for e, sel in zip(data, seq.metadata["info"]["selections"], strict=True)
              for i, _ in sel["pos_at"] + sel["neg_at"] if i < len(e.prompt)]
    assert chosen and all(pre <= i < P - suf for i, P in chosen)
    assert seq.metadata["info"]["chosen_parts"]["pos"]["template"] == 0
    raw = build(tiny_lm, BuildRequest(DIFFERING, "grains", {"k": 100, "n_steps": 4, "prompt_format": "chat",
                                                             "select_from": "sequence", "skip_template": False}))
    parts = raw.vector.metadata["info"]["chosen_parts"]
    assert parts["pos"]["template"] + parts["neg"]["template"] > 0


def test_grains_replacements(tiny_lm):
    """The baseline embedding in place of the chosen tokens equals writing the token whose embedding it is;
    deleting them is another counterfactual."""
    p = {"k": 3, "n_steps": 4, "select_from": "sequence"}
    eos = build(tiny_lm, BuildRequest(EXAMPLES, "grains", {**p, "replacement": "eos", "baseline": "eos"})).vector
    base = build(tiny_lm, BuildRequest(EXAMPLES, "grains", {**p, "replacement": "baseline", "baseline": "eos"})).vector
    zeros = build(tiny_lm, BuildRequest(EXAMPLES, "grains", {**p, "replacement": "baseline"})).vector
    deleted = build(tiny_lm, BuildRequest(EXAMPLES, "grains", {**p, "replacement": "delete", "baseline": "eos"})).vector
    for layer in eos.layers:
        torch.testing.assert_close(base.values[layer], eos.values[layer], atol=1e-5, rtol=1e-4)
    assert float(torch.dot(zeros.values[2], eos.values[2])) < 0.9999
    assert float(torch.dot(deleted.values[2], eos.values[2])) < 0.9999
    assert deleted.metadata["info"]["replacement_token"] == {"id": None, "text": "delete"}


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
    assert [(r["layers"], r["scale"]) for r in res.table] == [([1], 0.5), ([1], 2.0), ([2], 0.5), ([2], 2.0)]
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
    assert row["scale_abs"] == [pytest.approx(absolute, rel=1e-5)]
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
