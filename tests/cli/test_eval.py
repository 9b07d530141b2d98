"""``steerserve eval``."""

from __future__ import annotations

import json

import pytest

from steering.store import VectorStore
from tests.tiny import TRUTHFULQA_CSV


def test_cli_eval(tiny_dir, tiny_lm, sentiment_vector, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    reg = VectorStore(tmp_path / "vecs", tiny_lm.info.identity())
    reg.put("pos", sentiment_vector)
    csv_path = tmp_path / "tqa.csv"
    csv_path.write_text(TRUTHFULQA_CSV)
    vd = ["--vector-dir", str(tmp_path / "vecs")]
    model = ["--model", str(tiny_dir), "--device", "cpu"]
    r = CliRunner().invoke(app, ["eval", "truthfulqa", "--data", str(csv_path), "--rows", "0-2", "--vector", "pos",
                                 "--scale", "0.5,1", "--layers", "2", "--output", str(tmp_path / "r.json"),
                                 "--markdown", str(tmp_path / "r.md"), *vd, *model])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "r.json").read_text())
    assert [c["label"] for c in d["conditions"]] == ["unsteered", "pos@L2 x0.5 rel", "pos@L2 x1 rel"]
    assert d["conditions"][2]["steering"][0]["scale"] == pytest.approx(sentiment_vector.metadata["hidden_norms"]["2"])
    assert d["data"]["examples"] == 3 and d["data"]["rows"] == "0-2"
    assert d["settings"]["prompt_format"] == "raw"  # the default of both eval commands
    assert (tmp_path / "r.md").read_text() in r.output
    prompts = tmp_path / "p.txt"
    prompts.write_text("The day was\n\nMy friend is\n")
    r = CliRunner().invoke(app, ["eval", "steer", "--prompts", str(prompts), "-p", "Hello", "--vector", "pos",
                                 "--scale", "20", "--absolute", "--layers", "1", "--max-tokens", "4", "--no-chat",
                                 "--output", str(tmp_path / "s.json"), *vd, *model])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["data"]["examples"] == 3 and s["conditions"][1]["label"] == "pos@L1 x20"
    assert s["conditions"][1]["steering"][0]["scale"] == 20.0 and "sentiment" in r.output
    r = CliRunner().invoke(app, ["eval", "steer", "--questions", str(csv_path), "--rows", "1", "--scorer", "none",
                                 "--max-tokens", "2", "--json", *vd, *model])  # raw text: the default of both
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["conditions"][0]["samples"][0]["prompt"] == "Q: What do cats eat?\nA:"
    assert report["settings"]["chat"] is False
    bad = CliRunner().invoke(app, ["eval", "truthfulqa", "--data", str(csv_path), "--vector", "pos", *vd, *model])
    assert bad.exit_code == 2 and "no sweep result" in bad.output
    bad = CliRunner().invoke(app, ["eval", "truthfulqa", "--data", str(csv_path), "--vector", "pos", "--vector",
                                   "pos", "--scale", "1", "--layers", "1", "--layers", "1", "--layers", "2", *vd,
                                   *model])
    assert bad.exit_code != 0 and "once per --vector" in bad.output
