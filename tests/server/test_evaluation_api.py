"""``POST /v1/evaluations`` over real HTTP: TruthfulQA and steering-effect jobs with progress, the report and its
Markdown table, cancellation, the job metrics, and bad requests in the OpenAI envelope."""

from __future__ import annotations

import httpx
import pytest

from clients import SteerClient, SteerServeError
from clients.steerserve_client import read_truthfulqa_csv
from steering.backends.hf import EngineConfig, HFEngine
from steering.datasets import PreferenceExample
from steering.store import VectorStore
from steering.tasks.builders import BuildRequest, build
from tests.live import live_server

CSV = (
    "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    'Adversarial,Misc,Is the sky green?,No it is blue,"No it is blue; It is not green","Yes; It is always green",x\n'
    'Adversarial,Misc,Can pigs fly?,No,"No; Pigs cannot fly","Yes; Pigs fly south",x\n'
    'Adversarial,Misc,The quick brown fox,jumps over the dog,"jumps over the dog","is sad",x\n'
)


@pytest.fixture(scope="module")
def server(tiny_lm, tmp_path_factory):
    vd = tmp_path_factory.mktemp("vectors")
    vec = build(tiny_lm, BuildRequest([PreferenceExample("The day was", "good", "bad"),
                                       PreferenceExample("My friend is", "kind", "cruel")], "caa")).vector
    VectorStore(vd, tiny_lm.info.identity()).put("pos", vec)
    engine = HFEngine(tiny_lm, EngineConfig(max_batch_size=4, job_chunk_tokens=128)).start()
    with live_server(engine, vector_dir=vd, job_chunk_tokens=128) as (url, app):
        yield url, vec
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return SteerClient(server[0])


def test_truthfulqa_job_from_a_csv(server, client, tmp_path):
    url, vec = server
    path = tmp_path / "tqa.csv"
    path.write_text(CSV)
    questions = read_truthfulqa_csv(path)
    assert questions[0]["correct_answers"] == ["No it is blue", "It is not green"]
    conditions = [{"steering": {"vectors": [{"name": "pos", "scale": 0.5, "layers": [1, 2], "normalize": True}]},
                   "relative": True},
                  {"label": "abs", "steering": {"vectors": [{"name": "pos", "scale": 8.0, "layers": [2]}]}}]
    job = client.evaluate_truthfulqa(path, rows=[0, 1, 2], conditions=conditions, per_question=True)
    assert job["type"] == "evaluation_truthfulqa" and job["status"] in ("queued", "running")
    seen = []
    done = client.wait(job["id"], poll=0.01, on_progress=seen.append)
    assert done["status"] == "succeeded", done["error"]
    report = done["result"]["report"]
    assert [c["label"] for c in report["conditions"]] == ["unsteered", "pos@L1,2 x0.5 rel", "abs"]
    rel = report["conditions"][1]["steering"]
    assert [a["layers"] for a in rel] == [[1], [2]]
    assert [a["scale"] for a in rel] == pytest.approx([0.5 * vec.metadata["hidden_norms"][k] for k in ("1", "2")])
    assert all(len(c["per_question"]) == 3 for c in report["conditions"])
    assert set(report["conditions"][2]["versus_baseline"]) == {"binary", "mc1", "mc2", "margin"}
    assert "| abs |" in done["result"]["markdown"]
    # the same evaluation without steering gives the baseline row (to float noise: the batches differ)
    again = client.wait(client.evaluate_truthfulqa(path, rows=[0, 1, 2])["id"], poll=0.01)
    assert again["result"]["report"]["conditions"][0]["metrics"] == pytest.approx(
        report["conditions"][0]["metrics"], abs=1e-4)
    metrics = httpx.get(url + "/metrics").text
    assert 'status="succeeded",type="evaluation_truthfulqa"} 2.0' in metrics


def test_steer_job_progress_and_report(server, client):
    job = client.evaluate_steering(["The day was", "My friend is"], conditions=[
        {"label": "pos", "steering": {"vectors": [{"name": "pos", "scale": 1.0, "layers": [1]}]}, "relative": True}],
        max_tokens=4, chat=False)
    assert job["type"] == "evaluation_steer"
    seen = []
    done = client.wait(job["id"], poll=0.005, on_progress=seen.append)
    assert done["status"] == "succeeded", done["error"]
    report = done["result"]["report"]
    assert report["kind"] == "steer" and report["settings"]["scorer"] == "sentiment"
    steered = report["conditions"][1]
    assert set(steered["metrics"]) == {"score", "perplexity", "distinct_1", "distinct_2", "distinct_3", "tokens"}
    assert steered["versus_baseline"]["perplexity"]["ratio"] > 0 and len(steered["samples"]) == 2
    assert any(j["stage"] in ("generating", "perplexity") for j in seen if j["status"] == "running")
    assert done["progress"] == 1.0 and done["compute_seconds"] > 0
    assert [s["name"] for s in client.scorers()] == ["keywords", "sentiment"]


def test_cancel_a_steer_job(server, client):
    job = client.evaluate_steering(["The day was"] * 40, max_tokens=64, chat=False, scorer=None)
    client.cancel_job(job["id"])
    done = client.wait(job["id"], poll=0.01, timeout=60)
    assert done["status"] == "cancelled"


@pytest.mark.parametrize("body, param, fragment", [
    ({"type": "truthfulqx", "questions": []}, None, "type"),
    ({"type": "steer", "prompts": ["hi"], "scorerr": "sentiment"}, "scorerr", "unknown field"),
    ({"type": "steer", "prompts": ["hi"], "scorer": "vibes"}, "scorer", "valid: keywords, sentiment"),
    ({"type": "steer", "prompts": ["hi"], "scorer_params": {"component": "happy"}}, "params.component", "component"),
    ({"type": "steer", "prompts": []}, "prompts", "at least 1"),
    ({"type": "truthfulqa", "questions": [{"question": "q", "best_answer": "a", "incorrect_answers": []}]},
     "questions.0.incorrect_answers", "at least 1"),
    ({"type": "truthfulqa", "questions": [{"question": "q", "best_answer": "a", "incorrect_answers": ["b"]}],
      "template": "no field"}, "template", "{question}"),
    ({"type": "steer", "prompts": ["hi"], "conditions": [
        {"steering": {"vectors": [{"values": {"1": [0.0] * 64}, "scale": 1.0}]}, "relative": True}]},
     "conditions[0].relative", "registered vector"),
    ({"type": "steer", "prompts": ["hi"], "conditions": [
        {"steering": {"vectors": [{"name": "pos", "scale": 1.0, "layers": [7]}]}}]}, None, "layer 7"),
    ({"type": "steer", "prompts": ["hi"], "conditions": [
        {"steering": {"vectors": [{"name": "nope", "scale": 1.0}]}}]}, None, "nope"),
    ({"type": "steer", "prompts": ["hi"], "conditions": [
        {"label": "unsteered", "steering": {"vectors": [{"name": "pos", "scale": 1.0}]}}]}, "conditions", "unique"),
])
def test_bad_requests_get_the_envelope(server, body, param, fragment):
    r = httpx.post(server[0] + "/v1/evaluations", json=body)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert fragment in err["message"], err
    if param is not None:
        assert err["param"] == param


def test_client_error_type(server, client):
    with pytest.raises(SteerServeError) as info:
        client.evaluate({"type": "steer", "prompts": ["hi"], "max_tokens": 0})
    assert info.value.status == 400 and info.value.param == "max_tokens"
