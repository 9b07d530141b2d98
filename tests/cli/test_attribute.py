"""``steerserve attribute``."""

from __future__ import annotations

import torch

from steering.tasks.attribution import (
    AttributionRequest,
    AttributionTarget,
    attribute,
)


def test_cli_attribute_writes_json(tiny_dir, tiny_lm, texts, tmp_path):
    import json

    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "attr.json"
    args = ["attribute", "--model", str(tiny_dir), "--device", "cpu", "--prompt", "The quick brown fox jumps over",
            "--target", " the lazy dog", "--method", "integrated_gradients", "--param", "n_steps=8",
            "--param", "baseline=eos", "--output", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    prompt, yes, _ = texts
    ref = attribute(tiny_lm, AttributionRequest(prompt, AttributionTarget.continuation(yes), "integrated_gradients",
                                                {"n_steps": 8, "baseline": "eos"}))
    assert data["prompt_ids"] == prompt and data["params"]["n_steps"] == 8
    torch.testing.assert_close(torch.tensor(data["scores"]), ref.scores, rtol=1e-5, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["attr.json"]  # written atomically, nothing left over
    bad = CliRunner().invoke(app, args[:-2] + ["--param", "n_stepz=3"])
    assert bad.exit_code == 2 and "n_stepz" in bad.output
    contrast = CliRunner().invoke(app, ["attribute", "--model", str(tiny_dir), "--device", "cpu",
                                        "--prompt", "Hello world",
                                        "--preferred", " yes", "--dispreferred", " no", "--method", "occlusion"])
    assert contrast.exit_code == 0, contrast.output
    assert "occlusion (contrastive)" in contrast.output
