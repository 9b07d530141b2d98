"""Images over HTTP: OpenAI chat content parts with images on a tiny vision-language model, steered and not, and
every bad image refused alone with a 400 that names it."""

from __future__ import annotations

import io
import time

import httpx
import openai
import pytest
import torch
from PIL import Image

from steering.backends.hf import EngineConfig, HFEngine
from steering.engine import GenerationRequest
from steering.multimodal import ImageLimits, load_image
from steering.sampling import SamplingParams
from steering.spec import SteeringApplication, SteeringSpec
from steering.vectors import SteeringVector
from tests.live import live_server
from tests.tiny import data_url, random_image

TIMEOUT = 120.0
"""Attributions and builds run on a shared 2-core machine: generous timeouts."""


def post(url: str, **kw):
    return httpx.post(url, timeout=TIMEOUT, **kw)


def get(url: str, **kw):
    return httpx.get(url, timeout=TIMEOUT, **kw)


@pytest.fixture(scope="module")
def vision(vlm, tmp_path_factory):
    """A live server on a tiny LLaVA-style model: (url, engine, lm, the directory it reads images from)."""
    lm = vlm("llava")
    folder = tmp_path_factory.mktemp("images")
    (folder / "cat.png").write_bytes(random_image(5))
    eng = HFEngine(lm, EngineConfig(max_batch_size=4)).start()
    with live_server(eng, vector_dir=tmp_path_factory.mktemp("vectors"), image_dirs=[str(folder)], max_images=2,
                     max_image_pixels=100 * 100, image_formats=["PNG", "JPEG"]) as (url, _):
        yield url, eng, lm, folder
    eng.shutdown()


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def image_part(url: str, **extra):
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def text_part(text: str):
    return {"type": "text", "text": text}


def test_the_openai_sdk_sends_an_image_and_gets_the_engines_steered_answer(vision):
    url, eng, lm, _ = vision
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert client.models.list().data[0].model_extra["input_modalities"] == ["text", "image"]
    png = random_image(1)
    values = {1: torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0)).tolist()}
    steering = {"vectors": [{"values": values, "scale": 8.0, "positions": "image"}]}
    msgs = user(image_part(data_url(png)), text_part("What is this?"))
    r = client.chat.completions.create(model=lm.name, messages=msgs, max_tokens=8, temperature=0,
                                       extra_body={"steering": steering})
    plain = client.chat.completions.create(model=lm.name, messages=msgs, max_tokens=8, temperature=0)
    ids, placed = lm.inputs.encode_chat_prompt(
        [{"role": "user", "content": [{"type": "image", "image": load_image(data_url(png), ImageLimits())},
                                      {"type": "text", "text": "What is this?"}]}])
    sp = SamplingParams(max_tokens=8, temperature=0)
    vec = SteeringVector({1: torch.tensor(values[1])})
    want = eng.submit(GenerationRequest(ids, sp, SteeringSpec([SteeringApplication(vec, 8.0, positions="image")]),
                                        images=placed)).result()
    want_plain = eng.submit(GenerationRequest(ids, sp, images=placed)).result()
    assert r.choices[0].message.content == want.text and plain.choices[0].message.content == want_plain.text
    assert want.token_ids != want_plain.token_ids  # steering the image tokens changed the answer
    assert r.usage.prompt_tokens == len(ids) == plain.usage.prompt_tokens
    assert r.model_extra["steering"][0]["positions"] == list(placed[0].positions)
    stream = client.chat.completions.create(model=lm.name, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                            extra_body={"steering": steering})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text


def test_an_allowed_file_is_read_and_tokenize_counts_the_image_tokens(vision):
    url, _, lm, folder = vision
    by_file = post(url + "/v1/chat/completions", json={
        "model": lm.name, "max_tokens": 6, "temperature": 0,
        "messages": user(image_part(f"file://{folder / 'cat.png'}"), text_part("Hi"))}).json()
    inline = post(url + "/v1/chat/completions", json={
        "model": lm.name, "max_tokens": 6, "temperature": 0,
        "messages": user(image_part(data_url(random_image(5))), text_part("Hi"))}).json()
    assert by_file["choices"][0]["message"]["content"] == inline["choices"][0]["message"]["content"]
    tok = post(url + "/tokenize", json={"model": lm.name, "messages": user(image_part(data_url(random_image(5))),
                                                                                text_part("Hi"))}).json()
    assert tok["count"] == by_file["usage"]["prompt_tokens"]
    assert tok["tokens"].count(lm.vision.image_token_id) == 16


