"""The attribution score cache: builds that differ only after attribution reuse the scores, in memory and on
disk, and a cached build equals one from scratch."""

from __future__ import annotations

import torch

from steering.datasets import PreferenceExample
from steering.tasks.attribution import cache as score_cache
from steering.tasks.attribution import packed
from steering.tasks.attribution.packed import resolve_precision
from steering.tasks.builders import BuildRequest, build, grains
from tests.tiny import EXAMPLES


def test_builds_reuse_cached_attributions(tiny_lm, monkeypatch, tmp_path):
    calls: list[int] = []
    real = packed.integrated_gradients

    def counting(ctx, rows, *args, **kwargs):
        calls.append(len(rows))
        return (yield from real(ctx, rows, *args, **kwargs))

    monkeypatch.setattr(packed, "integrated_gradients", counting)
    monkeypatch.setattr(score_cache, "SCORES", score_cache.ScoreCache(directory=tmp_path))
    p = {"n_steps": 4, "select_from": "sequence", "skip_template": False}
    build(tiny_lm, BuildRequest(EXAMPLES, "grains", {**p, "k": 3}))
    assert calls == [len(EXAMPLES)]
    other = {**p, "k": 5, "mode": "pos", "aggregate": "pca", "replacement": "delete"}
    second = build(tiny_lm, BuildRequest(EXAMPLES, "grains", other))
    assert calls == [len(EXAMPLES)]  # no attribution at all
    build(tiny_lm, BuildRequest(EXAMPLES[:2] + [PreferenceExample("a new prompt", "yes", "no")], "grains",
                                {**p, "k": 3}))
    assert calls == [len(EXAMPLES), 1]  # only the new example
    monkeypatch.setattr(score_cache, "SCORES", score_cache.ScoreCache(directory=tmp_path))  # "a new process"
    again = build(tiny_lm, BuildRequest(EXAMPLES, "grains", other))
    assert calls == [len(EXAMPLES), 1]
    monkeypatch.setattr(score_cache, "SCORES", score_cache.ScoreCache())
    fresh = build(tiny_lm, BuildRequest(EXAMPLES, "grains", other))
    assert calls == [len(EXAMPLES), 1, len(EXAMPLES)]
    for layer in fresh.vector.layers:
        torch.testing.assert_close(second.vector.values[layer], fresh.vector.values[layer])
        torch.testing.assert_close(again.vector.values[layer], fresh.vector.values[layer])
    # other attribution settings are other entries
    build(tiny_lm, BuildRequest(EXAMPLES, "grains", {**p, "k": 3, "n_steps": 5}))
    other_precision = "model" if resolve_precision(tiny_lm, "auto") == "bfloat16" else "bfloat16"
    build(tiny_lm, BuildRequest(EXAMPLES, "grains", {**p, "k": 3, "precision": other_precision}))
    assert calls[-2:] == [len(EXAMPLES), len(EXAMPLES)]
    assert grains.GrainsParams().precision == "auto"


def test_a_damaged_or_foreign_cache_file_is_a_miss(tmp_path):
    c = score_cache.ScoreCache(directory=tmp_path)
    c.put("ab" + "0" * 62, torch.arange(3.0))
    path = tmp_path / "ab" / ("ab" + "0" * 62 + ".pt")
    assert path.is_file() and not list(tmp_path.rglob("*.tmp"))
    fresh = score_cache.ScoreCache(directory=tmp_path)
    torch.testing.assert_close(fresh.get("ab" + "0" * 62), torch.arange(3.0))
    path.write_bytes(b"not a tensor")
    assert score_cache.ScoreCache(directory=tmp_path).get("ab" + "0" * 62) is None
    torch.save({"x": 1}, path)
    assert score_cache.ScoreCache(directory=tmp_path).get("ab" + "0" * 62) is None


def test_memory_is_bounded_least_recently_used_first_out():
    c = score_cache.ScoreCache(max_bytes=3 * 4 * 10)
    for i in range(5):
        c.put(f"k{i}", torch.zeros(10))
        if i == 2:
            assert c.get("k0") is not None  # k0 is now the most recently used
    assert c.get("k0") is not None and c.get("k1") is None and c.get("k4") is not None
