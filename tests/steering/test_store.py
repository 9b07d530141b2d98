"""The vector store: identity checks, rename, atomic writes that survive a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from steering.engine import ModelIdentity
from steering.errors import ConflictError
from steering.store import (
    ModelMismatchError,
    VectorExistsError,
    VectorNotFoundError,
    VectorRefusedError,
    VectorStore,
)
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


# -- one directory, several writers (servers, the CLI): the directory is the truth


def _vec(value: float, size: int = 8, layers: int = 4) -> SteeringVector:
    return SteeringVector({layer: torch.full((size,), value) for layer in range(layers)})


def test_a_second_store_sees_writes_replacements_and_deletions_on_disk(tmp_path):
    ident = ModelIdentity("m", 8, 4)
    server, cli = VectorStore(tmp_path, ident), VectorStore(tmp_path, ident)
    server.load_all()
    heard: list[str] = []
    server.subscribe(heard.append)
    cli.put("v", _vec(1.0))
    # a miss re-reads the directory: usable at once, without a reload
    assert "v" in server and float(server.get("v").values[0][0]) == 1.0
    assert heard == ["v"] and server.names() == ["v"] and server.norms("v")[0] == pytest.approx(8 ** 0.5)
    cli.put("w", _vec(3.0))
    assert server.names() == ["v", "w"] and len(server) == 2 and heard == ["v", "w"]
    # replaced on disk (atomically by another store, then rewritten in place): read again, listeners told
    cli.put("v", _vec(2.0), overwrite=True)
    assert float(server.get("v").values[0][0]) == 2.0 and heard[-1] == "v"
    tmp_path.joinpath("elsewhere").mkdir()
    _vec(5.0).save(tmp_path / "elsewhere" / "x.safetensors")
    (tmp_path / "v.safetensors").write_bytes((tmp_path / "elsewhere" / "x.safetensors").read_bytes())
    assert float(server.get("v").values[0][0]) == 5.0
    # deleted on disk: gone from look-ups and listings, listeners told
    (tmp_path / "w.safetensors").unlink()
    with pytest.raises(VectorNotFoundError, match="'w' not found"):
        server.get("w")
    assert heard[-1] == "w" and server.names() == ["v"]
    (tmp_path / "v.safetensors").unlink()
    assert server.names() == [] and "v" not in server and heard[-1] == "v"
    # the other store follows its own deletions and the first store's writes alike
    server.put("z", _vec(4.0))
    assert cli.names() == ["z"] and float(cli.get("z").values[1][0]) == 4.0


def test_a_vector_for_another_model_written_on_disk_is_refused_with_the_reason(tmp_path):
    ident = ModelIdentity("m", 8, 4)
    server = VectorStore(tmp_path, ident)
    server.load_all()
    other = VectorStore(tmp_path, ModelIdentity("other", 8, 4))
    other.put("foreign", _vec(1.0))
    with pytest.raises(VectorRefusedError, match="'foreign' is not usable: vector was built for another model"):
        server.get("foreign")
    assert "foreign" not in server and server.names() == []
    assert "built for another model" in server.skipped["foreign.safetensors"]
    report = server.reload()
    assert report.added == [] and [r.file for r in report.refused] == ["foreign.safetensors"]
    # a file of the wrong shape, and garbage, likewise; fixing it on disk makes it usable
    SteeringVector({0: torch.ones(16)}).save(tmp_path / "wide.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    report = server.reload()
    assert sorted(r.file for r in report.refused) == ["foreign.safetensors", "junk.safetensors", "wide.safetensors"]
    _vec(1.0).save(tmp_path / "wide.safetensors")
    report = server.reload()
    assert report.added == ["wide"] and report.total == 1 and "wide.safetensors" not in server.skipped
    # an unusable file still takes its name: no silent overwrite, but it can be replaced or deleted on purpose
    with pytest.raises(VectorExistsError, match="another process"):
        server.put("foreign", _vec(2.0))
    server.put("foreign", _vec(2.0), overwrite=True)
    assert float(server.get("foreign").values[0][0]) == 2.0 and "foreign.safetensors" not in server.skipped
    server.delete("junk")
    assert not (tmp_path / "junk.safetensors").exists()


def test_no_overwrite_of_a_file_the_store_did_not_know_without_overwrite(tmp_path):
    ident = ModelIdentity("m", 8, 4)
    a, b = VectorStore(tmp_path, ident), VectorStore(tmp_path, ident)
    a.load_all()
    b.load_all()
    b.put("v", _vec(1.0))
    with pytest.raises(VectorExistsError, match="'v' already exists .*another process or the CLI.*overwrite"):
        a.put("v", _vec(2.0))
    assert float(b.get("v").values[0][0]) == 1.0
    a.put("v", _vec(2.0), overwrite=True)
    assert float(b.get("v").values[0][0]) == 2.0
    # rename onto a name another process took: refused without overwrite
    a.put("old", _vec(3.0))
    b.put("new", _vec(4.0))
    with pytest.raises(VectorExistsError):
        a.rename("old", "new")
    assert a.rename("old", "new", overwrite=True).name == "new"
    assert float(b.get("new").values[0][0]) == 3.0 and b.names() == ["new", "v"]
    # a conditional replace (what a sweep saving its setting does) refuses a vector changed meanwhile
    seen = a.get("v")
    b.put("v", _vec(5.0), overwrite=True)
    with pytest.raises(ConflictError, match="changed or removed meanwhile"):
        a.put("v", _vec(6.0), overwrite=True, expect=seen)
    a.put("v", _vec(6.0), overwrite=True, expect=a.get("v"))
    assert float(b.get("v").values[0][0]) == 6.0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


RACER = textwrap.dedent("""
    import os, sys, time, torch
    from steering.engine import ModelIdentity
    from steering.store import VectorExistsError, VectorStore
    from steering.vectors import SteeringVector
    root, me, go = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    reg = VectorStore(root, ModelIdentity("m", 4096, 64))
    vec = SteeringVector({layer: torch.full((4096,), me) for layer in range(64)})
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        reg.put("race", vec)
        print("won", flush=True)
    except VectorExistsError:
        print("lost", flush=True)
