"""``steerserve generate``: a vector file or a stored name, checked before the model loads; the API's defaults."""

from __future__ import annotations

import time

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from steering.spec import DEFAULT_NORMALIZE, DEFAULT_POSITIONS, DEFAULT_SCALE
from steering.store import VectorStore
from steering.vectors import SteeringVector


def test_cli_generate_with_vector(tiny_dir, tmp_path):
    vec = SteeringVector({i: torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(4)})
    vec.save(tmp_path / "v.safetensors")
    runner = CliRunner()
    args = ["generate", "--model", str(tiny_dir), "--prompt", "Hello", "--max-tokens", "8", "--device", "cpu"]
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0, plain.output
    steered = runner.invoke(app, args + ["--vector", str(tmp_path / "v.safetensors"), "--scale", "30",
                                         "--layers", "0-3", "--compare"])
    assert steered.exit_code == 0, steered.output
    assert "unsteered" in steered.output and "steered" in steered.output
    bad = runner.invoke(app, args + ["--vector", str(tmp_path / "v.safetensors"), "--layers", "9"])
    assert bad.exit_code == 2 and "does not exist" in bad.output


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads a model."""
    import steering.backends.hf.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing.safetensors", "no such vector file"),
    (lambda d: d / "missing.gguf", "no such vector file"),
    (lambda d: (d / "bogus.gguf").write_bytes(b"not a gguf") and d / "bogus.gguf", "not a GGUF file"),
    (lambda d: (d / "trunc.gguf").write_bytes(b"GGUF\x03\x00") and d / "trunc.gguf", "not a valid GGUF file"),
    (lambda d: (d / "bogus.safetensors").write_bytes(b"\xff" * 64) and d / "bogus.safetensors",
     "not a valid safetensors"),
    (lambda d: "nosuch", "no vector named 'nosuch'"),
    (lambda d: "bad name!", "neither a vector file"),
])
def test_vector_errors_come_before_the_model_loads(tiny_dir, tmp_path, no_model_load, make, expected):
    target = make(tmp_path)
    t0 = time.monotonic()
    r = CliRunner().invoke(app, ["generate", "--model", str(tiny_dir), "--device", "cpu", "-p", "Hi",
                                 "--vector", str(target), "--vector-dir", str(tmp_path / "vecs")])
    assert r.exit_code == 2, r.output
    assert expected in r.stderr and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert time.monotonic() - t0 < 10


def test_a_missing_model_fails_before_reading_anything(tmp_path, no_model_load):
    r = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "nope"), "-p", "Hi"])
    assert r.exit_code == 2 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_stored_name_steers_with_the_api_defaults(tiny_dir, tiny_lm, sentiment_vector, tmp_path):
    VectorStore(tmp_path / "vecs", tiny_lm.info.identity()).put("pos", sentiment_vector)
    args = ["generate", "--model", str(tiny_dir), "--device", "cpu", "-p", "Hi", "--max-tokens", "3",
            "--vector-dir", str(tmp_path / "vecs"), "--threads", "1"]
    r = CliRunner().invoke(app, args + ["--vector", "pos"])
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 1  # --threads is applied before the model loads
    # no scale, positions or normalize given, no stored setting: the API's defaults, from one place
    described = r.stderr.split("steering:", 1)[1]
    assert f"'scale': {DEFAULT_SCALE}" in described and f"'normalize': {DEFAULT_NORMALIZE}" in described
    assert f"'positions': '{DEFAULT_POSITIONS}'" in described
    # a vector built for another model is refused, as the server refuses it
    other = VectorStore(tmp_path / "other", None)
    other.put("alien", SteeringVector({0: torch.ones(64)}, metadata={"model": {"name": "another", "num_layers": 9,
                                                                                 "hidden_size": 64}}))
    bad = CliRunner().invoke(app, args[:-4] + ["--vector-dir", str(tmp_path / "other"), "--vector", "alien"])
    assert bad.exit_code == 2 and "built for another model" in bad.stderr, bad.output
