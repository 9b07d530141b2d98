"""The worker extension that manages the vector bank, reached through ``collective_rpc`` (like LoRA adapters).

vLLM appends this class to the worker's bases (``worker_extension_cls``, a dotted path) and asserts that no
attribute name clashes, hence the prefix. Arguments travel by msgpack: per-layer little-endian float32 bytes.
Every rank holds the same bank, so tensor-parallel ranks steer identically.
"""

from __future__ import annotations

from typing import Any

QUALNAME = "steering.backends.vllm.worker.SteerWorkerExtension"


class SteerWorkerExtension:
    model_runner: Any

    def _steerserve_state(self) -> Any:
        state = getattr(self.model_runner, "_steerserve_state", None)
        if state is None:
            raise RuntimeError("steering is not enabled on this engine (additional_config has no 'steerserve')")
        return state

    def steerserve_register(self, key: str, values: dict[int, bytes]) -> dict[str, Any]:
        return self._steerserve_state().register(key, values)

    def steerserve_unregister(self, key: str) -> bool:
        return self._steerserve_state().unregister(key)

    def steerserve_stats(self) -> dict[str, Any]:
        return self._steerserve_state().snapshot()

    def steerserve_telemetry(self) -> dict[str, Any]:
        """Finished requests' steering telemetry and the steered tokens per layer since the last call."""
        return self._steerserve_state().pull_telemetry()
