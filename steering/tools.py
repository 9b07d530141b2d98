"""Tool calling over any chat template.

A model's own template renders the tools when it knows how (it reads ``tools``); otherwise the tools are
described in a system preamble in the Hermes format that most open chat models were tuned on, and earlier calls
and results are written back the same way, so a conversation round-trips through a template that never heard of
tools. Forced calls (``tool_choice`` "required" or a named function) are decoded under a JSON schema, so they
always parse; free calls (``auto``) are parsed out of the text: ``<tool_call>{...}</tool_call>`` blocks, or an
output that is nothing but a call object.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from steering.errors import InvalidRequestError


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_template_tool(self) -> dict[str, Any]:
        """The OpenAI shape, which Hugging Face chat templates take as ``tools``."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": dict(self.parameters)}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str
    """JSON text of the arguments object, as OpenAI sends it."""
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def template_renders_tools(template: str | None) -> bool:
    return bool(template) and re.search(r"\btools\b", str(template)) is not None


def preamble(tools: Sequence[ToolSpec]) -> str:
    """The Hermes tool prompt, compact (small models have short contexts)."""
    described = "\n".join(json.dumps(t.as_template_tool(), ensure_ascii=False, separators=(",", ":"))
                           for t in tools)
    return (f"You may call functions. They are described in <tools></tools>:\n<tools>\n{described}\n</tools>\n"
            'To call one, answer <tool_call>{"name":<function-name>,"arguments":<args-object>}</tool_call>')


def _call_text(call: Mapping[str, Any]) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return "<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) + \
        "\n</tool_call>"


def inline_tools(messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """Messages for a template that does not render tools: the tools in the system message, assistant calls as
    ``<tool_call>`` text, tool results as user messages in ``<tool_response>``."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (content + "\n" if content else "") + calls})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": role, "content": content})
    if tools:
        text = preamble(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools: call arguments as objects (what templates iterate over)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function", {}))
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
            if m.get("content") is None:
                m["content"] = ""
        out.append(m)
    return out


# -- forced calls ---------------------------------------------------------------------------------------------------
def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that does not say (OpenAI's strict
    mode requires it; JSON Schema's default lets a decoder invent keys)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in _SUBSCHEMAS else v for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in schema[key].items()}
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


_SUBSCHEMAS = {"items", "anyOf", "oneOf", "allOf", "not", "additionalProperties", "prefixItems", "if", "then",
               "else", "contains"}


def _params(tool: ToolSpec) -> dict[str, Any]:
    """A function's arguments schema, closed: a call carries the function's parameters and nothing else."""
    return closed(dict(tool.parameters) or {"type": "object", "properties": {}})


def required_schema(tools: Sequence[ToolSpec], parallel: bool) -> dict[str, Any]:
    """``tool_choice: "required"``: one call object (or a non-empty array of them) naming one of the tools."""
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": _params(t)},
                      "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
    return {"type": "array", "items": one, "minItems": 1} if parallel else one


def named_schema(tool: ToolSpec) -> dict[str, Any]:
    """A named ``tool_choice``: the output is that function's arguments."""
    return _params(tool)


def parse_required(text: str, parallel: bool) -> list[ToolCall]:
    """The calls in an output decoded under :func:`required_schema`."""
    data = json.loads(text)
    items = data if parallel else [data]
    return [ToolCall(d["name"], json.dumps(d["arguments"], ensure_ascii=False)) for d in items]


# -- free calls -----------------------------------------------------------------------------------------------------
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def _as_call(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(str(obj["name"]), json.dumps(args, ensure_ascii=False))


def parse_auto(text: str, tools: Sequence[ToolSpec]) -> tuple[str | None, list[ToolCall]]:
    """(content outside the calls or None, the calls) of a free generation; calls naming no known tool, or that
    do not parse, stay in the content."""
    names = {t.name for t in tools}
    calls: list[ToolCall] = []
    if "<tool_call>" in text:
        rest = text
        for match in _BLOCK.finditer(text):
            try:
                call = _as_call(json.loads(match.group(1)), names)
            except json.JSONDecodeError:
                call = None
            if call is not None:
                calls.append(call)
                rest = rest.replace(match.group(0), "", 1)
        content = rest.strip()
        return (content or None) if calls else text, calls
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            call = _as_call(json.loads(stripped), names)
        except json.JSONDecodeError:
            call = None
        if call is not None:
            return None, [call]
    return text, []


def check_tools(tools: Sequence[ToolSpec]) -> None:
    names = [t.name for t in tools]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InvalidRequestError(f"tool names must be unique; repeated: {dup}", param="tools")
