"""Vector building on tiny models: packing, packed IG, GrAInS selection/masking/aggregation, baselines, sweeps,
the registry (atomic writes, rename, model identity), build jobs beside generation, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tiny import build_model

from steering.tasks.attribution.gradients import integration_points
from steering.tasks.attribution.packed import integrated_gradients
from steering.tasks.builders import BuildRequest, SweepConfig, build, encode, sweep
from steering.tasks.builders.grains import masked, select
from steering.tasks.builders.registry import BuilderParams, principal_direction
from steering.datasets import PreferenceExample, dataset_hash, load_examples, parse_rows
from steering.errors import InvalidRequestError, SteeringValidationError
from steering.backends.hf import run_job
from steering.errors import JobCancelledError
from steering.backends.hf.loading import load_model
from steering.tasks.packing import answer_rows
from steering.engine import ModelIdentity
from steering.store import ModelMismatchError, VectorExistsError, VectorStore
from steering.sampling import SamplingParams
from steering.tasks.scoring import score_answers
from steering.vectors import SteeringVector

EXAMPLES = [
    PreferenceExample("What is the capital of France?", "Paris", "Berlin"),
    PreferenceExample("I love this movie, it is", "wonderful and happy", "awful and sad"),
    PreferenceExample("The quick brown fox", "jumps over the lazy dog", "is sad"),
    PreferenceExample("Can you see the Great Wall of China from space?", "No, it is too narrow", "Yes"),
    PreferenceExample("Numbers: 0 1 2 3", "4 5 6", "9 9 9"),
]


@pytest.fixture(scope="module")
def lm64(tiny_dir):
    return load_model(str(tiny_dir), device="cpu", dtype="float64")


def plain_logprob(lm, prompt: list[int], answer: list[int], embeds=None, hook=None) -> torch.Tensor:
    """Reference: summed log P(answer | prompt) from one plain forward of the unpacked sequence."""
    if embeds is None:
        out = lm.model(input_ids=torch.tensor([prompt + answer]))
    else:
        out = lm.model(inputs_embeds=embeds.unsqueeze(0))
    lp = out.logits[0].double().log_softmax(-1)
    P = len(prompt)
    return lp[P - 1: P - 1 + len(answer)].gather(-1, torch.tensor(answer).unsqueeze(-1)).sum()


# -- packing and scoring -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "qwen2-sliding", "gpt2"])
def arch_lm(request, tmp_path_factory):
    d = build_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
    return load_model(str(d), device="cpu", dtype="float32")


def test_packed_scores_equal_plain_forwards(arch_lm):
    """A prompt packed with several answers scores each exactly as a separate plain forward would (positions
    restart after the prompt for every answer; sliding windows kept)."""
    tok = arch_lm.tokenizer
    prompt = tok("Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12")["input_ids"]
    answers = [tok(t, add_special_tokens=False)["input_ids"] for t in (" 13 14 15 16 17 18", " Paris", " a b")]
    items = [(prompt, answers), (prompt[:4], answers[1:])]
    res = run_job(lambda ctx: score_answers(ctx, items), arch_lm, chunk_tokens=40)  # forces several chunks
    with torch.no_grad():
        for (p, ans), scored in zip(items, res):
            ref = [float(plain_logprob(arch_lm, p, a)) for a in ans]
            assert scored.logprobs == pytest.approx(ref, rel=1e-4, abs=1e-4)
            assert scored.lengths == [len(a) for a in ans]


def _reference_ig(lm, p, a, b, n):
    """Contrastive IG of log P(a|p) - log P(b|p) over all tokens, from plain forwards (zero baseline)."""
    emb = lm.model.get_input_embeddings()
    x = [emb(torch.tensor(t)).detach() for t in (p, a, b)]
    alphas, weights = integration_points(n, "gausslegendre")
    acc = [torch.zeros_like(t) for t in x]
    for alpha, w in zip(alphas.tolist(), weights.tolist()):
        e = [(alpha * t).requires_grad_(True) for t in x]
        f = plain_logprob(lm, p, a, torch.cat([e[0], e[1]])) - plain_logprob(lm, p, b, torch.cat([e[0], e[2]]))
        for g_acc, g in zip(acc, torch.autograd.grad(f, e)):
            g_acc += w * g
    return torch.cat([(g * t).sum(-1) for g, t in zip(acc, x)])


def test_packed_ig_equals_plain_reference_and_is_complete(lm64):
    tok = lm64.tokenizer
    data = encode(lm64, EXAMPLES[:3], BuilderParams())
    rows = [answer_rows(e.prompt, [e.preferred, e.dispreferred]) for e in data]
    scores = run_job(lambda ctx: integrated_gradients(ctx, rows, [[0, 1, -1]] * 3, n_steps=16), lm64,
                     chunk_tokens=96)
    for e, s in zip(data, scores):
        ref = _reference_ig(lm64, e.prompt, e.preferred, e.dispreferred, 16)
        torch.testing.assert_close(s.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        assert float(s[len(e.prompt) + len(e.preferred) - 1]) == 0.0  # an answer's last token predicts nothing
    # completeness from the EOS baseline (the zero embedding is ill-conditioned under RMSNorm)
    e = data[0]
    scores = run_job(lambda ctx: integrated_gradients(ctx, rows[:1], [[0, 1, -1]], n_steps=128, baseline="eos"),
                     lm64)
    emb = lm64.model.get_input_embeddings()
    eos = emb(torch.tensor(tok.eos_token_id))

    def f(base: bool) -> float:
        parts = [emb(torch.tensor(t)) if not base else eos.expand(len(t), -1) for t in (e.prompt, e.preferred,
                                                                                         e.dispreferred)]
        with torch.no_grad():
            return float(plain_logprob(lm64, e.prompt, e.preferred, torch.cat(parts[:2]))
                         - plain_logprob(lm64, e.prompt, e.dispreferred, torch.cat([parts[0], parts[2]])))

    gap = f(False) - f(True)
    assert abs(gap) > 0.1
    assert float(scores[0].sum()) == pytest.approx(gap, rel=1e-3, abs=1e-3)


# -- GrAInS pieces -------------------------------------------------------------------------------------------------
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


# -- baselines -----------------------------------------------------------------------------------------------------
def _answer_states(lm, e, layer):
    """Reference: mean decoder-layer output over each answer's tokens, from plain forwards."""
    out = []
    for ans in (e.preferred, e.dispreferred):
        got = {}
        h = lm.layers[layer].register_forward_hook(lambda m, a, o: got.setdefault("h", o[0] if isinstance(o, tuple)
                                                                                  else o))
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


