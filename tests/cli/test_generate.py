"""``steerserve generate`` with a vector file."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from cli.main import app
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
