"""What a steered request carries into vLLM: bank keys, the extra_args entry, and the prefix-cache salt."""

from __future__ import annotations

import pytest
import torch

from steering.backends.vllm import wire
from steering.spec import ResolvedApplication


def _app(values, positions="all", scale=2.0, normalize=True, name="v"):
    return ResolvedApplication(name, values, scale, positions, normalize)


def test_keys_follow_the_values_not_just_the_name():
    a = {0: torch.ones(4), 2: torch.zeros(4)}
    assert wire.vector_key("v", a) == wire.vector_key("v", {k: t.clone() for k, t in a.items()})
    assert wire.vector_key("v", a) != wire.vector_key("v", {0: torch.ones(4), 2: torch.full((4,), 1e-7)})
    assert wire.vector_key("v", a) != wire.vector_key("v", {0: torch.ones(4)})  # another layer set
    assert wire.vector_key(None, a).startswith("inline@")


def test_encode_then_parse_round_trips_and_parse_refuses_what_the_bank_lacks():
    app = _app({1: torch.ones(4), 3: torch.ones(4)}, positions=(9, 2, 5))
    entry = wire.encode([("v@1", app)])
    layers = {"v@1": frozenset({1, 3})}
    (got,) = wire.parse(entry, num_layers=4, key_layers=layers.get, max_applications=2)
    assert (got.key, got.layers, got.scale, got.mode, got.explicit, got.normalize) == \
        ("v@1", (1, 3), 2.0, wire.EXPLICIT, (2, 5, 9), True)
    for bad in ({**entry, "x": 1}, {"v": 2, "applications": entry["applications"]},
                {"v": 1, "applications": [{**entry["applications"][0], "layers": [0]}]},
                {"v": 1, "applications": [{**entry["applications"][0], "scale": float("nan")}]},
                {"v": 1, "applications": [{**entry["applications"][0], "positions": "later"}]},
                {"v": 1, "applications": entry["applications"] * 3}):
        with pytest.raises(wire.SpecError):
            wire.parse(bad, num_layers=4, key_layers=layers.get, max_applications=2)
    with pytest.raises(wire.SpecError, match="not registered"):
        wire.parse(entry, num_layers=4, key_layers={}.get, max_applications=2)


def test_the_cache_salt_separates_steerings_and_phase_rules_by_prompt_length():
    from steering.backends.vllm.engine import VLLMBackend

    v = {0: torch.ones(4)}
    salt = VLLMBackend.cache_salt
    every = wire.encode([("v@1", _app(v))])
    assert salt(every, 10) == salt(every, 20)  # "all" acts the same at every position
    assert salt(every, 10) != salt(wire.encode([("v@1", _app(v, scale=3.0))]), 10)
    assert salt(every, 10) != salt(wire.encode([("v@2", _app(v))]), 10)
    phase = wire.encode([("v@1", _app(v, positions="generated"))])
    assert salt(phase, 10) != salt(phase, 11)  # a token that was generated here is a prompt token there
