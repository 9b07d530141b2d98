"""``steerserve vectors``: build, sweep, list, rename, export."""

from __future__ import annotations

import json

import torch

from steering.store import VectorStore
from tests.tiny import EXAMPLES


def test_cli_vectors(tiny_dir, tiny_lm, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(e.__dict__) for e in EXAMPLES) + "\n")
    vd = ["--vector-dir", str(tmp_path / "vecs")]
    model = ["--model", str(tiny_dir), "--device", "cpu"]
    r = CliRunner().invoke(app, ["--progress-seconds", "0.05", "vectors", "build", str(data), "--name", "g",
                                 "--param", "k=3", "--param", "n_steps=4", "--validation", str(data),
                                 "--validation-rows", "0-2", "--scales", "0.5,1", "--layers", "1-2", *vd, *model])
    assert r.exit_code == 0, r.output
    assert "saved g (2 layers)" in r.output
    # stderr is not a terminal here: plain progress lines with the fraction and an ETA, no bar
    progress = [line for line in r.stderr.splitlines() if line.startswith("grains (")]
    assert progress[0].endswith(": started") and "done in" in progress[-1]
    assert any("% (0." in line and "eta" in line for line in progress), r.stderr
    reg = VectorStore(tmp_path / "vecs", tiny_lm.info.identity())
    reg.load_all()
    v = reg.get("g")
    assert v.layers == [1, 2] and v.metadata["sweep"]["examples"] == 3 and v.metadata["params"]["n_steps"] == 4
    assert CliRunner().invoke(app, ["vectors", "build", str(data), "--name", "g", *vd, *model]).exit_code != 0
    r = CliRunner().invoke(app, ["vectors", "export-gguf", "g", str(tmp_path / "g.gguf"), "--scale", "2", *vd])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["vectors", "import-gguf", str(tmp_path / "g.gguf"), "g2", *vd, *model])
    assert r.exit_code == 0, r.output
    reg.load_all()
    torch.testing.assert_close(reg.get("g2").values[2], 2 * v.values[2])
    assert CliRunner().invoke(app, ["vectors", "rename", "g2", "g3", *vd]).exit_code == 0
    r = CliRunner().invoke(app, ["vectors", "list", *vd])
    assert r.exit_code == 0 and "g3" in r.output and "g2" not in r.output
    listed = json.loads(CliRunner().invoke(app, ["vectors", "list", "--json", *vd]).stdout)
    assert [v["name"] for v in listed["vectors"]] == ["g", "g3"] and listed["vectors"][0]["layers"] == [1, 2]
    shown = json.loads(CliRunner().invoke(app, ["vectors", "show", "g", "--json", *vd]).stdout)
    assert shown["name"] == "g" and shown["metadata"]["params"]["n_steps"] == 4
    r = CliRunner().invoke(app, ["vectors", "sweep", "g", str(data), "--scales", "1", "--output",
                                 str(tmp_path / "s.json"), *vd, *model])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "s.json").read_text())["table"]) == 2
    r = CliRunner().invoke(app, ["vectors", "sweep", "g", str(data), "--scales", "1", "--json", *vd, *model])
    assert r.exit_code == 0 and len(json.loads(r.stdout)["table"]) == 2
    bad = CliRunner().invoke(app, ["vectors", "build", str(data), "--name", "x", "--method", "zz", *vd, *model])
    assert bad.exit_code == 2 and "valid methods" in bad.output
    assert CliRunner().invoke(app, ["vectors", "delete", "g3", *vd]).exit_code == 0


def test_cli_sweep_under_a_fluency_budget_stores_the_setting(tiny_dir, tiny_lm, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(e.__dict__) for e in EXAMPLES) + "\n")
    vd = ["--vector-dir", str(tmp_path / "vecs")]
    model = ["--model", str(tiny_dir), "--device", "cpu"]
    r = CliRunner().invoke(app, ["vectors", "build", str(data), "--name", "c", "--method", "caa", "--layers", "1-3",
                                 *vd, *model])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["vectors", "sweep", "c", str(data), "--scales", "0.25,8", "--layers", "1",
                                 "--layer-ranges", "2-3", "--positions", "all,generated", "--normalize", "both",
                                 "--metric", "margin", "--fluency-budget", "1.2", "--fluency-prompts", "3",
                                 "--fluency-tokens", "6", "--save", "--output", str(tmp_path / "s.json"), *vd, *model])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "s.json").read_text())
    assert len(res["table"]) == 2 * 2 * 2 * 2 and "ppl" in r.output \
        and "stored the chosen setting" in r.output
    reg = VectorStore(tmp_path / "vecs", tiny_lm.info.identity())
    reg.load_all()
    setting = reg.get("c").metadata["setting"]
    assert setting["layers"] == res["best"]["layers"] and res["best"]["within_budget"]
    bad = CliRunner().invoke(app, ["vectors", "sweep", "c", str(data), "--normalize", "sometimes", *vd, *model])
    assert bad.exit_code == 2 and "on, off or both" in bad.output
    none = CliRunner().invoke(app, ["vectors", "sweep", "c", str(data), "--scales", "8", "--layers", "2",
                                    "--fluency-budget", "1", "--fluency-prompts", "3", "--fluency-tokens", "6",
                                    "--save", *vd, *model])
    assert none.exit_code == 0 and "nothing stored" in none.output
