"""The vLLM backend joins the backend contract (:mod:`tests.contract.test_backends`): the same tests, with the
Hugging Face engine on the same model as the reference. Engines are started once per configuration."""

from __future__ import annotations

import pytest

from tests.backends.vllm.conftest import ENGINE, env
from tests.contract.test_backends import (  # noqa: F401 - collected here with this module's `case`
    Case,
    hf_reference,
    test_batched_equals_alone,
    test_cancel_frees_the_slot,
    test_drain_waits_for_running_work,
    test_generation_equals_the_reference,
    test_queue_full_then_room_again,
    test_steering_is_validated_once_with_the_field_that_is_wrong,
    test_streamed_deltas_add_up_and_report_steering,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def started(vllm_model, vllm_cache):
    """Backends by (max_running, max_waiting), started on first use and kept for the module."""
    from steering.backends.vllm.engine import VLLMBackend, VLLMConfig

    made: dict[tuple[int, int], VLLMBackend] = {}

    def get(max_running: int, max_waiting: int) -> VLLMBackend:
        key = (max_running, max_waiting)
        if key not in made:
            for other in made.values():  # one engine at a time on a small machine
                other.shutdown()
            made.clear()
            cfg = {**ENGINE, "max_num_seqs": max_running, "max_model_len": 512}  # the suite asks for 400 tokens
            with env(VLLM_CACHE_ROOT=str(vllm_cache / "contract")):
                made[key] = VLLMBackend(VLLMConfig(model=str(vllm_model), enforce_eager=True,
                                                   max_queue_size=max_waiting, **cfg)).start()
        return made[key]

    yield get
    for backend in made.values():
        backend.shutdown()


@pytest.fixture
def case(started, hf_ref) -> Case:
    def make(max_running: int = 8, max_waiting: int = 256):
        backend = started(max_running, max_waiting)
        assert backend.drain(30) and backend.stats().idle
        return backend

    return Case(make, lambda _backend, prompt, sampling, steering: hf_reference(hf_ref, prompt, sampling, steering))
