"""lm-evaluation-harness against a live server: its ``local-completions`` model (loglikelihood through token-id
prompts with ``echo``/``logprobs``, and generate_until with batched prompts) and ``local-chat-completions``
(generate_until), on small local YAML tasks over local files; no hub access. Its loglikelihoods equal the
project's own TruthfulQA scorer on the same questions and template."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from steering.sampling import SamplingParams
from tests.live import live_server

QUESTIONS = [
    {"question": "What is the capital of France?", "best_answer": "Paris",
     "incorrect_answers": ["Berlin", "Rome"]},
    {"question": "Can you see the Great Wall of China from space?", "best_answer": "No, it is too narrow",
     "incorrect_answers": ["Yes, it is visible"]},
    {"question": "What does a steering vector change?", "best_answer": "What a language model says",
     "incorrect_answers": ["The weights of the model"]},
    {"question": "Which numbers come after 3?", "best_answer": "4 5 6", "incorrect_answers": ["1 2 0"]},
]
TEMPLATE = "Q: {question}\nA:"

MC_TASK = """task: steer_binary
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{[best_answer, incorrect_answers[0]]}}}}"
doc_to_target: 0
target_delimiter: " "
metric_list:
  - metric: acc
"""

GEN_TASK = """task: steer_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{best_answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "steer_binary.yaml").write_text(MC_TASK.format(data=data))
    (root / "steer_gen.yaml").write_text(GEN_TASK.format(data=data))
    return root


@pytest.fixture(scope="module")
def harness_server(engine, tmp_path_factory):
    with live_server(engine, vector_dir=tmp_path_factory.mktemp("vectors")) as (url, app):
        yield url


def _evaluate(model: str, model_args: dict, task: str, root, **kw):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return simple_evaluate(model=model, model_args=model_args, tasks=[task],
                           task_manager=TaskManager(include_path=str(root), include_defaults=False),
                           log_samples=True, **kw)


def _project_margins(url: str, model_name: str) -> list[float]:
    body = {"type": "truthfulqa", "questions": QUESTIONS, "template": TEMPLATE, "per_question": True}
    r = httpx.post(url + "/v1/evaluations", json=body, timeout=60)
    assert r.status_code in (200, 201, 202), r.text
    job = r.json()
    deadline = time.time() + 120
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline
        time.sleep(0.2)
        job = httpx.get(url + f"/v1/jobs/{job['id']}", timeout=30).json()
    assert job["status"] == "succeeded", job
    rows = job["result"]["report"]["conditions"][0]["per_question"]
    return [row["margin"] for row in rows]


def test_loglikelihood_equals_the_project_scorer(harness_server, tasks, model_name):
    args = {"base_url": harness_server + "/v1/completions", "model": model_name, "tokenizer_backend": "remote",
            "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1, "batch_size": 4}
    out = _evaluate("local-completions", args, "steer_binary", tasks)
    samples = sorted(out["samples"]["steer_binary"], key=lambda s: s["doc_id"])
    assert len(samples) == len(QUESTIONS)
    theirs = [s["resps"][0][0][0] - s["resps"][1][0][0] for s in samples]
    ours = _project_margins(harness_server, model_name)
    assert theirs == pytest.approx(ours, abs=2e-3)
    acc = out["results"]["steer_binary"]["acc,none"]
    assert acc == pytest.approx(sum(m > 0 for m in ours) / len(ours))


def test_generate_until_completions_and_chat(harness_server, tasks, engine, tiny_lm, model_name):
    args = {"base_url": harness_server + "/v1/completions", "model": model_name, "tokenizer_backend": "remote",
            "tokenized_requests": False, "num_concurrent": 1, "max_retries": 1, "batch_size": 2}
    out = _evaluate("local-completions", args, "steer_gen", tasks)
    got = [s["resps"][0][0] for s in sorted(out["samples"]["steer_gen"], key=lambda s: s["doc_id"])]
    want = []
    for q in QUESTIONS:
        ids = tiny_lm.inputs.encode_text(TEMPLATE.format(question=q["question"]))
        want.append(engine.generate(ids, SamplingParams(max_tokens=8, temperature=0, stop=["\n"])).text)
    assert got == want
    chat_args = {"base_url": harness_server + "/v1/chat/completions", "model": model_name, "num_concurrent": 1,
                 "max_retries": 1}
    chat = _evaluate("local-chat-completions", chat_args, "steer_gen", tasks, apply_chat_template=True)
    replies = [s["resps"][0][0] for s in sorted(chat["samples"]["steer_gen"], key=lambda s: s["doc_id"])]
    want_chat = []
    for q in QUESTIONS:
        ids = tiny_lm.inputs.encode_chat([{"role": "user", "content": TEMPLATE.format(question=q["question"])}])
        want_chat.append(engine.generate(ids, SamplingParams(max_tokens=8, temperature=0, stop=["\n"])).text)
    assert replies == want_chat
