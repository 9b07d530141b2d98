"""Tool calling over any chat template: parsing free calls, the schemas forced calls decode under, and the
messages a template without tool support is given."""

from __future__ import annotations

import json

import pytest

from steering.errors import InvalidRequestError
from steering.tools import (
    ToolSpec,
    check_tools,
    closed,
    inline_tools,
    parse_auto,
    parse_required,
    required_schema,
    template_messages,
    template_renders_tools,
)

WEATHER = ToolSpec("get_weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}}})
TIME = ToolSpec("get_time")


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"})]),
    ('Let me check.<tool_call>{"name":"get_weather","arguments":{"city":"Rome"}}</tool_call>'
     '<tool_call>{"name":"get_time","arguments":{}}</tool_call>', "Let me check.",
     [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    ('<tool_call>{"name":"get_weather","arguments":{"city":"Rome"}}', None, [("get_weather", {"city": "Rome"})]),
    ('{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),
    ('{"name": "get_time", "parameters": "{}"}', None, [("get_time", {})]),
    ('<tool_call>{"name":"unknown","arguments":{}}</tool_call>',
     '<tool_call>{"name":"unknown","arguments":{}}</tool_call>', []),
    ('<tool_call>{not json}</tool_call>', '<tool_call>{not json}</tool_call>', []),
    ("Paris is sunny.", "Paris is sunny.", []),
    ('{"city": "Paris"}', '{"city": "Paris"}', []),
])
def test_parse_auto(text, content, calls):
    got_content, got = parse_auto(text, [WEATHER, TIME])
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert len({c.id for c in got}) == len(got)


def test_required_schema_and_parse():
    one = required_schema([WEATHER, TIME], parallel=False)
    assert [b["properties"]["name"]["const"] for b in one["anyOf"]] == ["get_weather", "get_time"]
    assert one["anyOf"][0]["properties"]["arguments"]["additionalProperties"] is False
    many = required_schema([WEATHER], parallel=True)
    assert many["type"] == "array" and many["minItems"] == 1
    calls = parse_required('[{"name":"get_weather","arguments":{"city":"Paris"}},{"name":"get_time",'
                           '"arguments":{}}]', parallel=True)
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}


def test_closed_closes_every_object_that_does_not_say():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
        "c": {"type": "array", "items": {"type": "object", "properties": {}}},
        "d": {"type": "object", "additionalProperties": True},
        "e": {"anyOf": [{"type": "object", "properties": {}}, {"type": "null"}]}},
        "$defs": {"X": {"type": "object", "properties": {}}}}
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"]["items"]["additionalProperties"] is False
    assert out["properties"]["d"]["additionalProperties"] is True
    assert out["properties"]["e"]["anyOf"][0]["additionalProperties"] is False
    assert out["$defs"]["X"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # not modified in place


def test_inline_tools_round_trip():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = inline_tools(msgs, [WEATHER])
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.") and "get_weather" in \
        out[0]["content"]
    assert '"city": "Paris"' in out[2]["content"] and out[2]["content"].startswith("<tool_call>")
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    assert inline_tools([{"role": "user", "content": "hi"}], [])[0] == {"role": "user", "content": "hi"}
    templ = template_messages(msgs)
    assert templ[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == '{"city":"Paris"}'


def test_template_detection_and_duplicates():
    assert template_renders_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_renders_tools("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert not template_renders_tools(None)
    with pytest.raises(InvalidRequestError):
        check_tools([WEATHER, WEATHER])
