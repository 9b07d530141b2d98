"""The vLLM steering op against the Hugging Face hooks' arithmetic, without vLLM: the workers' state is built
directly, filled as the runner's per-step hook fills it, and the op runs on split (hidden, residual) streams."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from steering.backends.hf.hooks import DeviceApplication, SteeringBatch
from steering.backends.vllm import wire
from steering.backends.vllm.op import steer_impl
from steering.backends.vllm.state import SteerState, set_state

H, L = 16, 3


def _state(dense: bool, telemetry_every: int = 8) -> SteerState:
    return SteerState(max_num_tokens=64, max_num_seqs=4, hidden_size=H, num_layers=L, max_model_len=64,
                      device=torch.device("cpu"), max_applications=3, bank_rows=64, dense=dense,
                      telemetry_every=telemetry_every)


def _vec(seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(H, generator=g) for layer in range(L)}


# rows of one step: (applications as (vector seed, scale, positions, normalize, layers)), prompt length,
# first position of the step's tokens (5 tokens each)
ROWS = [
    ([(1, 3.0, "all", True, [0, 1, 2])], 8, 6),  # crosses the prompt end
    ([], 8, 0),  # unsteered
    ([(2, 2.0, "prompt", False, [1]), (3, 1.5, "generated", True, [1, 2])], 7, 4),
    ([(4, -4.0, (5, 6, 40), False, [0, 1])], 30, 3),  # explicit positions
]


def _step(dense: bool, telemetry_every: int = 8):
    st = _state(dense, telemetry_every)
    set_state(st)
    requests, ids = {}, []
    for r, (apps, plen, _) in enumerate(ROWS):
        entry = None
        if apps:
            pairs = []
            for seed, scale, pos, norm, layers in apps:
                values = {layer: _vec(seed)[layer] for layer in layers}
                key = wire.vector_key(f"v{seed}", values)
                assert st.register(key, wire.layer_bytes(values))["status"] == "ok"
                pairs.append((key, SimpleNamespace(layers=layers, scale=scale, positions=pos, normalize=norm)))
            entry = wire.encode(pairs)
        rid = f"r{r}"
        ids.append(rid)
        requests[rid] = SimpleNamespace(num_prompt_tokens=plen, sampling_params=SimpleNamespace(
            extra_args={wire.KEY: entry} if entry else None))
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=ids, num_reqs=len(ids)), requests=requests)
    st.fill(runner, np.full(len(ROWS), 5))
    positions = torch.tensor([p0 + i for _, _, p0 in ROWS for i in range(5)])
    return st, positions


def _reference(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    """The HF hooks on the block output h = hidden + residual, rows as a [B, 5] batch."""
    rows = [[DeviceApplication({lyr: _vec(seed)[lyr] for lyr in layers}, scale, pos, norm)
             for seed, scale, pos, norm, layers in apps] for apps, _, _ in ROWS]
    batch = SteeringBatch(rows, H, torch.device("cpu"), torch.float32)
    positions = torch.tensor([[p0 + i for i in range(5)] for _, _, p0 in ROWS])
    prompt_lens = torch.tensor([plen for _, plen, _ in ROWS])
    h = (hidden + residual).view(len(ROWS), 5, H).clone()
    return batch.gates(positions, prompt_lens).apply(layer, h).view(-1, H)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("layer", range(L))
def test_the_op_is_the_hooks_arithmetic_and_leaves_unsteered_tokens_alone(dense, layer):
    st, positions = _step(dense)
    g = torch.Generator().manual_seed(10 + layer)
    hidden, residual = torch.randn(20, H, generator=g), torch.randn(20, H, generator=g)
    h0, r0 = hidden.clone(), residual.clone()
    try:
        steer_impl(hidden, residual, positions, layer)
    finally:
        set_state(None)
    want = _reference(h0, r0, layer)
    changed = ~((hidden == h0).all(1) & (residual == r0).all(1))
    steered = ~torch.isclose(want, h0 + r0, rtol=0, atol=0).all(1)
    assert torch.equal(changed, steered)  # exactly the tokens an application acts on are rewritten
    assert torch.equal(hidden[~changed], h0[~changed]) and torch.equal(residual[~changed], r0[~changed])
    torch.testing.assert_close(hidden + residual, want, rtol=1e-5, atol=1e-5)
    if changed.any():
        assert (hidden[changed] == 0).all()  # the next fused add + norm sees exactly h'


def test_sparse_and_dense_agree_bit_for_bit():
    outs = []
    for dense in (False, True):
        st, positions = _step(dense)
        g = torch.Generator().manual_seed(3)
        hidden, residual = torch.randn(20, H, generator=g), torch.randn(20, H, generator=g)
        try:
            steer_impl(hidden, residual, positions, 1)
        finally:
            set_state(None)
        outs.append((hidden, residual))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_slots_and_bank_rows_come_back_and_dropped_keys_wait_for_their_users():
    st, _ = _step(False)
    set_state(None)
    key = next(iter(st.keys))
    free = len(st._free_rows)
    assert st.unregister(key) and key in st.keys  # a live slot still uses it
    for rid in ("r0", "r1", "r2", "r3"):
        st.release(rid)
    assert key not in st.keys and len(st._free_rows) > free
    assert not st.entry_row.any() and not st.pos_bits.any() and st.snapshot()["slots_in_use"] == 0


def test_an_invalid_entry_runs_unsteered_and_is_counted():
    st = _state(False)
    requests = {"x": SimpleNamespace(num_prompt_tokens=3, sampling_params=SimpleNamespace(extra_args={
        wire.KEY: {"v": 1, "applications": [{"key": "nope@0", "layers": [0], "scale": 1.0, "positions": "all",
                                             "normalize": False}]}}))}
    st.fill(SimpleNamespace(input_batch=SimpleNamespace(req_ids=["x"], num_reqs=1), requests=requests),
            np.array([4]))
    assert st.num_steered == 0 and st.stats["invalid_specs"] == 1


def test_registration_reports_a_full_bank_instead_of_raising():
    st = SteerState(max_num_tokens=8, max_num_seqs=1, hidden_size=H, num_layers=L, max_model_len=16,
                    device=torch.device("cpu"), max_applications=1, bank_rows=2, dense=False)
    values = wire.layer_bytes(_vec(0))
    assert st.register("a@1", values) == {"status": "full", "free": 2}
    assert st.register("b@1", {0: values[0]})["status"] == "ok"
    assert st.register("c@1", {0: b"\x00" * 3})["status"] == "invalid"


def _random_batch(seed: int, dense: bool, n_req: int, kind: str, telemetry_every: int = 8):
    """A state with ``n_req`` requests of random steering (odd seeds steer every request); ``every-row``: each
    request steered by one normalising vector on every layer at all positions (decode's fast path);
    ``staggered``: the same on one layer each, so each layer acts on some of the step's tokens."""
    rng = np.random.default_rng(seed + 1000)
    st = SteerState(max_num_tokens=256, max_num_seqs=16, hidden_size=H, num_layers=L, max_model_len=64,
                    device=torch.device("cpu"), max_applications=3, bank_rows=256, dense=dense,
                    telemetry_every=telemetry_every)
    requests = {}
    for r in range(n_req):
        if kind == "every-row":
            apps = [(r, 2.0 + r, "all", True, list(range(L)))]
        elif kind == "staggered":
            apps = [(r, 2.0 + r, "all", True, [r % L])]
        else:
            apps = [(int(rng.integers(6)), float(rng.normal() * 3),
                     ["all", "prompt", "generated", (3, 9, 12, 13)][int(rng.integers(4))], bool(rng.integers(2)),
                     sorted(rng.choice(L, size=int(rng.integers(1, L + 1)), replace=False).tolist()))
                    for _ in range(int(rng.integers(1 if seed % 2 else 0, 4)))]  # odd seeds: every row steered
        pairs = []
        for seed, scale, pos, norm, layers in apps:
            values = {layer: _vec(seed)[layer] for layer in layers}
            key = wire.vector_key(f"v{seed}", values)
            assert st.register(key, wire.layer_bytes(values))["status"] == "ok"
            pairs.append((key, SimpleNamespace(layers=layers, scale=scale, positions=pos, normalize=norm)))
        requests[f"r{r}"] = SimpleNamespace(num_prompt_tokens=8, sampling_params=SimpleNamespace(
            extra_args={wire.KEY: wire.encode(pairs)} if pairs else None))
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=list(requests), num_reqs=n_req), requests=requests)
    return st, runner


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["mixed", "every-row", "staggered"])
def test_sparse_and_dense_agree_bit_for_bit_over_prefill_and_decode_steps(dtype, kind):
    """The sparse op keeps a plan across decode steps (same batch, same acting applications) and works in place
    when every token is steered; the dense op recomputes everything from the buffers each time. Both must give
    the same bits over a prefill step and the decode steps after it, as positions cross the prompt's end, with
    the telemetry measuring every step, some steps or never (it must not change a bit), and measure the same."""
    for seed in range(8):
        rng = np.random.default_rng(seed)
        n_req = int(rng.integers(2, 6))
        sides = [_random_batch(seed, dense, n_req, kind, every) for every in (1, 0, 2) for dense in (False, True)]
        start = rng.integers(0, 10, size=n_req)
        plans = []
        for step in range(6):
            counts = rng.integers(1, 5, size=n_req) if step == 0 else np.ones(n_req, dtype=np.int64)
            positions = torch.from_numpy(np.concatenate([np.arange(s, s + c) for s, c in zip(start, counts)]))
            start = start + counts
            T = int(counts.sum())
            g = torch.Generator().manual_seed(seed * 100 + step)
            streams = [((torch.randn(T, H, generator=g) * 3).to(dtype), (torch.randn(T, H, generator=g) * 3).to(dtype))
                       for _ in range(L)]  # each layer's own (hidden, residual), as vLLM's layers hand them on
            outs = []
            for st, runner in sides:
                set_state(st)
                try:
                    st.fill(runner, counts)
                    out = [(hidden.clone(), residual.clone()) for hidden, residual in streams]
                    for layer, (hidden, residual) in enumerate(out):
                        steer_impl(hidden, residual, positions, layer)
                finally:
                    set_state(None)
                outs.append(out)
            for layer in range(L):
                h0, r0 = outs[0][layer]
                for other in outs[1:]:
                    h1, r1 = other[layer]
                    assert torch.equal(h0, h1) and torch.equal(r0, r1), (seed, step, layer)
            plans.append(sides[0][0].plan_cache)
        if kind == "every-row":  # decode steps reuse the plan built at the first decode step
            assert all(p is not None and p[2] is plans[1][2] for p in plans[2:])
        pulled = []
        for st, runner in sides:
            for rid in runner.input_batch.req_ids:
                st.release(rid)
            pulled.append(st.pull_telemetry())
        for a, b in zip(pulled[::2], pulled[1::2]):  # sparse and dense measure alike
            assert a["layer_tokens"] == b["layer_tokens"] == pulled[0]["layer_tokens"]
            assert [x[0] for x in a["requests"]] == [x[0] for x in b["requests"]]
            for (_, s0, n0), (_, s1, n1) in zip(a["requests"], b["requests"]):
                assert n0 == n1 and s0 == pytest.approx(s1, rel=1e-5, abs=1e-6)
        assert pulled[2]["requests"] == pulled[3]["requests"] == []  # telemetry off: nothing measured
        every_step = {rid: n for rid, _, n in pulled[0]["requests"]}
        for rid, _, n in pulled[4]["requests"]:  # every other step: fewer pairs (maybe none)
            assert n <= every_step[rid]


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_the_telemetry_is_the_relative_change_of_the_hooks_arithmetic(dense):
    """Each request's sum of r = ||h' - h|| / ||h|| over the (token, layer) pairs steered in a step and their
    number, and the steered tokens per layer, against the HF hooks' h' computed here."""
    st, positions = _step(dense, telemetry_every=1)
    want_sum, want_n = np.zeros(len(ROWS)), np.zeros(len(ROWS), dtype=int)
    want_layers = []
    try:
        for layer in range(L):
            g = torch.Generator().manual_seed(20 + layer)
            hidden, residual = torch.randn(20, H, generator=g), torch.randn(20, H, generator=g)
            h = (hidden + residual).clone()
            want = _reference(hidden, residual, layer)
            steer_impl(hidden, residual, positions, layer)
            steered = ~torch.isclose(want, h, rtol=0, atol=0).all(1)
            r = (want - h).double().norm(dim=1) / h.double().norm(dim=1)
            for row in range(len(ROWS)):
                tokens = steered[row * 5:(row + 1) * 5]
                want_sum[row] += float(r[row * 5:(row + 1) * 5][tokens].sum())
                want_n[row] += int(tokens.sum())
            want_layers.append(int(steered.sum()))
    finally:
        set_state(None)
    for row in range(len(ROWS)):
        st.release(f"r{row}")
    got = st.pull_telemetry()
    assert got["layer_tokens"] == want_layers
    measured = {rid: (s, n) for rid, s, n in got["requests"]}
    assert sorted(measured) == [f"r{row}" for row in range(len(ROWS)) if ROWS[row][0]]  # r1 is unsteered
    for row in range(len(ROWS)):
        if want_n[row]:
            s, n = measured[f"r{row}"]
            assert n == want_n[row] and s == pytest.approx(want_sum[row], rel=1e-5)
    assert st.pull_telemetry() == {"requests": [], "layer_tokens": [0] * L}  # pulled once


