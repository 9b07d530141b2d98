"""The rest of the OpenAI surface over real HTTP on a tiny model: penalties, logit_bias, structured outputs, tools,
batched and token-id prompts, echo with prompt logprobs, ``models.retrieve``, ``/tokenizer_info``; each field is
honoured (the server's output equals the engine's with the same core parameters), steering applies under it, and
what cannot be honoured is a 400 naming the field."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from server.protocol.common import SteeringRequest
from steering.sampling import SamplingParams, StructuredOutput
from tests.live import vec_values

MSGS = [{"role": "user", "content": "What is the capital of France?"}]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "count"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}


def _steering(tiny_lm, seed=1, scale=30):
    return {"vectors": [{"values": vec_values(tiny_lm, seed), "scale": scale, "positions": "all",
                         "normalize": True}]}


def _post(url, path, body):
    return httpx.post(url + path, json=body, timeout=60)


def _valid(obj):
    assert set(obj) == {"answer", "count"} and obj["answer"] in {"yes", "no", "maybe"}
    assert isinstance(obj["count"], int) and 0 <= obj["count"] <= 9


def test_neutral_fields_are_accepted_and_change_nothing(server, client, model_name):
    plain = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=8, temperature=0)
    neutral = client.chat.completions.create(
        model=model_name, messages=MSGS, max_tokens=8, temperature=0, frequency_penalty=0, presence_penalty=0,
        logit_bias={}, store=False, metadata={"team": "eval"}, response_format={"type": "text"},
        extra_body={"repetition_penalty": 1.0})
    assert neutral.choices[0].message.content == plain.choices[0].message.content
    legacy = client.completions.create(model=model_name, prompt="Hello", max_tokens=4, temperature=0,
                                       frequency_penalty=0, presence_penalty=0, logit_bias={}, n=1)
    assert legacy.choices[0].text


@pytest.mark.parametrize("fields", [
    {"frequency_penalty": 1.5}, {"presence_penalty": 1.2}, {"repetition_penalty": 1.8},
    {"frequency_penalty": 0.8, "presence_penalty": -0.5, "repetition_penalty": 1.3},
])
def test_penalties_are_honoured(server, engine, tiny_lm, model_name, fields):
    url, _ = server
    body = {"model": model_name, "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, **fields}
    got = _post(url, "/v1/completions", body).json()["choices"][0]["text"]
    ids = tiny_lm.inputs.encode_text("The quick brown fox")
    want = engine.generate(ids, SamplingParams(max_tokens=24, temperature=0, **fields))
    plain = engine.generate(ids, SamplingParams(max_tokens=24, temperature=0))
    assert got == want.text
    assert want.token_ids != plain.token_ids  # the penalty did something on this prompt


def test_logit_bias_forces_and_bans(server, client, tiny_lm, model_name):
    plain = client.completions.create(model=model_name, prompt="Hello there", max_tokens=6, temperature=0)
    ids = tiny_lm.inputs.encode_text("Hello there" + plain.choices[0].text)
    target = 42
    forced = client.completions.create(model=model_name, prompt="Hello there", max_tokens=6, temperature=0,
                                       logit_bias={str(target): 100}, logprobs=0)
    assert forced.choices[0].text == tiny_lm.inputs.decode([target] * 6)
    first = ids[len(tiny_lm.inputs.encode_text("Hello there"))]
    banned = client.completions.create(model=model_name, prompt="Hello there", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != tiny_lm.inputs.decode([first])


def test_json_schema_output_follows_the_schema(server, client, engine, tiny_lm, model_name):
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}
    for temperature, seed in ((0, None), (1.0, 7), (1.0, 8)):
        r = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=60, temperature=temperature,
                                           seed=seed, response_format=fmt)
        _valid(json.loads(r.choices[0].message.content))
        assert r.choices[0].finish_reason == "stop"
    # the same as the engine with the same structured output, and steering applies under it
    steering = _steering(tiny_lm)
    r = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=60, temperature=0,
                                       response_format=fmt, extra_body={"steering": steering})
    ids = tiny_lm.inputs.encode_chat(MSGS)
    spec = SteeringRequest.model_validate(steering).to_core()
    want = engine.generate(ids, SamplingParams(max_tokens=60, temperature=0,
                                               structured=StructuredOutput(json_schema=SCHEMA)), spec)
    assert r.choices[0].message.content == want.text
    _valid(json.loads(want.text))


def test_json_object_and_vllm_structured_outputs(server, client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=80, temperature=0,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    choice = client.completions.create(model=model_name, prompt="Pick one:", max_tokens=10, temperature=1.0,
                                       seed=1, extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert choice.choices[0].text in {"red", "green"}
    regex = client.completions.create(model=model_name, prompt="A number:", max_tokens=10, temperature=1.0,
                                      seed=2, extra_body={"structured_outputs": {"regex": "[0-9]{3}"}})
    assert len(regex.choices[0].text) == 3 and regex.choices[0].text.isdigit()


def test_tool_choice_required_and_named(server, client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=40, temperature=0,
                                       tools=[WEATHER, TIME], tool_choice="required")
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None and msg.tool_calls
    for call in msg.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        assert call.function.name in {"get_weather", "get_time"}
        if call.function.name == "get_weather":
            assert args["city"] in {"Paris", "Rome"}
    named = client.chat.completions.create(
        model=model_name, messages=MSGS, max_tokens=40, temperature=0, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in {"Paris", "Rome"}
    # streamed, the argument deltas add up to the same call
    parts, names = [], []
    for chunk in client.chat.completions.create(
            model=model_name, messages=MSGS, max_tokens=40, temperature=0, tools=[WEATHER, TIME], stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}):
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            names += [d.function.name] if d.function.name else []
            parts.append(d.function.arguments or "")
    assert names == ["get_weather"] and "".join(parts) == call.function.arguments


def test_tool_round_trip_and_auto(server, client, model_name):
    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model=model_name, messages=history, max_tokens=8, temperature=0,
                                       tools=[WEATHER])
    assert r.choices[0].finish_reason in {"stop", "length", "tool_calls"}
    streamed = client.chat.completions.create(model=model_name, messages=history, max_tokens=8, temperature=0,
                                              tools=[WEATHER], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == (r.choices[0].message.content or "")


def test_the_prompt_shows_the_tools(tiny_lm):
    from steering.tools import ToolSpec

    spec = ToolSpec("get_weather", "The weather in a city.", WEATHER["function"]["parameters"])
    text = tiny_lm.inputs.decode(tiny_lm.inputs.encode_chat(MSGS, tools=[spec]))
    assert "get_weather" in text and "<tool_call>" in text and "The weather in a city." in text


def test_batched_and_token_id_prompts(server, client, engine, tiny_lm, model_name):
    prompts = ["Hello", "The quick brown fox", "Once upon"]
    r = client.completions.create(model=model_name, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    for k, c in enumerate(r.choices):
        want = engine.generate(tiny_lm.inputs.encode_text(prompts[k // 2]), SamplingParams(max_tokens=5,
                                                                                           temperature=0))
        assert c.text == want.text
    ids = [tiny_lm.inputs.encode_text(p) for p in prompts]
    assert r.usage.prompt_tokens == sum(len(i) for i in ids)
    by_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in r.choices[::2]]
    one = client.completions.create(model=model_name, prompt=ids[1], max_tokens=5, temperature=0)
    assert one.choices[0].text == r.choices[2].text
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model=model_name, prompt=prompts, max_tokens=5, temperature=0,
                                           stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {k: r.choices[2 * k].text for k in range(3)}


def _direct_logprobs(tiny_lm, ids):
    with torch.no_grad():
        logits = tiny_lm.model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))], lp


def test_echo_scores_the_prompt(server, client, tiny_lm, model_name):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs 1, max_tokens 0 or 1."""
    text = "The capital of France is Paris"
    ids = tiny_lm.inputs.encode_text(text)
    want, lp = _direct_logprobs(tiny_lm, ids)
    for max_tokens in (0, 1):
        r = client.completions.create(model=model_name, prompt=ids, max_tokens=max_tokens, temperature=0,
                                      logprobs=1, echo=True)
        c = r.choices[0]
        assert c.text.startswith(tiny_lm.inputs.decode(ids))
        tl = c.logprobs.token_logprobs
        assert len(tl) == len(ids) + max_tokens and tl[0] is None
        assert tl[1:len(ids)] == pytest.approx(want, abs=1e-3)
        top = c.logprobs.top_logprobs
        best = int(lp[0].argmax())
        assert top[0] is None and max(top[1].values()) == pytest.approx(float(lp[0, best]), abs=1e-3)
    echoed = client.completions.create(model=model_name, prompt=text, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(text) and echoed.choices[0].logprobs is None


def test_echo_logprobs_are_steered(server, tiny_lm, model_name):
    url, _ = server
    ids = tiny_lm.inputs.encode_text("The capital of France is Paris")
    body = {"model": model_name, "prompt": ids, "max_tokens": 0, "logprobs": 0, "echo": True}
    plain = _post(url, "/v1/completions", body).json()["choices"][0]["logprobs"]["token_logprobs"]
    steered = _post(url, "/v1/completions", body | {"steering": _steering(tiny_lm)}).json()
    lps = steered["choices"][0]["logprobs"]["token_logprobs"]
    assert lps[0] is None and plain[0] is None
    assert max(abs(a - b) for a, b in zip(plain[1:], lps[1:])) > 0.1
    assert steered["steering"]


def test_models_retrieve_and_tokenizer_info(server, client, tiny_lm, model_name):
    url, _ = server
    card = client.models.retrieve(model_name)
    assert card.id == model_name and card.object == "model"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["param"] == "model" if isinstance(err.value.body, dict) else True
    info = httpx.get(url + "/tokenizer_info").json()
    tok = tiny_lm.inputs.tokenizer
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    assert info["vocab_size"] == tiny_lm.vocab_size and info["model_max_length"] > 0


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"store": True}, "store"),
    ("/v1/chat/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"5": 200}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function",
                                                                  "function": {"name": "nope"}}}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [WEATHER, WEATHER]}, "tools"),
    ("/v1/chat/completions", {"response_format": {"type": "structural_tag"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}, "response_format"),
    ("/v1/chat/completions", {"frequency_penalty": 3}, "frequency_penalty"),
    ("/v1/chat/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": [[1, 2], [-1]]}, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
])
def test_what_cannot_be_honoured_is_refused(server, model_name, path, extra, param):
    url, _ = server
    body = {"model": model_name, "max_tokens": 4}
    body |= {"messages": MSGS} if "chat" in path else {"prompt": "Hello"}
    r = _post(url, path, body | extra)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and param in (err["param"] or ""), err
