"""``steerserve serve`` as a process, configured by flags and environment."""

from __future__ import annotations

import json
import time

import httpx


def m(values: dict, name: str, **labels) -> float:
    return values.get(name + json.dumps(dict(sorted(labels.items()))), 0.0)


def test_serve_command_with_env_and_flags(tiny_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.live import free_port

    port = free_port()
    env = os.environ | {"STEERSERVE_VECTOR_DIR": str(tmp_path), "STEERSERVE_API_KEY": "k1",
                        "STEERSERVE_MODEL": str(tiny_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port),
                             "--served-model-name", "tiny", "--device", "cpu"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        headers = {"Authorization": "Bearer k1"}
        assert httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"] == "tiny"
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        # graceful shutdown; uvicorn re-raises the captured SIGTERM after it, so -SIGTERM is a clean exit too
        assert proc.wait(30) in (0, -signal.SIGTERM)