""")


def test_concurrent_writers_of_one_name_exactly_one_wins_the_file_is_whole(tmp_path):
    """Processes and threads writing the same new name at once: one wins, the others are refused, and the file is
    the winner's, whole."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    go = tmp_path / "go"
    root = tmp_path / "vectors"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(root), str(float(i + 1)), str(go)],
                              stdout=subprocess.PIPE, env=env) for i in range(3)]
    for p in procs:
        assert p.stdout.readline().strip() == b"ready"
    go.touch()
    outcomes = [p.stdout.read().strip().decode() for p in procs]
    for p in procs:
        assert p.wait(60) == 0
    assert sorted(outcomes) == ["lost", "lost", "won"]
    check = VectorStore(root, ModelIdentity("m", 4096, 64))
    assert check.load_all() == 1 and not check.skipped
    winner = float(outcomes.index("won") + 1)
    v = check.get("race")
    assert len(v.layers) == 64 and all(bool((v.values[x] == winner).all()) for x in v.layers)
    # threads, each with a store of its own on the directory
    ident = ModelIdentity("m", 8, 4)
    stores = [VectorStore(root, ident) for _ in range(6)]
    results: list[str] = []
    start = threading.Barrier(len(stores))

    def write(i: int) -> None:
        start.wait()
        try:
            stores[i].put("t", _vec(float(i)))
            results.append(f"won {i}")
        except VectorExistsError:
            results.append("lost")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if r.startswith("won")]
    assert len(won) == 1 and results.count("lost") == len(stores) - 1
    assert all(float(s.get("t").values[0][0]) == float(won[0].split()[1]) for s in stores)
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_watch_tells_listeners_of_files_removed_on_disk(tmp_path):
    store = VectorStore(tmp_path, ModelIdentity("m", 8, 4))
    store.put("v", _vec(1.0))
    heard: list[str] = []
    store.subscribe(heard.append)
    stop = store.watch(0.02)
    try:
        (tmp_path / "v.safetensors").unlink()
        deadline = time.time() + 10
        while "v" not in heard and time.time() < deadline:
            time.sleep(0.01)
        assert heard == ["v"]
        _vec(2.0).save(tmp_path / "n.safetensors")
        while "n" not in heard and time.time() < deadline:
            time.sleep(0.01)
        assert heard == ["v", "n"] and store._entries["n"].vector.values[0][0] == 2.0
    finally:
        stop()