# -- sweep ---------------------------------------------------------------------------------------------------------
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


# -- data files ----------------------------------------------------------------------------------------------------
def test_data_files(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text("\n".join(json.dumps(e.__dict__) for e in EXAMPLES) + "\n\n")
    assert load_examples(good) == EXAMPLES and load_examples(good, "1-2") == EXAMPLES[1:3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "preferred": "b", "disprefered": "c"}) + "\n")
    with pytest.raises(InvalidRequestError, match="bad.jsonl:1: each line needs exactly"):
        load_examples(bad)
    csv_path = tmp_path / "tqa.csv"
    csv_path.write_text('Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n'
                        'Adversarial,Misc,Is the sky green?,No,"No; It is blue","Yes; Always",x\n')
    (ex,) = load_examples(csv_path)
    assert ex == PreferenceExample("Q: Is the sky green?\nA:", "No", "Yes")
    assert parse_rows("0-2,5", 10) == [0, 1, 2, 5] and parse_rows("3:5", 10) == [3, 4]
    with pytest.raises(InvalidRequestError, match="out of range"):
        parse_rows("0-20", 10)
    assert dataset_hash(EXAMPLES) == dataset_hash(list(EXAMPLES)) != dataset_hash(EXAMPLES[:2])


# -- registry ------------------------------------------------------------------------------------------------------
def test_registry_rename_and_model_identity(tiny_lm, tmp_path):
    reg = VectorStore(tmp_path, tiny_lm.info.identity())
    reg.load_all()
    vec = build(tiny_lm, BuildRequest(EXAMPLES, "caa")).vector
    reg.put("a", vec)
    reg.put("b", SteeringVector({0: torch.ones(tiny_lm.hidden_size)}))
    with pytest.raises(VectorExistsError):
        reg.rename("a", "b")
    reg.rename("a", "c")
    assert reg.names() == ["b", "c"] and sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors",
                                                                                      "c.safetensors"]
    again = VectorStore(tmp_path, tiny_lm.info.identity())
    assert again.load_all() == 2 and again.get("c").metadata["method"] == "caa"
    torch.testing.assert_close(again.get("c").values[1], vec.values[1])
    # a vector built for another model of the very same shape is refused, on upload and at load
    other = ModelIdentity("other-model", tiny_lm.hidden_size, tiny_lm.num_layers, "llama", 400)
    foreign = SteeringVector(dict(vec.values), metadata={**vec.metadata, "model": other.as_dict()})
    with pytest.raises(ModelMismatchError, match="built for another model: name 'other-model'"):
        reg.put("foreign", foreign)
    foreign.save(tmp_path / "foreign.safetensors")
    assert again.load_all() == 2 and "foreign.safetensors" in again.skipped


