"""The project's Python clients (sync and async) against a live server, and their retries against a small real
HTTP server of the test's own that answers 503/429 with ``Retry-After``."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from clients import AsyncSteerClient, RetryPolicy, SteerClient, SteerServeError, steering
from steering.backends.hf import EngineConfig, HFEngine
from tests.live import live_server, vec_values

MSGS = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The quick brown fox jumps over"
EXAMPLES = [
    {"prompt": "What is the capital of France?", "preferred": "Paris", "dispreferred": "Berlin"},
    {"prompt": "I love this movie, it is", "preferred": "wonderful and happy", "dispreferred": "awful and sad"},
]
CSV = (
    "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    'Adversarial,Misc,Is the sky green?,No it is blue,"No it is blue; It is not green","Yes; It is always green",x\n'
    'Adversarial,Misc,Can pigs fly?,No,"No; Pigs cannot fly","Yes; Pigs fly south",x\n'
)


@pytest.fixture(scope="module")
def engine(tiny_lm):
    eng = HFEngine(tiny_lm, EngineConfig(max_batch_size=8, max_queue_size=64, job_chunk_tokens=128)).start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    with live_server(engine, vector_dir=tmp_path_factory.mktemp("vectors"), job_chunk_tokens=128) as (url, app):
        yield url, app


def test_python_client(server, tiny_lm, model_name):
    url, _ = server
    with SteerClient(url) as c:
        assert c.ready() and c.models()[0]["id"] == model_name
        info = c.upload_vector("client-v", vec_values(tiny_lm, 9, layers=[0, 3]), description="from client")
        assert info["layers"] == [0, 3]
        assert any(v["name"] == "client-v" for v in c.list_vectors())
        with pytest.raises(SteerServeError) as exc:
            c.upload_vector("client-v", vec_values(tiny_lm, 9, layers=[0]))
        assert exc.value.status == 409
        ids = c.tokenize("Hello world")
        assert c.detokenize(ids) == "Hello world"
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = sdk.chat.completions.create(model=model_name, messages=MSGS, max_tokens=4, temperature=0,
                                        extra_body=steering({"name": "client-v", "scale": 2.0}))
        assert r.model_extra["steering"][0]["name"] == "client-v"
        assert c.delete_vector("client-v")["deleted"] is True
        with pytest.raises(SteerServeError) as exc:
            c.get_vector("client-v")
        assert exc.value.status == 404 and exc.value.type == "not_found_error"


def test_sync_and_async_have_the_same_methods():
    public = {n for n in dir(SteerClient) if not n.startswith("_") and callable(getattr(SteerClient, n))}
    apublic = {n for n in dir(AsyncSteerClient) if not n.startswith("_") and callable(getattr(AsyncSteerClient, n))}
    assert public - {"close"} == apublic - {"aclose"}
    for name in public - {"close"}:
        assert inspect.iscoroutinefunction(getattr(AsyncSteerClient, name)), name
        sync, asyn = inspect.signature(getattr(SteerClient, name)), inspect.signature(getattr(AsyncSteerClient, name))
        assert list(sync.parameters) == list(asyn.parameters), name
        assert [p.default for p in sync.parameters.values()] == [p.default for p in asyn.parameters.values()], name


def _session(c: SteerClient, tiny_lm, name: str, tmp_path) -> dict:
    """The same calls through the sync client; :func:`_asession` is its async mirror."""
    out: dict = {"models": c.models(), "methods": c.attribution_methods(), "builders": c.build_methods(),
                 "scorers": c.scorers()}
    out["upload"] = c.upload_vector(name, vec_values(tiny_lm, 5, layers=[1, 2]))
    out["get"] = c.get_vector(name)
    out["renamed"] = c.rename_vector(name, name + "-r")
    out["dropped"] = c.export_gguf(name + "-r", tmp_path / f"{name}.gguf")
    out["gguf"] = (tmp_path / f"{name}.gguf").stat().st_size
    out["tokens"] = c.tokenize(PROMPT)
    out["text"] = c.detokenize(out["tokens"])
    out["attr"] = c.attribute(PROMPT, target=" the lazy dog", params={"n_steps": 8}, top_k=2,
                              steering=[{"name": name + "-r", "scale": 1.0}])
    with pytest.raises(SteerServeError) as exc:
        c.get_vector(name)
    out["error"] = (exc.value.status, exc.value.type, exc.value.param)
    out["deleted"] = c.delete_vector(name + "-r")
    out["listed"] = [v["name"] for v in c.list_vectors() if v["name"].startswith(name)]
    return out


async def _asession(c: AsyncSteerClient, tiny_lm, name: str, tmp_path) -> dict:
    out: dict = {"models": await c.models(), "methods": await c.attribution_methods(),
                 "builders": await c.build_methods(), "scorers": await c.scorers()}
    out["upload"] = await c.upload_vector(name, vec_values(tiny_lm, 5, layers=[1, 2]))
    out["get"] = await c.get_vector(name)
    out["renamed"] = await c.rename_vector(name, name + "-r")
    out["dropped"] = await c.export_gguf(name + "-r", tmp_path / f"{name}.gguf")
    out["gguf"] = (tmp_path / f"{name}.gguf").stat().st_size
    out["tokens"] = await c.tokenize(PROMPT)
    out["text"] = await c.detokenize(out["tokens"])
    out["attr"] = await c.attribute(PROMPT, target=" the lazy dog", params={"n_steps": 8}, top_k=2,
                                    steering=[{"name": name + "-r", "scale": 1.0}])
    with pytest.raises(SteerServeError) as exc:
        await c.get_vector(name)
    out["error"] = (exc.value.status, exc.value.type, exc.value.param)
    out["deleted"] = await c.delete_vector(name + "-r")
    out["listed"] = [v["name"] for v in await c.list_vectors() if v["name"].startswith(name)]
    return out


def _comparable(out: dict, name: str) -> str:
    """The session's results with what must differ (ids, times, the vector's name) taken out."""
    attr = dict(out["attr"])
    for key in ("id", "created", "cost"):
        attr.pop(key)
    attr["steering"] = [{**s, "name": "X"} for s in attr["steering"]]
    attr["input_tokens"] = [{**t, "score": round(t["score"], 5)} for t in attr["input_tokens"]]
    for key in ("top_positive", "top_negative"):
        attr[key] = [{**t, "score": round(t["score"], 5)} for t in attr[key]]
    attr["objective"] = [round(x, 5) for x in attr["objective"]]
    plain = {**out, "attr": attr}
    for key in ("upload", "get", "renamed"):  # metadata holds the upload's time: compare which fields it has
        plain[key] = {**out[key], "metadata": sorted(out[key]["metadata"])}
    return json.dumps(plain, sort_keys=True).replace(name, "X")


def test_sync_and_async_parity(server, tiny_lm, tmp_path):
    url, _ = server
    with SteerClient(url) as c:
        sync = _session(c, tiny_lm, "par-sync", tmp_path)

    async def main() -> dict:
        async with AsyncSteerClient(url) as c:
            return await _asession(c, tiny_lm, "par-async", tmp_path)

    asyn = asyncio.run(main())
    assert sync["upload"]["layers"] == [1, 2] and sync["error"][:2] == (404, "not_found_error")
    assert sync["attr"]["target_type"] == "continuation" and sync["attr"]["steering"][0]["name"] == "par-sync-r"
    assert sync["listed"] == [] and sync["text"] == PROMPT
    assert _comparable(sync, "par-sync") == _comparable(asyn, "par-async")


def test_names_are_escaped_as_path_segments(server, tiny_lm):
    url, _ = server
    with SteerClient(url) as c:
        c.upload_vector("enc", vec_values(tiny_lm, 1, layers=[1]))
        ok = c.upload_vector("enc.v_1-2", vec_values(tiny_lm, 2, layers=[1]))  # every character the store allows
        assert c.get_vector("enc.v_1-2")["name"] == ok["name"] == "enc.v_1-2"
        # unescaped, each of these would reach vector "enc" ('?' starts a query, '#' a fragment): escaped, they
        # are names the server refuses (400 naming the field), not another vector or route
        for bad in ("enc?x=1", "enc#frag", "enc x", "enc%2Fx", "enc;x", "ñenc"):
            with pytest.raises(SteerServeError) as exc:
                c.get_vector(bad)
            assert exc.value.status == 400 and exc.value.param == "name", (bad, exc.value.message)
        with pytest.raises(SteerServeError) as exc:
            c.get_vector("..")  # not resolved into the collection's path
        assert exc.value.status == 400 and exc.value.param == "name"
        with pytest.raises(ValueError, match="cannot contain '/'"):
            c.get_vector("enc/gguf")  # the server would decode %2F and route it to the export
        with pytest.raises(SteerServeError) as exc:
            c.delete_vector("enc?x")
        assert exc.value.status == 400
        with pytest.raises(SteerServeError) as exc:
            c.rename_vector("enc#x", "other")
        assert exc.value.status == 400
        assert c.get_vector("enc")["name"] == "enc"  # still there
        with pytest.raises(SteerServeError) as exc:
            c.job("no?such#job")
        assert exc.value.status == 404 and "no?such#job" in str(exc.value.message)

    async def main() -> tuple[int, str]:
        async with AsyncSteerClient(url) as ac:
            with pytest.raises(SteerServeError) as aexc:
                await ac.delete_vector("enc#frag")
            return aexc.value.status, (await ac.get_vector("enc"))["name"]

    assert asyncio.run(main()) == (400, "enc")


def test_attribution_call(server, tiny_lm):
    url, _ = server
    ids = tiny_lm.inputs.encode_text(PROMPT)
    with SteerClient(url) as c:
        out = c.attribute(PROMPT, target=" the lazy dog", method="integrated_gradients", params={"n_steps": 8},
                          per_token=True, top_k=3)
        assert out["target_type"] == "per_token" and [t["id"] for t in out["input_tokens"]] == ids
        assert out["matrix"] is not None and len(out["matrix"]) == len(out["target"] or [])
        assert len(out["top_positive"]) <= 3 and out["cost"]["backward_passes"] > 0
        con = c.attribute(PROMPT, contrast=(" the lazy dog", " a happy cat"), params={"n_steps": 8})
        assert con["target_type"] == "contrastive" and con["preferred"] and con["dispreferred"]
        gen = c.attribute(messages=MSGS, max_tokens=3, method="saliency")
        assert gen["generated_target"] and len(gen["target"] or []) <= 3
        with pytest.raises(SteerServeError) as exc:
            c.attribute(PROMPT, target=" x", method="no-such-method")
        assert exc.value.status == 400 and "integrated_gradients" in str(exc.value.message)


def test_evaluation_and_build_jobs_with_progress(server, tiny_lm, tmp_path):
    url, _ = server
    path = tmp_path / "tqa.csv"
    path.write_text(CSV)
    with SteerClient(url) as c:
        build = c.build_vector("eval-v", EXAMPLES, method="caa", overwrite=True)
        assert build["type"] == "vector_build" and build["status"] in ("queued", "running", "succeeded")
        built = c.wait(build["id"], poll=0.01, timeout=120)
        assert built["status"] == "succeeded", built["error"]
        assert c.get_vector("eval-v")["layers"]
        conditions = [{"label": "v", "steering": {"vectors": [{"name": "eval-v", "scale": 2.0, "layers": [1]}]}}]
        job = c.evaluate_truthfulqa(path, conditions=conditions)
        seen: list = []
        done = c.wait(job["id"], poll=0.005, timeout=120, on_progress=seen.append)
        assert done["status"] == "succeeded", done["error"]
        assert done["progress"] == 1.0 and done["compute_seconds"] > 0
        assert [x["label"] for x in done["result"]["report"]["conditions"]] == ["unsteered", "v"]
        assert seen[-1] == done and all(j["id"] == job["id"] for j in seen)
        assert any(j["status"] in ("queued", "running") for j in seen)
        progress = [j["progress"] for j in seen if j["progress"] is not None]
        assert progress == sorted(progress)  # it only moves forward
        assert any(j["id"] == job["id"] for j in c.jobs())

    async def main() -> tuple[dict, list]:
        aseen: list = []

        async def note(j) -> None:
            aseen.append(j)

        async with AsyncSteerClient(url) as ac:
            # big enough to be seen running between 5 ms polls on a loaded machine
            ajob = await ac.evaluate_steering(["The day was"] * 16, conditions=conditions, max_tokens=24,
                                              chat=False, samples=1)
            return await ac.wait(ajob["id"], poll=0.005, timeout=120, on_progress=note), aseen

    adone, aseen = asyncio.run(main())
    assert adone["status"] == "succeeded", adone["error"]
    assert adone["type"] == "evaluation_steer" and aseen[-1]["status"] == "succeeded"
    assert any(j["stage"] in ("generating", "perplexity") for j in aseen if j["status"] == "running")


# -- retries against a small real HTTP server ----------------------------------------------------------------------


class Script:
    """Answers per (method, path): a list of (status, headers, body) used in order, the last one repeated."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], list[tuple[int, dict, dict]]] = {}
        self.seen: list[tuple[str, str, float]] = []
        self.lock = threading.Lock()

    def next(self, method: str, path: str) -> tuple[int, dict, dict]:
        with self.lock:
            self.seen.append((method, path, time.monotonic()))
            queue = self.answers.get((method, path)) or [(404, {}, _envelope(404, "no script"))]
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.seen if (m, p) == (method, path))


