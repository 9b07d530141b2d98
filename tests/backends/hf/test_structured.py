"""Structured output on the Hugging Face engine (llguidance): outputs follow the grammar with greedy and sampled
decoding, under steering too; a bad spec is refused at submission; one constrained row never disturbs others."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from steering.engine import GenerationRequest
from steering.errors import InvalidRequestError
from steering.sampling import SamplingParams, StructuredOutput
from steering.spec import SteeringSpec
from tests.backends.hf.test_engine import greedy, ids, rand_vector

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}
PROMPTS = ["The quick brown fox", "What is the capital of France?", "Numbers: 0 1 2 3"]


def constrained(spec: StructuredOutput, temperature: float = 0.0, seed: int | None = None, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=80, temperature=temperature, seed=seed, structured=spec, **kw)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_parse_and_validate(tiny_lm, make_engine, temperature):
    engine = make_engine()
    spec = StructuredOutput(json_schema=SCHEMA)
    handles = [engine.submit(GenerationRequest(ids(tiny_lm, p), constrained(spec, temperature, seed=i)))
               for i, p in enumerate(PROMPTS)]
    for h in handles:
        res = h.result()
        assert res.finish_reason == "stop", res.text
        jsonschema.validate(json.loads(res.text), SCHEMA)


def test_json_object_regex_and_choice_under_steering(tiny_lm, make_engine):
    engine = make_engine()
    steer = SteeringSpec.single(rand_vector(tiny_lm, 1), scale=4.0)
    p = ids(tiny_lm, PROMPTS[0])
    for st in (None, steer):
        obj = engine.generate(p, constrained(StructuredOutput(json_object=True), 1.0, seed=3), st)
        assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)
        rx = engine.generate(p, constrained(StructuredOutput(regex=r"[0-9]{3}-[a-z]{2,4}"), 1.0, seed=4), st)
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", rx.text), rx.text
        ch = engine.generate(p, constrained(StructuredOutput(choice=("yes", "no", "maybe")), 1.0, seed=5), st)
        assert ch.text in ("yes", "no", "maybe") and ch.finish_reason == "stop"
        gbnf = StructuredOutput(grammar='root ::= "a" ("b" | "c") ("b" | "c") "."')
        gr = engine.generate(p, constrained(gbnf, seed=6), st)
        assert re.fullmatch(r"a[bc]{2}\.", gr.text), gr.text


@pytest.mark.parametrize("spec", [StructuredOutput(json_schema={"type": "no-such-type"}),
                                  StructuredOutput(regex="(unclosed"), StructuredOutput(grammar="root ::= nowhere"),
                                  StructuredOutput(choice=()), StructuredOutput(regex="a", choice=("a",)),
                                  StructuredOutput()])
def test_an_invalid_spec_is_refused_at_submission_and_the_engine_serves_on(tiny_lm, make_engine, spec):
    engine = make_engine()
    p = ids(tiny_lm, PROMPTS[1])
    with pytest.raises(InvalidRequestError) as err:
        engine.prepare_structured(spec)
    assert err.value.param == "response_format"
    with pytest.raises(InvalidRequestError):
        engine.submit(GenerationRequest(p, constrained(spec)))
    assert engine.alive() and engine.stats().idle
    assert engine.generate(p, greedy(4)).finish_reason == "length"


def test_a_constrained_row_leaves_its_neighbours_alone_and_a_short_budget_ends_with_length(tiny_lm, make_engine):
    engine = make_engine()
    p = ids(tiny_lm, PROMPTS[2])
    alone = engine.generate(p, greedy(12)).token_ids
    handles = [engine.submit(GenerationRequest(p, constrained(StructuredOutput(json_schema=SCHEMA), 1.0, seed=9))),
               engine.submit(GenerationRequest(p, greedy(12))),
               engine.submit(GenerationRequest(p, SamplingParams(max_tokens=3, temperature=0,
                                                                 structured=StructuredOutput(json_schema=SCHEMA))))]
    results = [h.result() for h in handles]
    jsonschema.validate(json.loads(results[0].text), SCHEMA)
    assert results[1].token_ids == alone
    assert results[2].finish_reason == "length" and len(results[2].token_ids) == 3
    assert results[2].text.startswith("{")


def test_compiled_grammars_are_cached_per_spec(tiny_lm, make_engine):
    engine = make_engine()
    a, b = StructuredOutput(json_schema=dict(SCHEMA)), StructuredOutput(json_schema=dict(SCHEMA))
    engine.prepare_structured(a)
    engine.prepare_structured(b)
    assert len(engine.grammars._cache) == 1
    m1, m2 = engine.grammars.matcher(a), engine.grammars.matcher(b)
    assert m1 is not m2  # each request gets its own matcher
