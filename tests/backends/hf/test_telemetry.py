"""Steering telemetry of the Hugging Face engine against a hand computation: the mean of r = ||h' - h|| / ||h|| over
a request's steered (token, layer) pairs and its steered tokens per layer, recomputed here with plain forward hooks
that steer the decoder layers' outputs themselves (h' = (h + N) ||h|| / ||h + N|| + R) over the tokens the engine
forwarded (the prompt and every generated token but the last)."""

from __future__ import annotations

import pytest
import torch

from steering.sampling import SamplingParams
from steering.spec import SteeringApplication, SteeringSpec
from steering.vectors import SteeringVector

PROMPT = "The quick brown fox jumps over"
MAX_TOKENS = 6


def _vector(lm, seed: int, layers) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({layer: torch.randn(lm.hidden_size, generator=g) for layer in layers})


def _by_hand(lm, tokens: list[int], prompt_len: int, apps: list[SteeringApplication]):
    """One plain forward of ``tokens`` with the steering applied by hooks written here; returns (mean r over
    steered pairs, steered tokens per layer)."""
    positions = torch.arange(len(tokens))

    def acts(app: SteeringApplication) -> torch.Tensor:
        kind = app.positions or "all"
        if kind == "all":
            return torch.ones(len(tokens), dtype=torch.bool)
        if kind == "prompt":
            return positions < prompt_len
        if kind == "generated":
            return positions >= prompt_len
        return torch.isin(positions, torch.tensor(app.positions))

    changes: list[torch.Tensor] = []
    counts: dict[int, int] = {}

    def hook(index: int):
        def fn(module, args, output):
            h = (output[0] if isinstance(output, tuple) else output)[0].double()  # [T, d]
            n = torch.zeros_like(h)
            r = torch.zeros_like(h)
            steered = torch.zeros(len(tokens), dtype=torch.bool)
            for app in apps:
                vec = app.vector
                assert isinstance(vec, SteeringVector)
                if index not in vec.values or (app.layers is not None and index not in app.layers):
                    continue
                on = acts(app)
                delta = on.double().unsqueeze(1) * app.scale * vec.values[index].double()
                (n if app.normalize else r).add_(delta)
                steered |= on
            hn = h + n
            new = hn * h.norm(dim=-1, keepdim=True) / hn.norm(dim=-1, keepdim=True) + r
            if steered.any():
                changes.append(((new - h).norm(dim=-1) / h.norm(dim=-1))[steered])
                counts[index] = int(steered.sum())
            out = new.to(output[0].dtype).unsqueeze(0)
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(lm.layers)]
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([tokens]))
    finally:
        for h in handles:
            h.remove()
    return float(torch.cat(changes).mean()), counts


CASES = {
    "normalize": lambda lm: [SteeringApplication(_vector(lm, 1, range(lm.num_layers)), 4.0, layers=[1, 2],
                                                 normalize=True)],
    "raw-generated": lambda lm: [SteeringApplication(_vector(lm, 2, [1, 3]), 2.5, positions="generated")],
    "mixed": lambda lm: [
        SteeringApplication(_vector(lm, 3, [0, 1, 2]), 3.0, normalize=True, positions="prompt"),
        SteeringApplication(_vector(lm, 4, [1, 2, 3]), -1.5, layers=[1, 2], positions=(2, 3, 7, 8)),
        SteeringApplication(_vector(lm, 5, [2]), 6.0, normalize=True),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_relative_change_and_steered_tokens_match_a_hand_computation(engine, tiny_lm, case):
    apps = CASES[case](tiny_lm)
    prompt = tiny_lm.inputs.encode_text(PROMPT)
    res = engine.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                          SteeringSpec(apps))
    tel = res.steering_telemetry
    assert tel is not None and len(res.token_ids) == MAX_TOKENS
    want, counts = _by_hand(tiny_lm, prompt + res.token_ids[:-1], len(prompt), apps)
    assert tel.layer_tokens == counts
    assert tel.measured == sum(counts.values())
    assert tel.relative_change == pytest.approx(want, rel=1e-4)


def test_a_batch_measures_each_row_alone_and_unsteered_rows_carry_nothing(engine, tiny_lm):
    """Rows of different lengths prefilled together (the shorter ones padded) and decoded together: each row's
    telemetry is its own, as when it runs alone; an unsteered request has none."""
    apps = CASES["normalize"](tiny_lm)
    prompts = [tiny_lm.inputs.encode_text(p) for p in ("Hello", PROMPT, "Paris is the capital of France")]
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    from steering.engine.types import GenerationRequest

    handles = [engine.submit(GenerationRequest(p, sp, SteeringSpec(apps) if i != 1 else None))
               for i, p in enumerate(prompts)]
    results = [h.result() for h in handles]
    assert results[1].steering_telemetry is None
    for i in (0, 2):
        alone = engine.generate(prompts[i], sp, SteeringSpec(apps)).steering_telemetry
        tel = results[i].steering_telemetry
        assert tel is not None and alone is not None
        assert tel.layer_tokens == alone.layer_tokens == {1: len(prompts[i]) + 3, 2: len(prompts[i]) + 3}
        assert tel.relative_change == pytest.approx(alone.relative_change, rel=1e-5)
