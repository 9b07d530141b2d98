"""The backend contract (:mod:`steering.engine.base`), one suite for every backend: the Hugging Face engine on a
tiny model, and the fake. A new backend joins by adding a case here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from steering.engine import AnalysisBackend, GenerationBackend, GenerationRequest, Progress
from steering.errors import (
    JobCancelledError,
    NotFoundError,
    QueueFullError,
    SteeringValidationError,
)
from steering.sampling import SamplingParams
from steering.spec import ResolvedSteering, SteeringSpec
from steering.store import VectorStore
from steering.vectors import SteeringVector
from tests.fakes import FakeAnalysisBackend, FakeBackend

PROMPTS = ["The quick brown fox", "What is the capital of France?", "Numbers: 0 1 2 3", "I love this movie"]


def greedy(n: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


@dataclass
class Case:
    make: Callable[..., GenerationBackend]
    """A started backend: ``make(max_running=..., max_waiting=...)``."""
    reference: Callable[[GenerationBackend, list[int], SamplingParams, ResolvedSteering | None], list[int]]
    """What a request generates alone, computed without the backend's batching."""


def hf_reference(backend, prompt, sampling, steering) -> list[int]:
    """Greedy decoding by full forwards of the plain model, steered by a forward hook of our own that applies
    h' = (h + N)·‖h‖/‖h + N‖ + R at each application's positions."""
    lm = backend.lm
    tokens = list(prompt)
    apps = steering.active if steering is not None else ()

    def hook_for(layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            n = torch.zeros_like(h)
            r = torch.zeros_like(h)
            for a in apps:
                if layer not in a.values:
                    continue
                pos = torch.arange(h.shape[1])
                on = {"all": pos >= 0, "prompt": pos < len(prompt), "generated": pos >= len(prompt)}.get(
                    a.positions) if isinstance(a.positions, str) else torch.isin(pos, torch.tensor(a.positions))
                delta = on.to(h.dtype).view(1, -1, 1) * a.scale * a.values[layer].to(h.dtype)
                if a.normalize:
                    n = n + delta
                else:
                    r = r + delta
            out = (h + n) * h.norm(dim=-1, keepdim=True) / (h + n).norm(dim=-1, keepdim=True) + r
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(lm.layers)]
    try:
        with torch.no_grad():
            for _ in range(sampling.max_tokens):
                logits = lm.model(torch.tensor([tokens])).logits[0, -1]
                tokens.append(int(torch.argmax(logits)))
    finally:
        for h in handles:
            h.remove()
    return tokens[len(prompt):]


def _case(name: str, request, make_engine, tiny_lm) -> Case:
    if name == "hf":
        return Case(lambda max_running=16, max_waiting=256: make_engine(max_batch_size=max_running,
                                                                         max_queue_size=max_waiting),
                    hf_reference)
    cls = FakeBackend if name == "fake" else FakeAnalysisBackend
    made: list[FakeBackend] = []

    def make(max_running=16, max_waiting=256):
        b = cls(tiny_lm.tokenizer, max_running=max_running, max_waiting=max_waiting,
                hidden_size=tiny_lm.hidden_size, num_layers=tiny_lm.num_layers,
                max_model_len=tiny_lm.max_model_len).start()
        made.append(b)
        return b

    request.addfinalizer(lambda: [b.shutdown() for b in made])
    return Case(make, lambda b, p, s, st: b.reference(p, s, st))


@pytest.fixture(params=["hf", "fake", "fake-analysis"])
def case(request, make_engine, tiny_lm) -> Case:
    return _case(request.param, request, make_engine, tiny_lm)


@pytest.fixture(params=["hf", "fake-analysis"])
def analysis_case(request, make_engine, tiny_lm) -> Case:
    """The backends that also run jobs (AnalysisBackend)."""
    return _case(request.param, request, make_engine, tiny_lm)


def vector(backend: GenerationBackend, seed: int, layers=None, name=None) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    info = backend.info
    layers = range(info.num_layers) if layers is None else layers
    return SteeringVector({i: torch.randn(info.hidden_size, generator=g) for i in layers}, name=name)


def specs(backend: GenerationBackend) -> list[SteeringSpec | None]:
    last = backend.info.num_layers - 1
    return [
        None,
        SteeringSpec.single(vector(backend, 1), scale=2.0),
        SteeringSpec.single(vector(backend, 2), scale=4.0, normalize=True, positions="generated"),
        SteeringSpec.single(vector(backend, 3, layers=[1, last]), scale=3.0, positions="prompt"),
        SteeringSpec.single(vector(backend, 4), scale=5.0, positions=[2, 3, 7], normalize=True),
    ]


def test_generation_equals_the_reference(case):
    backend = case.make()
    for text, spec in zip(PROMPTS * 2, specs(backend), strict=False):
        prompt = backend.inputs.encode_text(text)
        got = backend.generate(prompt, greedy(), spec)
        resolved = backend.resolve_steering(spec) if spec is not None else None
        assert got.token_ids == case.reference(backend, prompt, greedy(), resolved)
        assert got.finish_reason == "length" and len(got.token_ids) == 12


