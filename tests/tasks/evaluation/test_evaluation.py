"""TruthfulQA scoring, conditions, scorers and the steering-effect evaluation."""

from __future__ import annotations

import math
import time

import pytest
import torch

from steering.datasets import TruthfulQAItem, read_truthfulqa
from steering.engine.jobs import JobCancelledError
from steering.errors import InvalidRequestError, SteeringValidationError
from steering.spec import SteeringApplication, SteeringSpec
from steering.tasks.evaluation import (
    Condition,
    QAFormat,
    SteerEvalRequest,
    TruthfulQARequest,
    distinct_n,
    evaluate_truthfulqa,
    get_scorer,
    label_for,
    prepare_steer,
    relative_applications,
    start_steer,
)
from steering.tasks.evaluation.report import mcnemar_p, paired
from steering.tasks.evaluation.truthfulqa import encode_questions, question_scores
from tests.tiny import TRUTHFULQA_CSV


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> list[TruthfulQAItem]:
    path = tmp_path_factory.mktemp("tqa") / "tqa.csv"
    path.write_text(TRUTHFULQA_CSV)
    return read_truthfulqa(path)


def plain_logprob(lm, prompt, answer, hook_layer=None, fn=None) -> float:
    """Summed log P(answer | prompt) from one plain forward, optionally with a forward hook on a layer."""
    handle = lm.layers[hook_layer].register_forward_hook(fn) if hook_layer is not None else None
    try:
        with torch.no_grad():
            out = lm.model(input_ids=torch.tensor([prompt + answer]))
    finally:
        if handle:
            handle.remove()
    lp = out.logits[0].double().log_softmax(-1)
    P = len(prompt)
    return float(lp[P - 1:P - 1 + len(answer)].gather(-1, torch.tensor(answer).unsqueeze(-1)).sum())


def steer_hook(v, s):
    def fn(m, a, o):
        h = o[0] if isinstance(o, tuple) else o
        new = (h + s * v) * h.norm(dim=-1, keepdim=True) / (h + s * v).norm(dim=-1, keepdim=True)
        return (new,) + tuple(o[1:]) if isinstance(o, tuple) else new
    return fn


def test_question_scores_by_hand():
    # true answers first (best at 0), then incorrect ones
    s = question_scores([-1.0, -3.0, -2.0, -0.5], n_true=2)
    assert s["binary"] == 1.0 and s["mc1"] == 0.0 and s["margin"] == pytest.approx(1.0)
    p = [math.exp(x) for x in (-1.0, -3.0, -2.0, -0.5)]
    assert s["mc2"] == pytest.approx((p[0] + p[1]) / sum(p))
    s = question_scores([-0.1, -5.0, -4.0], n_true=1)
    assert s["binary"] == s["mc1"] == 1.0


def test_truthfulqa_matches_plain_forwards_with_and_without_steering(tiny_lm, items, sentiment_vector):
    cond = Condition("pos@L2", SteeringSpec([SteeringApplication(sentiment_vector, 3.0, [2], "all", True)]))
    rep = evaluate_truthfulqa(tiny_lm, TruthfulQARequest(items, [cond], per_question=True), chunk_tokens=64)
    data = encode_questions(tiny_lm, items, QAFormat())
    assert [len(q.answers) for q in data] == [4, 4, 5, 2]  # best + other correct, then incorrect (deduplicated)
    for ci, (layer, fn) in enumerate([(None, None), (2, steer_hook(sentiment_vector.values[2], 3.0))]):
        per_q = rep.as_dict()["conditions"][ci]["per_question"]
        for q, got in zip(data, per_q):
            ref = question_scores([plain_logprob(tiny_lm, q.prompt, a, layer, fn) for a in q.answers], q.n_true)
            for k in ("binary", "mc1"):
                assert got[k] == ref[k]
            assert got["mc2"] == pytest.approx(ref["mc2"], abs=1e-4)
            assert got["margin"] == pytest.approx(ref["margin"], abs=1e-3)
    d = rep.as_dict()
    assert d["baseline"] == "unsteered" and d["data"]["examples"] == 4 and d["data"]["hash"].startswith("sha256:")
    base, steered = d["conditions"]
    assert steered["steering"][0]["layers"] == [2] and base["steering"] is None
    for m in ("binary", "mc1", "mc2"):
        assert base["metrics"][m] == pytest.approx(sum(q[m] for q in base["per_question"]) / 4)
        assert steered["versus_baseline"][m]["diff"] == pytest.approx(steered["metrics"][m] - base["metrics"][m])
    md = rep.markdown()
    assert md.count("\n| ") == 3 and "| unsteered |" in md and "| pos@L2 |" in md and "MC1" in md and "MC2" in md


