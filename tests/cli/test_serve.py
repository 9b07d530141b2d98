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


def test_sigterm_on_a_real_process(tmp_path):
    """A real SIGTERM: /ready turns 503 at once while the listener stays open, a short request still finishes,
    a long stream ends with an error event and [DONE] when the drain runs out, and the process exits cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    from tests.live import free_port
    from tests.tiny import build_model

    slower = build_model(tmp_path / "model", "llama", layers=8, hidden=256)  # a stream that outlasts the drain
    port = free_port()
    env = os.environ | {"STEERSERVE_VECTOR_DIR": str(tmp_path / "v"), "STEERSERVE_MODEL": str(slower)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), "--device", "cpu",
                             "--drain-seconds", "1", "--shutdown-delay-seconds", "1", "--max-model-len", "512"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        lines: list[str] = []

        def stream() -> None:
            body = {"model": model, "prompt": "Hello", "max_tokens": 480, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                lines.extend(line for line in r.iter_lines() if line)

        t = threading.Thread(target=stream)
        t.start()
        while not lines:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(url + "/ready").status_code == 503  # still listening, no longer ready
        refused = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503
        t.join(30)
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert error["code"] == 503 and "shutting down" in error["message"]
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
