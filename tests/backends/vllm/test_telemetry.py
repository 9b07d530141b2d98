"""The workers' steering telemetry, pulled through the worker RPC: with every step measured, each request's mean
relative change and the steered tokens per layer are those the Hugging Face engine measures for the same
request (the same tokens, the same arithmetic)."""

from __future__ import annotations

import time

import pytest

from steering.engine.types import SteeringTelemetry, TelemetryReport
from tests.backends.vllm.conftest import ENGINE, MAX_TOKENS, PROMPTS, env
from tests.backends.vllm.test_engine import CASES, PROMPT_OF, greedy

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def measured_backend(vllm_model, vllm_cache):
    from steering.backends.vllm.engine import VLLMBackend, VLLMConfig

    with env(VLLM_CACHE_ROOT=str(vllm_cache / "telemetry"), VLLM_CPU_KVCACHE_SPACE="1"):
        backend = VLLMBackend(VLLMConfig(model=str(vllm_model), **ENGINE, enforce_eager=True,
                                         telemetry_every=1)).start()
    yield backend
    backend.shutdown()


def pull_until(backend, n: int) -> TelemetryReport:
    """The workers release a finished request's slot at their next step: pull until ``n`` requests are in."""
    total = TelemetryReport()
    deadline = time.time() + 60
    while len(total.requests) < n:
        assert time.time() < deadline, total
        got = backend.pull_telemetry()
        assert got is not None
        total.requests += got.requests
        for layer, count in got.layer_tokens.items():
            total.layer_tokens[layer] = total.layer_tokens.get(layer, 0) + count
        time.sleep(0.05)
    return total


@pytest.mark.parametrize("case", ["all_norm", "explicit_raw", "stacked", "generated_norm"])
def test_every_step_measured_is_the_hf_engines_telemetry(measured_backend, hf_ref, case):
    spec, prompt = CASES[case], PROMPTS[PROMPT_OF[case]]
    res = measured_backend.generate(list(prompt), greedy(), spec)
    assert len(res.token_ids) == MAX_TOKENS and res.steering_telemetry is None  # it comes from the workers
    report = pull_until(measured_backend, 1)
    want = hf_ref.generate(list(prompt), greedy(), spec).steering_telemetry
    assert isinstance(want, SteeringTelemetry) and want.measured
    [(names, got)] = report.requests
    assert names == (None,) * len(spec.applications)  # inline vectors
    assert got.measured == want.measured == sum(want.layer_tokens.values())
    assert got.relative_change == pytest.approx(want.relative_change, rel=1e-3)
    assert report.layer_tokens == want.layer_tokens


def test_unsteered_requests_report_nothing_and_pulls_do_not_repeat(measured_backend):
    measured_backend.generate(list(PROMPTS[0]), greedy(), None)
    time.sleep(0.5)
    report = measured_backend.pull_telemetry()
    assert report is not None and report.requests == [] and report.layer_tokens == {}