def test_chat_format_and_template_checks(tiny_lm, items):
    chat = encode_questions(tiny_lm, items[:1], QAFormat("Question: {question}", "chat"))
    raw = encode_questions(tiny_lm, items[:1], QAFormat())
    text = tiny_lm.tokenizer.decode(chat[0].prompt)
    assert "Question: Is the sky green?" in text and chat[0].prompt != raw[0].prompt
    assert tiny_lm.tokenizer.decode(raw[0].answers[0]) == " No it is blue"
    assert tiny_lm.tokenizer.decode(chat[0].answers[0]) == "No it is blue"
    with pytest.raises(InvalidRequestError, match="must contain"):
        encode_questions(tiny_lm, items, QAFormat("no field"))
    with pytest.raises(InvalidRequestError, match="no other field"):
        encode_questions(tiny_lm, items, QAFormat("{question} {other}"))
    with pytest.raises(InvalidRequestError, match="format spec"):  # would pad every prompt to 10^8 characters
        encode_questions(tiny_lm, items, QAFormat("{question:>99999999}"))
    with pytest.raises(InvalidRequestError, match="no questions"):
        evaluate_truthfulqa(tiny_lm, TruthfulQARequest([], []))


def test_paired_counts_and_mcnemar():
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32) and mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0
    r = paired([0, 0, 1, 1, 0], [1, 1, 1, 0, 0])
    assert r["gained"] == 2 and r["lost"] == 1 and r["diff"] == pytest.approx(0.2)


def test_conditions_relative_and_labels(tiny_lm, sentiment_vector):
    apps = relative_applications(sentiment_vector, 0.5, [1, 2])
    assert [a.layers for a in apps] == [[1], [2]]
    norms = sentiment_vector.metadata["hidden_norms"]
    assert [a.scale for a in apps] == pytest.approx([0.5 * norms[str(x)] for x in (1, 2)])
    from steering.vectors import SteeringVector

    with pytest.raises(InvalidRequestError, match="relative scales need"):
        relative_applications(SteeringVector({1: sentiment_vector.values[1]}, name="bare"), 1.0)
    assert label_for("v", [3], 1.5, False) == "v@L3 x1.5" and label_for("v", [1, 2, 3, 4], 0.5, True) == \
        "v@L1-4 x0.5 rel"
    bad = Condition("x", SteeringSpec([SteeringApplication(sentiment_vector, 1.0, [9])]))
    with pytest.raises(SteeringValidationError, match=r"conditions\[0\] \(x\)"):
        evaluate_truthfulqa(tiny_lm, TruthfulQARequest([TruthfulQAItem("q", "a", (), ("b",))], [bad]))
    dup = [Condition("unsteered", SteeringSpec([SteeringApplication(sentiment_vector, 1.0, [1])]))]
    with pytest.raises(InvalidRequestError, match="unique"):
        evaluate_truthfulqa(tiny_lm, TruthfulQARequest([TruthfulQAItem("q", "a", (), ("b",))], dup))


def test_scorers_and_distinct_n():
    s = get_scorer("sentiment")
    good, bad, flat = s.score(["What a wonderful, happy day!", "This is awful and I hate it.", "The table."])
    assert good > 0.5 and bad < -0.5 and flat == 0.0
    assert get_scorer("sentiment", {"component": "neg"}).score(["I hate it"])[0] > 0.5
    kw = get_scorer("keywords", {"words": ["cat", "dog"]})
    assert kw.score(["A Cat sat.", "concatenate", "no"]) == [1.0, 0.0, 0.0]
    with pytest.raises(InvalidRequestError, match="valid: keywords, sentiment"):
        get_scorer("sentimnet")
    with pytest.raises(InvalidRequestError, match="unknown parameter"):
        get_scorer("sentiment", {"compnent": "pos"})
    with pytest.raises(InvalidRequestError, match="words"):
        get_scorer("keywords", {})
    assert distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert distinct_n(["x"], 2) == 0.0


