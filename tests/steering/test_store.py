"""The vector store: identity checks, rename, atomic writes that survive a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from steering.engine import ModelIdentity
from steering.store import ModelMismatchError, VectorExistsError, VectorStore
from steering.tasks.builders import BuildRequest, build
from steering.vectors import SteeringVector
from tests.tiny import EXAMPLES


def test_registry_rename_and_model_identity(tiny_lm, tmp_path):
    reg = VectorStore(tmp_path, tiny_lm.info.identity())
    reg.load_all()
    vec = build(tiny_lm, BuildRequest(EXAMPLES, "caa")).vector
    reg.put("a", vec)
    reg.put("b", SteeringVector({0: torch.ones(tiny_lm.hidden_size)}))
    with pytest.raises(VectorExistsError):
        reg.rename("a", "b")
    reg.rename("a", "c")
    assert reg.names() == ["b", "c"] and sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors",
                                                                                      "c.safetensors"]
    again = VectorStore(tmp_path, tiny_lm.info.identity())
    assert again.load_all() == 2 and again.get("c").metadata["method"] == "caa"
    torch.testing.assert_close(again.get("c").values[1], vec.values[1])
    # a vector built for another model of the very same shape is refused, on upload and at load
    other = ModelIdentity("other-model", tiny_lm.hidden_size, tiny_lm.num_layers, "llama", 400)
    foreign = SteeringVector(dict(vec.values), metadata={**vec.metadata, "model": other.as_dict()})
    with pytest.raises(ModelMismatchError, match="built for another model: name 'other-model'"):
        reg.put("foreign", foreign)
    foreign.save(tmp_path / "foreign.safetensors")
    assert again.load_all() == 2 and "foreign.safetensors" in again.skipped

WRITER = textwrap.dedent("""
    import sys, torch
    from steering.engine import ModelIdentity
    from steering.store import VectorStore
    from steering.vectors import SteeringVector
    reg = VectorStore(sys.argv[1], ModelIdentity("m", 4096, 64))
    big = {layer: torch.full((4096,), 2.0) for layer in range(64)}
    print("ready", flush=True)
    while True:
        reg.put("v", SteeringVector(big), overwrite=True)
""")


def test_killed_write_leaves_the_registry_intact(tmp_path):
    """SIGKILL a process that keeps rewriting a vector: the file on disk is always a whole, valid vector."""
    reg = VectorStore(tmp_path, ModelIdentity("m", 4096, 64))
    reg.load_all()
    reg.put("v", SteeringVector({layer: torch.full((4096,), 1.0) for layer in range(64)}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check = VectorStore(tmp_path, ModelIdentity("m", 4096, 64))
        assert check.load_all() == 1 and not check.skipped
        v = check.get("v")
        assert len(v.layers) == 64 and float(v.values[63][0]) in (1.0, 2.0)


def test_start_up_hygiene(tmp_path, monkeypatch):
    """Stale temporary files of interrupted writes are removed, symlinks out of the directory refused, and the
    listing does not recompute norms."""
    import steering.store as store_mod

    outside = tmp_path / "outside"
    root = tmp_path / "vectors"
    store = VectorStore(root, ModelIdentity("m", 8, 4))
    store.load_all()
    store.put("a", SteeringVector({0: torch.ones(8)}))
    SteeringVector({0: torch.ones(8)}).save(outside / "x.safetensors")
    (root / "evil.safetensors").symlink_to(outside / "x.safetensors")
    (root / "inside.safetensors").symlink_to(root / "a.safetensors")
    stale, fresh = root / ".a.safetensors.old.tmp", root / ".a.safetensors.new.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    old = time.time() - store_mod.STALE_TMP_SECONDS - 10
    os.utime(stale, (old, old))
    again = VectorStore(root, ModelIdentity("m", 8, 4))
    assert again.load_all() == 2 and sorted(again.names()) == ["a", "inside"]
    assert "symlink out of the vector directory" in again.skipped["evil.safetensors"]
    assert not stale.exists() and fresh.exists()  # a write still in flight is left alone
    calls = []
    monkeypatch.setattr(store_mod, "_norms", lambda v: calls.append(v) or {})
    for _ in range(3):
        assert again.norms("a") == {0: pytest.approx(8 ** 0.5)}
    assert calls == []
    with pytest.raises(Exception, match="vector name"):
        again.put("trailing\n", SteeringVector({0: torch.ones(8)}))
