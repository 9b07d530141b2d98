"""The vLLM backend: the same per-request steering on vLLM's engine (paged attention, chunked prefill, prefix
caching, torch.compile and CUDA graphs), as a plugin rather than a fork.

Two halves. In vLLM's processes, the plugin (:func:`register`, the ``vllm.general_plugins`` entry point) checks
the seams it relies on and patches them (:mod:`.seams`); workers keep the persistent steering buffers and the
vector bank (:mod:`.state`), filled once per step, read by one op per decoder layer (:mod:`.op`). In the server's
process, :class:`~steering.backends.vllm.engine.VLLMBackend` implements the backend contract over vLLM's
``AsyncLLM``: it resolves each request's steering like every backend, registers its vectors into the bank and
sends the request with its steering in ``SamplingParams.extra_args`` (:mod:`.wire`) and a prefix-cache salt.

This module stays import-light: vLLM imports it in every process and only logs an import error, while an
exception raised inside :func:`register` stops vLLM's start-up, which is what a missing seam must do.
"""

SUPPORTED_VLLM = "0.32.0"
CONFIG_KEY = "steerserve"
"""The ``additional_config`` entry that arms an engine (and salts its compile cache)."""


def register() -> None:
    """vLLM's plugin entry point: check the seams and patch them (once per process)."""
    from steering.backends.vllm import seams

    seams.install()