def test_batched_equals_alone(case):
    backend = case.make()
    reqs = [(backend.inputs.encode_text(t), spec) for t in PROMPTS for spec in specs(backend)[:3]]
    alone = [backend.generate(p, greedy(10), s).token_ids for p, s in reqs]
    handles = [backend.submit(GenerationRequest(p, greedy(10), s)) for p, s in reqs]
    assert [h.result().token_ids for h in handles] == alone


def test_streamed_deltas_add_up_and_report_steering(case):
    backend = case.make()
    spec = specs(backend)[2]
    handle = backend.submit(GenerationRequest(backend.inputs.encode_text(PROMPTS[0]), greedy(8), spec))
    outs = list(handle)
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert sum(len(o.token_ids) for o in outs) == 8 == outs[-1].num_generated_tokens
    assert handle.steering is not None
    assert handle.steering.describe() == [{"name": None, "scale": 4.0, "layers": list(range(backend.info.num_layers)),
                                           "positions": "generated", "normalize": True}]
    assert outs[-1].metrics is not None and outs[-1].metrics.first_token_time is not None


def wait_for(cond, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_cancel_frees_the_slot(case):
    backend = case.make()
    handle = backend.submit(GenerationRequest(backend.inputs.encode_text(PROMPTS[0]), greedy(300)))
    first = next(iter(handle))
    assert not first.finished
    handle.cancel()
    last = list(handle)[-1]
    assert last.finish_reason == "abort" and last.num_generated_tokens < 300
    assert backend.drain(10) and backend.stats().idle


def test_queue_full_then_room_again(case):
    backend = case.make(max_running=1, max_waiting=1)
    prompt = backend.inputs.encode_text(PROMPTS[1])
    running = backend.submit(GenerationRequest(prompt, greedy(300)))
    wait_for(lambda: backend.stats().running == 1)
    waiting = backend.submit(GenerationRequest(prompt, greedy(300)))
    assert backend.stats().waiting == 1
    with pytest.raises(QueueFullError):
        backend.submit(GenerationRequest(prompt, greedy(4)))
    running.cancel()
    waiting.cancel()
    assert backend.drain(10)
    assert backend.generate(prompt, greedy(4)).finish_reason == "length"


def test_drain_waits_for_running_work(case):
    backend = case.make()
    handles = [backend.submit(GenerationRequest(backend.inputs.encode_text(t), greedy(20))) for t in PROMPTS]
    assert backend.drain(30)
    assert backend.stats().idle
    assert all(h.result().finish_reason == "length" for h in handles)
    long = backend.submit(GenerationRequest(backend.inputs.encode_text(PROMPTS[0]), greedy(400)))
    wait_for(lambda: backend.stats().running == 1)
    assert backend.drain(0.01) is False  # a timeout is reported, not hidden
    long.cancel()
    assert backend.drain(10)


def test_steering_is_validated_once_with_the_field_that_is_wrong(case, tmp_path):
    backend = case.make()
    prompt = backend.inputs.encode_text(PROMPTS[0])
    info = backend.info
    bad = [
        (SteeringSpec.single(vector(backend, 1), layers=[info.num_layers]), "steering.vectors[0].layers"),
        (SteeringSpec.single(SteeringVector({0: torch.zeros(info.hidden_size + 1)})), "steering.vectors[0].values"),
        (SteeringSpec.single(SteeringVector({0: torch.full((info.hidden_size,), float("nan"))})),
         "steering.vectors[0].values"),
        (SteeringSpec.single(vector(backend, 1), scale=float("inf")), "steering.vectors[0].scale"),
        (SteeringSpec.single(vector(backend, 1), positions=[info.max_model_len + 5]), "steering.vectors[0].positions"),
        (SteeringSpec.single(vector(backend, 1), positions=[]), "steering.vectors[0].positions"),
        (SteeringSpec([]), "steering.vectors"),
    ]
    for spec, param in bad:
        with pytest.raises(SteeringValidationError) as err:
            backend.submit(GenerationRequest(prompt, greedy(2), spec))
        assert err.value.param == param, (spec, err.value.message)
    with pytest.raises(SteeringValidationError, match="no vector store"):
        backend.submit(GenerationRequest(prompt, greedy(2), SteeringSpec.single("absent")))
    store = VectorStore(tmp_path, info.identity())
    backend.use_vectors(store)
    try:
        with pytest.raises(NotFoundError, match="absent"):
            backend.submit(GenerationRequest(prompt, greedy(2), SteeringSpec.single("absent")))
        store.put("present", vector(backend, 9))
        named = backend.generate(prompt, greedy(6), SteeringSpec.single("present", scale=3.0))
        inline = backend.generate(prompt, greedy(6), SteeringSpec.single(vector(backend, 9), scale=3.0))
        assert named.token_ids == inline.token_ids
    finally:
        backend.use_vectors(None)
    assert backend.stats().idle


def test_jobs_run_report_progress_and_cancel(analysis_case):
    backend = analysis_case.make()
    assert isinstance(backend, AnalysisBackend)

    def work(ctx):
        for i in range(3):
            yield Progress(i + 1, 3, "counting")
        return "done"

    assert backend.submit_job(work, "count").result(timeout=30) == "done"

    def forever(ctx):
        while True:
            yield Progress(0, None, "waiting")

    job = backend.submit_job(forever, "forever")
    wait_for(lambda: job.progress.stage == "waiting")
    job.cancel()
    with pytest.raises(JobCancelledError):
        job.result(timeout=30)
    assert backend.drain(10)
