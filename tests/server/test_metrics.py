"""``/metrics`` after real requests, read with prometheus_client's text parser: steered requests counted once per
request and vector, every refusal counted once by a fixed reason, HTTP requests by route template, process
metrics."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import FAILURE_REASONS
from tests.live import live_server, m, metrics, vec_values

FAILURES = "steerserve_request_failure_total"
HTTP = "steerserve_http_requests_total"
STEERED = "steerserve_steered_requests_total"


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return m(after, name, **labels) - m(before, name, **labels)


def failure_deltas(before: dict, after: dict) -> dict[str, float]:
    out = {r: delta(before, after, FAILURES, reason=r) for r in FAILURE_REASONS}
    return {r: d for r, d in out.items() if d}


@pytest.fixture(scope="module")
def vectors(server, tiny_lm):
    url, _ = server
    for name, seed in (("met-a", 1), ("met-b", 2)):
        r = httpx.post(url + "/v1/steering/vectors", json={"name": name, "values": vec_values(tiny_lm, seed)})
        assert r.status_code == 201, r.text
    return url


def complete(url: str, model: str, steering: list[dict] | None, **kw) -> httpx.Response:
    body = {"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0, **kw}
    if steering is not None:
        body["steering"] = {"vectors": steering}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def test_steered_counts_requests_not_choices_or_entries(vectors, model_name, tiny_lm):
    url = vectors
    before = metrics(url)
    # n=2, met-a listed twice, met-b at scale 0: met-a counts once, met-b not at all
    r = complete(url, model_name, [{"name": "met-a", "scale": 2.0}, {"name": "met-a", "scale": 1.0, "layers": [1]},
                                   {"name": "met-b", "scale": 0.0}], n=2, temperature=1.0, seed=1)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2
    after = metrics(url)
    assert delta(before, after, STEERED, vector="met-a") == 1
    assert delta(before, after, STEERED, vector="met-b") == 0
    # only scale 0: not steered at all
    assert complete(url, model_name, [{"name": "met-b", "scale": 0.0}]).status_code == 200
    # two inline vectors: one request steered by inline vectors
    inline = [{"values": {"1": vec_values(tiny_lm, 3, [1])[1]}, "scale": 1.0},
              {"values": {"2": vec_values(tiny_lm, 4, [2])[2]}, "scale": 1.0}]
    assert complete(url, model_name, inline).status_code == 200
    again = metrics(url)
    assert delta(after, again, STEERED, vector="met-b") == 0
    assert delta(after, again, STEERED, vector="met-a") == 0
    assert delta(after, again, STEERED, vector="inline") == 1
    # the success counter still counts every choice
    assert delta(before, after, "steerserve_request_success_total", finished_reason="length") == 2


@pytest.mark.parametrize("call, reason", [
    (lambda url, model: complete(url, model, None, max_tokens=-1), "invalid_request"),  # schema validation
    (lambda url, model: complete(url, model, [{"name": "met-a", "scale": 1.0, "layers": [99]}]),
     "invalid_request"),  # a core InvalidRequestError
    (lambda url, model: httpx.get(url + "/v1/steering/vectors/met-missing"), "not_found"),
    (lambda url, model: complete(url, "no-such-model", None), "not_found"),
    (lambda url, model: complete(url, model, [{"name": "met-missing", "scale": 1.0}]), "not_found"),
    (lambda url, model: httpx.get(url + "/v1/no/such/route"), "not_found"),
    (lambda url, model: httpx.post(url + "/v1/steering/vectors", json={"name": "met-a", "values": {"0": [0.0]}}),
     "invalid_request"),
    (lambda url, model: httpx.put(url + "/v1/models"), "method_not_allowed"),
])
def test_each_refusal_counts_once_with_its_reason(vectors, model_name, call, reason):
    url = vectors
    before = metrics(url)
    r = call(url, model_name)
    assert 400 <= r.status_code < 500, r.text
    assert failure_deltas(before, metrics(url)) == {reason: 1}


def test_auth_and_body_limit_refusals(make_fake, tmp_path):
    with live_server(make_fake(), vector_dir=tmp_path, api_keys=[{"key": "reader", "role": "read"}],
                     max_body_bytes=1024) as (url, _):
        def scrape() -> dict:
            text = httpx.get(url + "/metrics", headers={"Authorization": "Bearer reader"}).text
            return metrics_from(text)

        before = scrape()
        assert httpx.get(url + "/v1/models").status_code == 401
        after = scrape()
        assert failure_deltas(before, after) == {"unauthenticated": 1}
        r = httpx.post(url + "/v1/steering/vectors", headers={"Authorization": "Bearer reader"},
                       json={"name": "x", "values": {"0": [0.0]}})
        assert r.status_code == 403
        again = scrape()
        assert failure_deltas(after, again) == {"forbidden": 1}
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer reader"},
                       content=b"{" + b" " * 4096 + b"}", timeout=30)
        assert r.status_code == 413
        last = scrape()
        assert failure_deltas(again, last) == {"too_large": 1}
        # answered by the body limit before routing: still labelled with the route's template
        assert delta(again, last, HTTP, method="POST", route="/v1/completions", status="413") == 1
        assert delta(before, after, HTTP, method="GET", route="/v1/models", status="401") == 1


def metrics_from(text: str) -> dict[str, float]:
    """As :func:`tests.live.metrics`, from a scrape made with a key."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name + json.dumps({k: v for k, v in sorted(s.labels.items()) if k != "model_name"})] = s.value
    return out


