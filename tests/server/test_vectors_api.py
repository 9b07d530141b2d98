"""Vector building over real HTTP: build jobs with progress and cancellation, the built vector usable by name at
once, sweeps, rename, GGUF export/import, and errors in the OpenAI envelope."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch

from clients import SteerClient, SteerServeError, steering
from steering.backends.hf import EngineConfig, HFEngine
from steering.engine import ModelIdentity
from steering.store import VectorStore
from steering.vectors import SteeringVector
from tests.live import live_server

EXAMPLES = [
    {"prompt": "What is the capital of France?", "preferred": "Paris", "dispreferred": "Berlin"},
    {"prompt": "I love this movie, it is", "preferred": "wonderful and happy", "dispreferred": "awful and sad"},
    {"prompt": "The quick brown fox", "preferred": "jumps over the lazy dog", "dispreferred": "is sad"},
]


@pytest.fixture(scope="module")
def server(tiny_lm, tmp_path_factory):
    engine = HFEngine(tiny_lm, EngineConfig(max_batch_size=8, job_chunk_tokens=128)).start()
    with live_server(engine, vector_dir=tmp_path_factory.mktemp("vectors"), job_chunk_tokens=128) as (url, app):
        yield url, app
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return SteerClient(server[0])


def test_build_job_progress_then_vector_usable_at_once(server, client, tiny_lm):
    url, _ = server
    job = client.build_vector("grains-1", EXAMPLES * 3, params={"k": 3, "n_steps": 48}, validation=EXAMPLES,
                              sweep={"scales": [0.5, 1.0], "layers": [1, 2]}, description="test")
    assert job["object"] == "job" and job["type"] == "vector_build" and job["status"] in ("queued", "running")
    seen = []
    done = client.wait(job["id"], poll=0.02, on_progress=seen.append)
    assert done["status"] == "succeeded", done["error"]
    running = [j for j in seen if j["status"] == "running" and j["progress"] is not None]
    assert running and any(j["stage"] == "attribution" for j in running)
    fractions = [j["progress"] for j in running]
    assert fractions == sorted(fractions) and all(0 <= f <= 1 for f in fractions)
    assert any(j["eta_seconds"] is not None for j in running)
    assert done["progress"] == 1.0 and done["finished_at"] >= done["created_at"] and done["compute_seconds"] > 0
    result = done["result"]
    assert result["vector"]["name"] == "grains-1" and result["vector"]["metadata"]["method"] == "grains"
    assert result["vector"]["metadata"]["description"] == "test"
    assert len(result["sweep"]["table"]) == 4 and result["sweep"]["best"] in result["sweep"]["table"]
    # usable by name at once, through the OpenAI SDK
    oa = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    kw = dict(model=tiny_lm.name, prompt="The quick brown", max_tokens=8, temperature=0)
    plain = oa.completions.create(**kw).choices[0].text
    steered = oa.completions.create(**kw, extra_body=steering({"name": "grains-1", "scale": 200, "layers": [1]}))
    assert steered.choices[0].text != plain
    assert client.get_vector("grains-1")["metadata"]["sweep"]["examples"] == 3
    assert any(j["id"] == job["id"] for j in client.jobs())
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in f.samples
               if s.name == "steerserve_jobs_total"]
    assert any(s.labels["type"] == "vector_build" and s.labels["status"] == "succeeded" and s.value >= 1
               for s in samples)


def test_generation_is_served_while_a_build_runs_and_cancel(server, client, tiny_lm):
    url, _ = server
    job = client.build_vector("slow", EXAMPLES * 20, params={"n_steps": 256})
    while client.job(job["id"])["status"] == "queued":
        time.sleep(0.01)
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"model": tiny_lm.name, "prompt": "Hello", "max_tokens": 8,
                                                  "temperature": 0}, timeout=60)
    assert r.status_code == 200 and time.monotonic() - t0 < 30
    assert client.job(job["id"])["status"] == "running", "the completion waited for the build"
    cancelled = client.cancel_job(job["id"])
    assert cancelled["id"] == job["id"]
    final = client.wait(job["id"], poll=0.02, timeout=60)
    assert final["status"] == "cancelled" and final["result"] is None
    assert "slow" not in [v["name"] for v in client.list_vectors()]


def test_build_errors(server, client):
    url, _ = server
    cases = [
        ({"name": "x", "examples": EXAMPLES, "method": "nope"}, "unknown vector method", "method"),
        ({"name": "x", "examples": EXAMPLES, "params": {"kk": 1}}, "kk: unknown parameter", "params.kk"),
        ({"name": "x", "examples": EXAMPLES, "sweep": {"scales": [1]}}, "needs validation", "validation"),
        ({"name": "x", "examples": []}, "examples", None),
        ({"name": "bad name!", "examples": EXAMPLES}, "a vector name is", "name"),
        ({"name": "x", "examples": EXAMPLES, "metod": "caa"}, "unknown field", None),
        ({"name": "x", "examples": [{"prompt": "a", "preferred": "b"}]}, "dispreferred", None),
    ]
    for body, msg, param in cases:
        r = httpx.post(url + "/v1/steering/vectors/build", json=body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert msg in err["message"] and err["type"] == "invalid_request_error"
        if param:
            assert err["param"] == param
    job = client.build_vector("dup", EXAMPLES, method="caa")
    assert client.wait(job["id"], poll=0.02)["status"] == "succeeded"
    with pytest.raises(SteerServeError) as exc:
        client.build_vector("dup", EXAMPLES, method="caa")
    assert exc.value.status == 409
    assert httpx.get(url + "/v1/jobs/job-nope").status_code == 404
    methods = {m["name"]: m for m in client.build_methods()}
    assert set(methods) == {"caa", "grains", "pca", "probe"} and "k" in methods["grains"]["params"]["properties"]


def test_sweep_rename_and_gguf(server, client, tiny_lm, tmp_path):
    url, _ = server
    job = client.build_vector("caa-1", EXAMPLES, method="caa", params={"layers": [1, 2, 3]})
    assert client.wait(job["id"], poll=0.02)["status"] == "succeeded"
    sw = client.wait(client.sweep_vector("caa-1", EXAMPLES, scales=[1.0], layers=[2])["id"], poll=0.02)
    assert sw["status"] == "succeeded" and len(sw["result"]["table"]) == 1
    bad = httpx.post(url + "/v1/steering/vectors/caa-1/sweep", json={"examples": EXAMPLES, "sweep": {"layers": [0]}})
    assert bad.status_code == 400 and "no values for layers [0]" in bad.json()["error"]["message"]
    client.rename_vector("caa-1", "caa-2")
    assert httpx.get(url + "/v1/steering/vectors/caa-1").status_code == 404
    dropped = client.export_gguf("caa-2", tmp_path / "c.gguf", scale=3)
    assert dropped == []
    up = client.upload_vector_file("from-gguf", tmp_path / "c.gguf")
    assert up["layers"] == [1, 2, 3] and up["metadata"]["source"] == "gguf"
    assert up["norms"]["2"] == pytest.approx(3.0, rel=1e-5)
    r = httpx.post(url + "/v1/steering/vectors/caa-2/rename", json={"new_name": "from-gguf"})
    assert r.status_code == 409
    garbage = httpx.post(url + "/v1/steering/vectors", data={"name": "junk"},
                         files={"file": ("x.gguf", b"GGUF\x03\x00\x00\x00garbage", "application/octet-stream")})
    err = garbage.json()["error"]
    assert garbage.status_code == 400 and err["param"] == "file" and "x.gguf" in err["message"]
    assert "/tmp" not in err["message"]


def test_concurrent_builds_all_finish(server, client):
    jobs = [client.build_vector(f"par-{i}", EXAMPLES, method=m, overwrite=True)
            for i, m in enumerate(["caa", "pca", "probe", "grains"])]
    results = {}

    def wait(j):
        results[j["id"]] = client.wait(j["id"], poll=0.02, timeout=120)["status"]

    threads = [threading.Thread(target=wait, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results.values()) == {"succeeded"}
    assert {f"par-{i}" for i in range(4)} <= {v["name"] for v in client.list_vectors()}


def test_sweep_under_a_fluency_budget_saves_the_setting_that_requests_without_a_scale_use(server, client,
                                                                                           model_name):
    url, _ = server
    assert client.wait(client.build_vector("caa-set", EXAMPLES, method="caa", params={"layers": [1, 2, 3]})["id"],
                       poll=0.02)["status"] == "succeeded"
    body = {"examples": EXAMPLES, "save": True,
            "sweep": {"scales": [0.25, 8.0], "layers": [1], "layer_ranges": [[2, 3]], "metric": "margin",
                      "positions": ["all", "generated"], "fluency": {"prompts": 3, "max_tokens": 6, "budget": 1.2}}}
    r = httpx.post(url + "/v1/steering/vectors/caa-set/sweep", json=body)
    assert r.status_code == 202, r.text
    done = client.wait(r.json()["id"], poll=0.02)
    assert done["status"] == "succeeded", done
    res = done["result"]
    assert len(res["table"]) == 2 * 2 * 2 and res["fluency"]["budget"] == 1.2
    best = res["best"]
    assert best["within_budget"] and res["saved"] is True
    setting = client.get_vector("caa-set")["metadata"]["setting"]
    assert (setting["layers"], setting["scale"], setting["positions"]) == (best["layers"], best["scale"],
                                                                          best["positions"])
    chat = {"model": model_name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
            "temperature": 0}
    named = httpx.post(url + "/v1/chat/completions", json={**chat, "steering": {"vectors": [{"name": "caa-set"}]}})
    assert named.status_code == 200, named.text
    applied = named.json()["steering"]
    assert [(a["layers"], a["scale"], a["positions"]) for a in applied] == [
        ([x], pytest.approx(s, rel=1e-5), best["positions"]) for x, s in zip(best["layers"], best["scale_abs"])]
    explicit = [{"name": "caa-set", "scale": s, "layers": [x], "positions": best["positions"],
                 "normalize": best["normalize"]} for x, s in zip(best["layers"], best["scale_abs"])]
    same = httpx.post(url + "/v1/chat/completions", json={**chat, "steering": {"vectors": explicit}})
    assert same.json()["choices"][0]["message"]["content"] == named.json()["choices"][0]["message"]["content"]
    other = httpx.post(url + "/v1/chat/completions",
                       json={**chat, "steering": {"vectors": [{"name": "caa-set", "layers": [0]}]}})
    assert other.status_code == 400 and "give a scale" in other.json()["error"]["message"]
    bad = httpx.post(url + "/v1/steering/vectors/caa-set/sweep",
                     json={**body, "sweep": {**body["sweep"], "fluency": {"budget": 0.5}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("sweep")


# -- one vector store, whoever writes it: the CLI or another process on the server's directory


def _disk_writer(app, tiny_lm):
    """A second store on the server's directory, as the CLI (``steerserve vectors ...``) or another server
    process opens it."""
    return VectorStore(app.state.steerserve.require().store.root, tiny_lm.info.identity())


def _values(tiny_lm, seed, layers=(1, 2)):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(tiny_lm.hidden_size, generator=g) for layer in layers}


def _listed(url):
    return httpx.get(url + "/v1/steering/vectors").json()["data"]


def test_a_vector_written_by_another_process_is_usable_at_once_and_uploads_do_not_clobber_it(server, tiny_lm):
    url, app = server
    store = app.state.steerserve.require().store
    heard: list[str] = []
    unsubscribe = store.subscribe(heard.append)  # how the vLLM backend hears of vectors (bank.forget)
    try:
        writer = _disk_writer(app, tiny_lm)
        writer.put("from-disk", SteeringVector(_values(tiny_lm, 1), metadata={"source": "cli"}))
        chat = {"model": tiny_lm.name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6,
                "temperature": 0}
        plain = httpx.post(url + "/v1/chat/completions", json=chat)
        steered = httpx.post(url + "/v1/chat/completions", json={
            **chat, "steering": {"vectors": [{"name": "from-disk", "scale": 200, "layers": [1]}]}})
        assert steered.status_code == 200, steered.text
        assert steered.json()["choices"][0]["message"]["content"] != plain.json()["choices"][0]["message"]["content"]
        assert heard == ["from-disk"]
        listed = httpx.get(url + "/v1/steering/vectors").json()
        assert any(v["name"] == "from-disk" and v["metadata"]["source"] == "cli" for v in listed["data"])
        # an upload under that name is refused, in the OpenAI envelope; with overwrite it replaces the file
        body = {"name": "from-disk", "values": {"0": [1.0] * tiny_lm.hidden_size}}
        r = httpx.post(url + "/v1/steering/vectors", json=body)
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["type"] == "conflict_error" and err["param"] == "name" and err["code"] == 409
        assert "already exists" in err["message"] and "overwrite" in err["message"]
        assert writer.get("from-disk").metadata["source"] == "cli"
        r = httpx.post(url + "/v1/steering/vectors", json={**body, "overwrite": True})
        assert r.status_code == 201, r.text
        assert writer.get("from-disk").layers == [0] and writer.get("from-disk").metadata["source"] == "upload"
        # a name only another process knows: no silent overwrite either, even though the server never saw it
        writer.put("unseen", SteeringVector(_values(tiny_lm, 2)))
        r = httpx.post(url + "/v1/steering/vectors", json={**body, "name": "unseen"})
        assert r.status_code == 409 and "another process or the CLI" in r.json()["error"]["message"]
        # replaced on disk: the server reads the new file; deleted on disk: gone (404), listeners told
        writer.put("from-disk", SteeringVector(_values(tiny_lm, 3, layers=(3,))), overwrite=True)
        assert httpx.get(url + "/v1/steering/vectors/from-disk").json()["layers"] == [3]
        (writer.root / "from-disk.safetensors").unlink()
        assert httpx.get(url + "/v1/steering/vectors/from-disk").status_code == 404
        gone = httpx.post(url + "/v1/chat/completions", json={
            **chat, "steering": {"vectors": [{"name": "from-disk", "scale": 2}]}})
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "steering.vectors[0].name"
        assert heard.count("from-disk") >= 3 and "from-disk" not in {v["name"] for v in _listed(url)}
        httpx.delete(url + "/v1/steering/vectors/unseen")
    finally:
        unsubscribe()


def test_a_vector_for_another_model_on_disk_is_listed_as_refused_and_says_why(server, tiny_lm):
    url, app = server
    root = app.state.steerserve.require().store.root
    other = VectorStore(root, ModelIdentity("another-model", tiny_lm.hidden_size, tiny_lm.num_layers, "llama", 9))
    other.put("foreign", SteeringVector(_values(tiny_lm, 4)))
    try:
        r = httpx.get(url + "/v1/steering/vectors/foreign")
        assert r.status_code == 404 and "built for another model" in r.json()["error"]["message"]
        listed = httpx.get(url + "/v1/steering/vectors").json()
        assert "foreign" not in {v["name"] for v in listed["data"]}
        refused = {x["name"]: x for x in listed["refused"]}
        assert refused["foreign"]["file"] == "foreign.safetensors"
        assert "another-model" in refused["foreign"]["reason"]
    finally:
        (root / "foreign.safetensors").unlink()


def test_reload_needs_admin_and_reports_what_changed(make_fake, tmp_path):
    keys = [{"key": "reader", "role": "read"}, {"key": "generator", "role": "generate"},
            {"key": "root", "role": "admin"}]
    with live_server(make_fake(), vector_dir=tmp_path / "vectors", api_keys=keys) as (url, app):
        store = app.state.steerserve.require().store
        heard: list[str] = []
        store.subscribe(heard.append)
        ident = store.model
        hidden, layers = ident.hidden_size, ident.num_layers
        writer = VectorStore(store.root, ident)
        writer.put("kept", SteeringVector({0: torch.ones(hidden)}))
        writer.put("changed", SteeringVector({0: torch.ones(hidden)}))
        writer.put("removed", SteeringVector({0: torch.ones(hidden)}))
        reload = url + "/v1/steering/vectors/reload"
        assert httpx.post(reload).status_code == 401
        for key in ("reader", "generator"):
            r = httpx.post(reload, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        admin = {"Authorization": "Bearer root"}
        first = httpx.post(reload, headers=admin)
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["object"] == "steering.vectors.reload"
        assert (sorted(body["added"]), body["removed"], body["changed"], body["total"]) == (
            ["changed", "kept", "removed"], [], [], 3)
        writer.put("changed", SteeringVector({1: torch.ones(hidden)}), overwrite=True)
        writer.delete("removed")
        writer.put("added", SteeringVector({0: torch.ones(hidden)}))
        VectorStore(store.root, ModelIdentity("elsewhere", hidden, layers)).put(
            "alien", SteeringVector({0: torch.ones(hidden)}))
        heard.clear()
        body = httpx.post(reload, headers=admin).json()
        assert (body["added"], body["removed"], body["changed"], body["total"]) == (
            ["added"], ["removed"], ["changed"], 3)
        assert [(x["file"], x["name"]) for x in body["refused"]] == [("alien.safetensors", "alien")]
        assert "built for another model" in body["refused"][0]["reason"]
        assert sorted(heard) == ["added", "changed", "removed"]
        again = httpx.post(reload, headers=admin).json()
        assert (again["added"], again["removed"], again["changed"]) == ([], [], [])
        # "reload" is an endpoint, not a vector name
        r = httpx.post(url + "/v1/steering/vectors", headers=admin,
                       json={"name": "reload", "values": {"0": [1.0] * hidden}})
        assert r.status_code == 400 and "reserved" in r.json()["error"]["message"]