def test_r_is_measured_on_sampled_steps_and_when_the_batch_changes():
    """Every third steered step, and the first step of a new batch: 3 of 6 decode steps of one batch."""
    st, runner = _random_batch(1, False, 2, "every-row", telemetry_every=3)
    set_state(st)
    try:
        for step in range(6):
            st.fill(runner, np.ones(2, dtype=np.int64))
            positions = torch.tensor([8 + step, 8 + step])
            for layer in range(L):
                hidden, residual = torch.randn(2, H), torch.randn(2, H)
                steer_impl(hidden, residual, positions, layer)
    finally:
        set_state(None)
    assert st.stats["measured_steps"] == 3
    for rid in runner.input_batch.req_ids:
        st.release(rid)
    got = st.pull_telemetry()
    assert [n for _, _, n in got["requests"]] == [3 * L, 3 * L]  # 3 measured steps x 1 token x every layer
    assert got["layer_tokens"] == [12] * L  # counted on every step


def test_a_preempted_requests_sums_wait_for_it_and_are_reported_once():
    st, runner = _random_batch(1, False, 2, "every-row", telemetry_every=1)
    set_state(st)
    try:
        st.fill(runner, np.ones(2, dtype=np.int64))
        for layer in range(L):
            steer_impl(torch.randn(2, H), torch.randn(2, H), torch.tensor([8, 8]), layer)
        st.release("r0", final=False)  # its slot reclaimed while it is preempted
        st.fill(runner, np.ones(2, dtype=np.int64))  # it returns
        for layer in range(L):
            steer_impl(torch.randn(2, H), torch.randn(2, H), torch.tensor([9, 9]), layer)
    finally:
        set_state(None)
    st.release("r0")
    st.release("r1")
    got = {rid: n for rid, _, n in st.pull_telemetry()["requests"]}
    assert got == {"r0": 2 * L, "r1": 2 * L}