PROMPTS = ["The day was", "My friend is", "I love this movie, it is"]


def test_steer_eval_generates_scores_and_measures_perplexity(make_engine, tiny_lm, sentiment_vector):
    engine = make_engine(max_batch_size=2)
    cond = Condition("pos", SteeringSpec([SteeringApplication(sentiment_vector, 40.0, [1, 2], "all", True)]))
    req = SteerEvalRequest(PROMPTS, [cond], scorer="keywords", scorer_params={"words": ["happy", "good"]},
                           chat=False, max_tokens=6, samples=2)
    prep = prepare_steer(tiny_lm, req)
    handle = start_steer(engine, prep)
    seen = []
    while not handle.done():
        seen.append(handle.progress)
        time.sleep(0.005)
    rep = handle.result()
    d = rep.as_dict()
    base, steered = d["conditions"]
    assert [c["label"] for c in d["conditions"]] == ["unsteered", "pos"]
    assert len(base["samples"]) == 2 and base["samples"][0]["prompt"] == PROMPTS[0]
    # the same generations as plain engine requests
    from steering.sampling import SamplingParams

    gens = {}
    for label, spec in (("unsteered", None), ("pos", cond.spec)):
        gens[label] = [engine.generate(p, SamplingParams(max_tokens=6, temperature=0), spec) for p in prep.prompt_ids]
    assert [s["text"] for s in steered["samples"]] == [g.text for g in gens["pos"][:2]]
    assert gens["pos"][0].token_ids != gens["unsteered"][0].token_ids
    # perplexity of each condition's text under the unsteered model, from plain forwards
    for label, c in (("unsteered", base), ("pos", steered)):
        lp = sum(plain_logprob(tiny_lm, p, g.token_ids) for p, g in zip(prep.prompt_ids, gens[label]))
        n = sum(len(g.token_ids) for g in gens[label])
        assert c["metrics"]["perplexity"] == pytest.approx(math.exp(-lp / n), rel=1e-3)
    assert steered["versus_baseline"]["perplexity"]["ratio"] == pytest.approx(
        steered["metrics"]["perplexity"] / base["metrics"]["perplexity"])
    kw = get_scorer("keywords", {"words": ["happy", "good"]})
    assert steered["metrics"]["score"] == pytest.approx(sum(kw.score([g.text for g in gens["pos"]])) / 3)
    assert steered["metrics"]["distinct_1"] == pytest.approx(distinct_n([g.text for g in gens["pos"]], 1))
    fractions = [p.overall() for p in seen if p.overall() is not None]
    assert fractions == sorted(fractions) and {p.stage for p in seen} >= {"generating"}
    assert "| pos |" in rep.markdown() and "keywords" in rep.markdown()


def test_steer_eval_checks_before_work_and_cancels(make_engine, tiny_lm, sentiment_vector):
    with pytest.raises(InvalidRequestError, match="no prompts"):
        prepare_steer(tiny_lm, SteerEvalRequest([]))
    with pytest.raises(InvalidRequestError, match="unknown scorer"):
        prepare_steer(tiny_lm, SteerEvalRequest(["hi"], scorer="nope"))
    with pytest.raises(InvalidRequestError, match="temperature"):
        prepare_steer(tiny_lm, SteerEvalRequest(["hi"], temperature=-1))
    with pytest.raises(InvalidRequestError, match="longer than the model"):
        prepare_steer(tiny_lm, SteerEvalRequest(["hi"], max_tokens=10**6))
    engine = make_engine(max_batch_size=1)
    prep = prepare_steer(tiny_lm, SteerEvalRequest(PROMPTS * 4, scorer=None, chat=False, max_tokens=64))
    handle = start_steer(engine, prep)
    time.sleep(0.05)
    handle.cancel()
    with pytest.raises(JobCancelledError):
        handle.result(timeout=30)
    deadline = time.time() + 10
    while (engine.stats().running or engine.stats().waiting) and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats().running == 0 and engine.stats().waiting == 0
    assert engine.generate(prep.prompt_ids[0]).token_ids  # the engine still serves
