"""Images over HTTP: OpenAI chat content parts with images on a tiny vision-language model, steered and not, and
every bad image refused alone with a 400 that names it."""

from __future__ import annotations

import io

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
    by_file = httpx.post(url + "/v1/chat/completions", json={
        "model": lm.name, "max_tokens": 6, "temperature": 0,
        "messages": user(image_part(f"file://{folder / 'cat.png'}"), text_part("Hi"))}).json()
    inline = httpx.post(url + "/v1/chat/completions", json={
        "model": lm.name, "max_tokens": 6, "temperature": 0,
        "messages": user(image_part(data_url(random_image(5))), text_part("Hi"))}).json()
    assert by_file["choices"][0]["message"]["content"] == inline["choices"][0]["message"]["content"]
    tok = httpx.post(url + "/tokenize", json={"model": lm.name, "messages": user(image_part(data_url(random_image(5))),
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
    r = httpx.post(url + "/v1/chat/completions", json={"model": lm.name, "max_tokens": 4,
                                                       "messages": user(text_part("Look:"), part)})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words.lower() in err["message"].lower()
    # the core names the part; a wire-level refusal (detail) is pydantic's dotted location
    assert err["param"].startswith("messages[0].content[1]" if case not in WIRE else "messages.0.content")


def test_too_many_images_and_placeholders_written_as_text_are_400(vision):
    url, _, lm, _ = vision
    img = image_part(data_url(random_image(1)))
    r = httpx.post(url + "/v1/chat/completions", json={"model": lm.name, "max_tokens": 4,
                                                       "messages": user(img, img, img, text_part("three"))})
    assert r.status_code == 400 and "at most 2" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": lm.name, "max_tokens": 4,
                                                       "messages": user(img, text_part("and <image> too"))})
    assert r.status_code == 400 and "placeholder" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={
        "model": lm.name, "max_tokens": 4, "messages": user(text_part("no image here")),
        "steering": {"vectors": [{"values": {"1": [0.1] * lm.hidden_size}, "positions": "image"}]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.vectors[0].positions"


def test_a_text_model_refuses_images_with_a_400(server, model_name):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", json={
        "model": model_name, "max_tokens": 4,
        "messages": user(image_part(data_url(random_image(1))), text_part("What is this?"))})
    assert r.status_code == 400
    assert "does not take images" in r.json()["error"]["message"]