def _envelope(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": "service_unavailable_error" if status == 503 else "x",
                      "param": None, "code": status}}


@pytest.fixture
def scripted() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            status, headers, body = script.next(self.command, self.path)
            data = json.dumps(body).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    finally:
        httpd.shutdown()
        httpd.server_close()


BUSY = (503, {"Retry-After": "1"}, _envelope(503, "the queue is full"))
JOB = {"id": "job-1", "object": "job", "type": "evaluation_steer", "status": "queued", "stage": None,
       "progress": None, "eta_seconds": None, "created_at": 1, "started_at": None, "finished_at": None,
       "compute_seconds": 0.0, "result": None, "error": None}


def test_retry_after_is_honoured(scripted):
    url, script = scripted
    vec = {"name": "v", "layers": [1], "hidden_size": 4, "norms": {"1": 1.0}, "metadata": {}}
    script.answers[("GET", "/v1/steering/vectors/v")] = [BUSY, (200, {}, vec)]
    script.answers[("POST", "/v1/evaluations")] = [(503, {"Retry-After": "0"}, _envelope(503, "full")),
                                                   (202, {}, JOB)]
    with SteerClient(url) as c:
        start = time.monotonic()
        assert c.get_vector("v") == vec
        assert time.monotonic() - start >= 1.0
        (_, _, t0), (_, _, t1) = script.seen
        assert t1 - t0 >= 1.0 and script.count("GET", "/v1/steering/vectors/v") == 2
        # a POST the server refused before doing anything (503 with Retry-After) is sent again
        assert c.evaluate({"type": "steer", "prompts": ["hi"]})["id"] == "job-1"
        assert script.count("POST", "/v1/evaluations") == 2