def _encoded(fmt: str, size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


BAD = {
    "http URL": (image_part("https://example.com/cat.png"), "network"),
    "ftp URL": (image_part("ftp://example.com/cat.png"), "network"),
    "unknown scheme": (image_part("s3://bucket/cat.png"), "scheme"),
    "bad base64": (image_part("data:image/png;base64,@@@not-base64@@@"), "base64"),
    "not an image": (image_part(data_url(b"plain text, not pixels")), "cannot be decoded"),
    "truncated image": (image_part(data_url(random_image(1)[:60])), "cannot be decoded"),
    "unsupported format": (image_part(data_url(_encoded("GIF"), "image/gif")), "format GIF"),
    "too many pixels": (image_part(data_url(_encoded("PNG", (200, 100)))), "pixels"),
    "file outside the allowed directories": (image_part("file:///etc/passwd"), "not inside"),
    "missing file": (image_part("/nonexistent/cat.png"), "no image file"),
    "detail high": (image_part(data_url(random_image(1)), detail="high"), "detail"),
    "empty URL": (image_part(""), "url"),
}
WIRE = {"detail high", "empty URL"}
"""Refused by the wire schema (pydantic's dotted locations) rather than by the image checks."""


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_bad_image_is_a_400_naming_it(vision, case):
    url, _, lm, _ = vision
    part, words = BAD[case]
    r = post(url + "/v1/chat/completions", json={"model": lm.name, "max_tokens": 4,
                                                       "messages": user(text_part("Look:"), part)})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words.lower() in err["message"].lower()
    # the core names the part; a wire-level refusal (detail) is pydantic's dotted location
    assert err["param"].startswith("messages[0].content[1]" if case not in WIRE else "messages.0.content")


def test_too_many_images_and_placeholders_written_as_text_are_400(vision):
    url, _, lm, _ = vision
    img = image_part(data_url(random_image(1)))
    r = post(url + "/v1/chat/completions", json={"model": lm.name, "max_tokens": 4,
                                                       "messages": user(img, img, img, text_part("three"))})
    assert r.status_code == 400 and "at most 2" in r.json()["error"]["message"]
    r = post(url + "/v1/chat/completions", json={"model": lm.name, "max_tokens": 4,
                                                       "messages": user(img, text_part("and <image> too"))})
    assert r.status_code == 400 and "placeholder" in r.json()["error"]["message"]
    for body in ({"messages": [{"role": "user", "content": "no picture, only <image>"}]},
                 {"prompt": "a typed <image> placeholder"}, {"prompt": [1, 2, lm.vision.image_token_id]}):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = post(url + path, json={"model": lm.name, "max_tokens": 4, **body})
        assert r.status_code == 400 and "no image of the request fills" in r.json()["error"]["message"], r.text
    r = post(url + "/v1/chat/completions", json={
        "model": lm.name, "max_tokens": 4, "messages": user(text_part("no image here")),
        "steering": {"vectors": [{"values": {"1": [0.1] * lm.hidden_size}, "positions": "image"}]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.vectors[0].positions"


def test_a_text_model_refuses_images_with_a_400(server, model_name):
    url, _ = server
    r = post(url + "/v1/chat/completions", json={
        "model": model_name, "max_tokens": 4,
        "messages": user(image_part(data_url(random_image(1))), text_part("What is this?"))})
    assert r.status_code == 400
    assert "does not take images" in r.json()["error"]["message"]


def _job(url: str, job_id: str) -> dict:
    deadline = time.time() + 120
    while time.time() < deadline:
        job = get(f"{url}/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_attribution_over_an_image_returns_its_patch_grid(vision):
    url, _, lm, _ = vision
    r = post(url + "/v1/attributions", json={
        "model": lm.name, "messages": user(image_part(data_url(random_image(2))), text_part("What is this?")),
        "contrast": {"preferred": "a cat", "dispreferred": "a dog"}, "method": "integrated_gradients",
        "params": {"n_steps": 8}})
    assert r.status_code == 200, r.text
    body = r.json()
    [grid] = body["images"]
    assert (grid["rows"], grid["columns"], grid["width"], grid["height"]) == (4, 4, 40, 30)
    scores = {t["position"]: t["score"] for t in body["input_tokens"]}
    assert [x for row in grid["scores"] for x in row] == [scores[p] for p in grid["positions"]]
    assert all(not t["special"] for t in body["input_tokens"] if t["position"] in grid["positions"])
    bad = post(url + "/v1/attributions", json={
        "model": lm.name, "messages": user(image_part("https://example.com/x.png"), text_part("Hi")),
        "target": "a cat"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[0].content[0].image_url"


def test_builds_sweeps_and_evaluations_take_image_examples_over_http(vision):
    url, _, lm, _ = vision
    examples = [{"prompt": "Describe the picture.", "preferred": p, "dispreferred": n,
                 "image": data_url(random_image(20 + i))}
                for i, (p, n) in enumerate([("bright", "dark"), ("happy", "sad"), ("calm", "stormy")])]
    r = post(url + "/v1/steering/vectors/build", json={
        "name": "picture", "method": "caa", "examples": examples, "params": {"prompt_format": "chat"},
        "validation": examples, "sweep": {"scales": [0.5, 1], "layers": [1], "positions": ["image", "all"]}})
    assert r.status_code == 202, r.text
    job = _job(url, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert {row["positions"] for row in job["result"]["sweep"]["table"]} == {"image", "all"}
    questions = [{"question": e["prompt"], "best_answer": e["preferred"], "incorrect_answers": [e["dispreferred"]],
                  "image": e["image"]} for e in examples]
    r = post(url + "/v1/evaluations", json={
        "type": "truthfulqa", "questions": questions, "template": "{question}", "prompt_format": "chat",
        "conditions": [{"label": "img", "steering": {"vectors": [{"name": "picture", "scale": 4, "layers": [1],
                                                                  "positions": "image"}]}}]})
    assert r.status_code == 202, r.text
    job = _job(url, r.json()["id"])
    assert job["status"] == "succeeded", job
    rows = job["result"]["report"]["conditions"]
    assert [c["label"] for c in rows][1:] == ["img"] and rows[0]["metrics"]["binary"] == \
        job["result"]["report"]["conditions"][0]["metrics"]["mc1"]  # two answers: binary is MC1
    bad = dict(examples[0], image="data:image/png;base64,AAAA")
    r = post(url + "/v1/steering/vectors/build", json={"name": "bad", "method": "caa", "examples": [bad]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "examples[0].image"
