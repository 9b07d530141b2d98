"""The command line with a vision-language model: examples whose images are files next to the data, and a held-out
JSON Lines split measured like TruthfulQA."""

from __future__ import annotations

import base64
import json

from typer.testing import CliRunner

from cli.main import app
from tests.tiny import random_image


def test_build_sweep_and_measure_from_image_examples(vlm, tmp_path):
    lm = vlm("llava")
    (tmp_path / "pics").mkdir()
    lines = []
    for i, (p, n) in enumerate([("bright", "dark"), ("happy", "sad"), ("calm", "stormy"), ("warm", "cold")]):
        png = random_image(30 + i)
        image = f"pics/{i}.png" if i % 2 == 0 else base64.b64encode(png).decode()  # a relative path, or base64
        if i % 2 == 0:
            (tmp_path / "pics" / f"{i}.png").write_bytes(png)
        lines.append(json.dumps({"prompt": "Describe the picture.", "preferred": p, "dispreferred": n,
                                 "image": image}))
    data = tmp_path / "pictures.jsonl"
    data.write_text("\n".join(lines) + "\n")
    common = ["--vector-dir", str(tmp_path / "vecs"), "--model", lm.source, "--device", "cpu"]
    r = CliRunner().invoke(app, ["vectors", "build", str(data), "--name", "pic", "--method", "grains",
                                 "--param", "k=50", "--param", "n_steps=4", "--param", "mode=pos",
                                 "--param", "prompt_format=chat", "--rows", "0-1", "--validation", str(data),
                                 "--validation-rows", "2-3", "--scales", "0.5", "--layers", "1-2",
                                 "--positions", "image,all", *common])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["eval", "truthfulqa", "--json", "--data", str(data), "--rows", "2-3", "--chat",
                                 "--vector", "pic", "--layers", "1", "--scale", "0.5", "--positions", "image",
                                 *common])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["data"]["examples"] == 2 and len(report["conditions"]) == 2
    assert report["conditions"][0]["metrics"]["binary"] == report["conditions"][0]["metrics"]["mc1"]
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "x", "preferred": "a", "dispreferred": "b", "image": "nope.png"}) + "\n")
    r = CliRunner().invoke(app, ["vectors", "build", str(missing), "--name", "m", *common])
    assert r.exit_code != 0 and "neither a file" in r.output