def test_http_requests_by_route_template(vectors, model_name):
    url = vectors
    before = metrics(url)
    for _ in range(2):
        assert httpx.get(url + "/v1/steering/vectors/met-a").status_code == 200
    assert httpx.get(url + "/v1/steering/vectors/met-b").status_code == 200
    assert httpx.get(url + "/v1/steering/vectors/met-nope").status_code == 404
    assert httpx.get(url + "/v1/nowhere/at-all").status_code == 404
    # a stream passes through the middleware untouched and is counted once, when it ends
    body = {"model": model_name, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        frames = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]" and len(frames) >= 3
    after = metrics(url)
    route = "/v1/steering/vectors/{name}"
    assert delta(before, after, HTTP, method="GET", route=route, status="200") == 3
    assert delta(before, after, HTTP, method="GET", route=route, status="404") == 1
    assert delta(before, after, HTTP, method="GET", route="unmatched", status="404") == 1
    assert delta(before, after, HTTP, method="POST", route="/v1/completions", status="200") == 1
    assert delta(before, after, "steerserve_http_request_duration_seconds_count", method="GET", route=route) == 4
    assert delta(before, after, "steerserve_http_request_duration_seconds_count", method="POST",
                 route="/v1/completions") == 1
    routes = {k for k in after if k.startswith(HTTP)}
    assert not any("met-a" in k or "nowhere" in k for k in routes), routes


def test_process_metrics_are_exported(server):
    url, _ = server
    names = {f.name for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "process_start_time_seconds",
            "python_info"} <= names
    values = metrics(url)
    assert m(values, "process_resident_memory_bytes") > 0


def test_steering_telemetry_per_vector_and_per_layer(vectors, model_name, tiny_lm, engine):
    """A steered request's mean relative change is observed under each vector it applied (inline ones as
    'inline'), and its steered tokens are counted per layer: the values the engine measured for it."""
    from steering.sampling import SamplingParams
    from steering.spec import SteeringApplication, SteeringSpec

    url = vectors
    inline = vec_values(tiny_lm, 7, [2])
    steering = [{"name": "met-a", "scale": 2.0, "layers": [1, 3], "normalize": True},
                {"values": {"2": inline[2]}, "scale": 1.5}]
    before = metrics(url)
    r = complete(url, model_name, steering, max_tokens=4, ignore_eos=True)
    assert r.status_code == 200, r.text
    assert complete(url, model_name, None).status_code == 200  # unsteered: measures nothing
    after = metrics(url)
    # the same request straight on the engine: its telemetry is what the server observed
    from steering.vectors import SteeringVector

    prompt = tiny_lm.inputs.encode_text("Hello")
    spec = SteeringSpec([SteeringApplication("met-a", 2.0, layers=[1, 3], normalize=True),
                         SteeringApplication(SteeringVector({2: torch.tensor(inline[2])}), 1.5)])
    tel = engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                          spec).steering_telemetry
    assert tel is not None and tel.layer_tokens == {1: len(prompt) + 3, 2: len(prompt) + 3, 3: len(prompt) + 3}
    change = "steerserve_steering_relative_change"
    for vector in ("met-a", "inline"):
        assert delta(before, after, change + "_count", vector=vector) == 1
        assert delta(before, after, change + "_sum", vector=vector) == pytest.approx(tel.relative_change, rel=1e-5)
    assert delta(before, after, change + "_count", vector="met-b") == 0
    for layer, n in tel.layer_tokens.items():
        assert delta(before, after, "steerserve_steered_tokens_total", layer=str(layer)) == n
    assert delta(before, after, "steerserve_steered_tokens_total", layer="0") == 0