WRITER = textwrap.dedent("""
    import sys, torch
    from steering.engine import ModelIdentity
    from steering.store import VectorStore
    from steering.vectors import SteeringVector
    reg = VectorStore(sys.argv[1], ModelIdentity("m", 4096, 64))
    big = {layer: torch.full((4096,), 2.0) for layer in range(64)}
    print("ready", flush=True)
    while True:
        reg.put("v", SteeringVector(big), overwrite=True)
""")


def test_killed_write_leaves_the_registry_intact(tmp_path):
    """SIGKILL a process that keeps rewriting a vector: the file on disk is always a whole, valid vector."""
    reg = VectorStore(tmp_path, ModelIdentity("m", 4096, 64))
    reg.load_all()
    reg.put("v", SteeringVector({layer: torch.full((4096,), 1.0) for layer in range(64)}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check = VectorStore(tmp_path, ModelIdentity("m", 4096, 64))
        assert check.load_all() == 1 and not check.skipped
        v = check.get("v")
        assert len(v.layers) == 64 and float(v.values[63][0]) in (1.0, 2.0)


# -- jobs beside generation ----------------------------------------------------------------------------------------
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


# -- CLI -----------------------------------------------------------------------------------------------------------
def test_cli_vectors(tiny_dir, tiny_lm, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(e.__dict__) for e in EXAMPLES) + "\n")
    vd = ["--vector-dir", str(tmp_path / "vecs")]
    model = ["--model", str(tiny_dir), "--device", "cpu"]
    r = CliRunner().invoke(app, ["vectors", "build", str(data), "--name", "g", "--param", "k=3", "--param",
                                 "n_steps=4", "--validation", str(data), "--validation-rows", "0-2",
                                 "--scales", "0.5,1", "--layers", "1-2", *vd, *model])
    assert r.exit_code == 0, r.output
    assert "saved g (2 layers)" in r.output
    reg = VectorStore(tmp_path / "vecs", tiny_lm.info.identity())
    reg.load_all()
    v = reg.get("g")
    assert v.layers == [1, 2] and v.metadata["sweep"]["examples"] == 3 and v.metadata["params"]["n_steps"] == 4
    assert CliRunner().invoke(app, ["vectors", "build", str(data), "--name", "g", *vd, *model]).exit_code != 0
    r = CliRunner().invoke(app, ["vectors", "export-gguf", "g", str(tmp_path / "g.gguf"), "--scale", "2", *vd])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["vectors", "import-gguf", str(tmp_path / "g.gguf"), "g2", *vd, *model])
    assert r.exit_code == 0, r.output
    reg.load_all()
    torch.testing.assert_close(reg.get("g2").values[2], 2 * v.values[2])
    assert CliRunner().invoke(app, ["vectors", "rename", "g2", "g3", *vd]).exit_code == 0
    r = CliRunner().invoke(app, ["vectors", "list", *vd])
    assert r.exit_code == 0 and "g3" in r.output and "g2" not in r.output
    r = CliRunner().invoke(app, ["vectors", "sweep", "g", str(data), "--scales", "1", "--output",
                                 str(tmp_path / "s.json"), *vd, *model])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "s.json").read_text())["table"]) == 2
    bad = CliRunner().invoke(app, ["vectors", "build", str(data), "--name", "x", "--method", "zz", *vd, *model])
    assert bad.exit_code == 2 and "valid methods" in bad.output
    assert CliRunner().invoke(app, ["vectors", "delete", "g3", *vd]).exit_code == 0


def test_gguf_export_of_a_built_vector_round_trips(tiny_lm, tmp_path):
    from steering.gguf_vectors import export_controlvector, import_controlvector

    vec = build(tiny_lm, BuildRequest(EXAMPLES, "caa", {"layers": [1, 2, 3]})).vector
    export_controlvector(vec, tmp_path / "v.gguf", model_hint="llama")
    back = import_controlvector(tmp_path / "v.gguf", num_layers=tiny_lm.num_layers, hidden_size=tiny_lm.hidden_size)
    assert back.layers == [1, 2, 3]
    for layer in back.layers:
        torch.testing.assert_close(back.values[layer], vec.values[layer])
    with pytest.raises(SteeringValidationError):
        import_controlvector(tmp_path / "v.gguf", num_layers=2)
