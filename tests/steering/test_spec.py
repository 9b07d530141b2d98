"""Steering specs: plain data that serialises, resolved and checked in one place."""

from __future__ import annotations

import json

import pytest
import torch

from steering.errors import InvalidRequestError, SteeringValidationError
from steering.names import Registry
from steering.spec import SteeringApplication, SteeringSpec, parse_positions, resolve
from steering.vectors import SteeringVector


def vec(seed: int, layers=(0, 1, 2), d: int = 8, name=None) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({i: torch.randn(d, generator=g) for i in layers}, name=name)


def test_a_spec_round_trips_through_json():
    spec = SteeringSpec([SteeringApplication("named", 2.0, [1], "prompt"),
                         SteeringApplication(vec(1), -1.5, None, [4, 2, 2], True)])
    again = SteeringSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again.applications[0].vector == "named" and again.applications[0].positions == "prompt"
    inline = again.applications[1]
    assert inline.positions == (4, 2, 2) and inline.normalize and inline.scale == -1.5
    for layer, v in vec(1).values.items():
        torch.testing.assert_close(inline.vector.values[layer], v)  # type: ignore[union-attr]


def test_resolve_looks_names_up_fills_layers_and_describes():
    store = {"a": vec(2, name="a")}
    spec = SteeringSpec([SteeringApplication("a", 2.0), SteeringApplication(vec(3), 0.0, [2], [5, 3])])
    r = resolve(spec, hidden_size=8, num_layers=3, max_len=16, lookup=store.__getitem__)
    assert r.describe() == [
        {"name": "a", "scale": 2.0, "layers": [0, 1, 2], "positions": "all", "normalize": False},
        {"name": None, "scale": 0.0, "layers": [2], "positions": [3, 5], "normalize": False},
    ]
    assert [a.name for a in r.active] == ["a"]  # scale 0 is exactly unsteered


@pytest.mark.parametrize(("app", "param"), [
    (SteeringApplication(vec(1), layers=[3]), "steering.vectors[0].layers"),
    (SteeringApplication(vec(1, layers=(0,)), layers=[1]), "steering.vectors[0].layers"),
    (SteeringApplication(vec(1), layers=[1, 1]), "steering.vectors[0].layers"),
    (SteeringApplication(vec(1), layers=[]), "steering.vectors[0].layers"),
    (SteeringApplication(vec(1, d=9)), "steering.vectors[0].values"),
    (SteeringApplication(vec(1), scale=float("nan")), "steering.vectors[0].scale"),
    (SteeringApplication(vec(1), positions="answers"), "steering.vectors[0].positions"),
    (SteeringApplication(vec(1), positions=[-1]), "steering.vectors[0].positions"),
    (SteeringApplication(vec(1), positions=[2**70]), "steering.vectors[0].positions"),
    (SteeringApplication("x"), "steering.vectors[0].name"),
])
def test_resolve_names_the_field_that_is_wrong(app, param):
    with pytest.raises(SteeringValidationError) as err:
        resolve(SteeringSpec([app]), hidden_size=8, num_layers=3, max_len=64)
    assert err.value.param == param


def test_positions_parse_to_a_kind_or_a_sorted_tuple():
    assert parse_positions("generated") == "generated"
    assert parse_positions([5, 1, 5]) == (1, 5)
    with pytest.raises(SteeringValidationError):
        parse_positions([True])


def test_registry_refuses_a_taken_name_and_lists_the_valid_ones():
    reg: Registry = Registry("widget", "widget", "widgets")

    @reg.register
    class A:
        name = "a"

    with pytest.raises(ValueError, match="already registered"):
        reg.register(type("B", (), {"name": "a"}))
    assert reg.get("a") is A and list(reg) == [A] and "a" in reg
    with pytest.raises(InvalidRequestError, match="unknown widget 'z'; valid widgets: a") as err:
        reg.get("z")
    assert err.value.param == "widget"
