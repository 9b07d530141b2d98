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


def _run_serve(args: list[str], env_extra: dict, timeout: float):
    import os
    import subprocess
    import sys

    env = os.environ | env_extra
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cli", "serve", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - t0


def test_serve_with_a_missing_model_exits_at_once_with_one_line(tmp_path):
    from tests.live import free_port

    proc, seconds = _run_serve(["--model", "/no/such/path", "--port", str(free_port())],
                               {"STEERSERVE_VECTOR_DIR": str(tmp_path)}, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "/no/such/path" in lines[0] and "not found" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Uvicorn running" not in proc.stderr
    assert seconds < 30  # before uvicorn, before any model work


def test_a_model_that_fails_to_load_in_the_lifespan_stops_the_server(tmp_path):
    """The path passes the cheap checks (a directory with a config.json) but cannot be loaded: the server stops
    with a non-zero status and one error line, instead of staying up with /ready 503."""
    from tests.live import free_port

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    proc, seconds = _run_serve(["--model", str(broken), "--port", str(free_port()), "--device", "cpu"],
                               {"STEERSERVE_VECTOR_DIR": str(tmp_path / "v")}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line or "error" in line.lower()]
    assert len(errors) == 1 and "failed to load" in errors[0] and str(broken) in errors[0], proc.stderr


def test_serve_help_lists_every_setting_with_its_env_var_and_default():
    from typer.testing import CliRunner

    from cli.main import app
    from server.settings import ServerSettings

    r = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert r.exit_code == 0
    text = r.output
    for name in ServerSettings.model_fields:
        assert f"--{name.replace('_', '-')}" in text
        assert f"STEERSERVE_{name.upper()}" in text, name
    assert "[default: 8000]" in text and "[default: 127.0.0.1]" in text and "STEERSERVE_THREADS" in text
    assert "--no-vllm-enforce-eager" in text


def test_serve_options_read_flags_then_env(monkeypatch, tiny_dir, tmp_path):
    """Flags win over STEERSERVE_* variables, which win over the defaults; JSON settings parse from either; a bad
    value names its flag."""
    from typer.testing import CliRunner

    import server.run
    from cli.main import app

    seen = {}

    class Stub:
        load_error = None

        def run(self) -> None:
            pass

    def build(app_, settings, **kwargs):
        seen["settings"] = settings
        return Stub()

    monkeypatch.setattr(server.run, "build_server", build)
    env = {"STEERSERVE_PORT": "1234", "STEERSERVE_MAX_BATCH_SIZE": "5", "STEERSERVE_METRICS_REQUIRE_KEY": "true",
           "STEERSERVE_VLLM_ENGINE_ARGS": '{"kv_cache_dtype": "fp8"}', "STEERSERVE_VECTOR_DIR": str(tmp_path),
           "STEERSERVE_THREADS": "1"}
    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir), "--device", "cpu", "--max-batch-size", "3"],
                           env=env)
    assert r.exit_code == 0, r.output
    s = seen["settings"]
    assert (s.port, s.max_batch_size, s.metrics_require_key) == (1234, 3, True)
    assert s.vllm_engine_args == {"kv_cache_dtype": "fp8"} and s.max_queue_size == 256
    seen.clear()
    bad = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir), "--port", "70000"], env=env)
    assert bad.exit_code == 2 and "--port" in bad.output and "STEERSERVE_PORT" in bad.output
    bad = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir), "--dtype", "float7"], env=env)
    assert bad.exit_code == 2 and "unknown dtype 'float7'" in bad.stderr and "settings" not in seen


def test_serve_with_a_vector_dir_it_cannot_write_exits_at_once_with_one_line(tmp_path):
    """A file where the directory should be (root can write anywhere else, so this is the unwritable case every
    user meets): exit status 2 and one line naming the directory, before uvicorn and before the model loads."""
    from tests.live import free_port

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    proc, seconds = _run_serve(["--port", str(free_port()), "--vector-dir", str(blocker / "vectors")], {},
                               timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be written" in lines[0] and str(blocker / "vectors") in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Uvicorn running" not in proc.stderr


def test_a_server_started_without_the_cli_reports_an_unwritable_vector_dir_and_never_becomes_ready(tmp_path,
                                                                                                 tiny_dir):
    """The lifespan checks the directory before loading the model: /ready and /health say why, no model loads."""
    from tests.live import live_server

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with live_server(model=str(tiny_dir), device="cpu", vector_dir=blocker / "vectors") as (url, app):
        deadline = time.time() + 30
        while app.state.steerserve.load_error is None:
            assert time.time() < deadline
            time.sleep(0.05)
        ready, health = httpx.get(url + "/ready"), httpx.get(url + "/health")
        assert ready.status_code == health.status_code == 503
        assert "cannot be written" in ready.json()["reason"] and "cannot be written" in health.json()["error"]
        assert app.state.steerserve.services is None