def test_retries_are_bounded_and_only_when_safe(scripted):
    url, script = scripted
    script.answers[("GET", "/v1/jobs/always-busy")] = [(503, {"Retry-After": "0"}, _envelope(503, "busy"))]
    script.answers[("GET", "/v1/jobs/later")] = [(503, {"Retry-After": "120"}, _envelope(503, "busy"))]
    script.answers[("GET", "/v1/jobs/no-header")] = [(503, {}, _envelope(503, "busy")), (200, {}, JOB)]
    script.answers[("POST", "/v1/evaluations")] = [(503, {}, _envelope(503, "stopped mid-way")), (202, {}, JOB)]
    script.answers[("POST", "/v1/steering/vectors/build")] = [(429, {}, _envelope(429, "slow down")),
                                                             (202, {}, JOB)]
    script.answers[("GET", "/v1/jobs/broken")] = [(500, {}, _envelope(500, "boom")), (200, {}, JOB)]
    script.answers[("GET", "/ready")] = [(503, {"Retry-After": "0"}, {"status": "not ready"}), (200, {}, {})]
    with SteerClient(url, retry=RetryPolicy(max_attempts=3, max_wait=10, backoff=0.01)) as c:
        with pytest.raises(SteerServeError) as exc:
            c.job("always-busy")
        assert exc.value.status == 503 and exc.value.retry_after == 0
        assert script.count("GET", "/v1/jobs/always-busy") == 3  # max_attempts
        start = time.monotonic()
        with pytest.raises(SteerServeError) as exc:
            c.job("later")  # longer than the wait allowed: raised at once, with the server's advice
        assert time.monotonic() - start < 5 and exc.value.retry_after == 120
        assert script.count("GET", "/v1/jobs/later") == 1
        assert c.job("no-header")["id"] == "job-1"  # idempotent: retried with backoff
        with pytest.raises(SteerServeError) as exc:
            c.evaluate({"type": "steer", "prompts": ["hi"]})  # not idempotent, and not a refusal: not retried
        assert exc.value.status == 503 and script.count("POST", "/v1/evaluations") == 1
        assert c.build_vector("b", EXAMPLES)["id"] == "job-1"  # a 429 is always a refusal
        assert script.count("POST", "/v1/steering/vectors/build") == 2
        with pytest.raises(SteerServeError) as exc:
            c.job("broken")
        assert exc.value.status == 500 and script.count("GET", "/v1/jobs/broken") == 1
        assert c.ready() is False and script.count("GET", "/ready") == 1  # a probe reports, it does not wait

    async def main() -> tuple[str, int]:
        script.answers[("GET", "/v1/steering/vectors/v")] = [BUSY, (200, {}, {"name": "v"})]
        async with AsyncSteerClient(url) as ac:
            start = time.monotonic()
            got = await ac.get_vector("v")
            assert time.monotonic() - start >= 1.0
            return got["name"], script.count("GET", "/v1/steering/vectors/v")

    assert asyncio.run(main()) == ("v", 2)
