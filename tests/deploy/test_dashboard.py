"""The Grafana dashboard against a real Prometheus (Debian's ``prometheus``): it scrapes a live server on the tiny
model every second while a little traffic runs (steered and unsteered requests, streams, a queue-full rejection, an
invalid request, vector builds and attributions), then every PromQL expression of the dashboard (its panels' and
its template variable's) is evaluated through Prometheus' HTTP API and must return data, with Grafana's variables
replaced by concrete values."""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from clients import SteerClient
from tests.live import free_port, live_server, vec_values
from tests.tiny import SENTIMENT
from tests.tools import PROMETHEUS, tool

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "steerserve.json"
GRAFANA_VARIABLES = {"$__interval": "5s", "$model": ".*"}
"""Concrete values for Grafana's variables; ``$__rate_interval`` and ``$__range`` become the time the traffic took
(and a margin), so that every rate sees the traffic however slow the machine is."""


def expressions(node) -> list[str]:
    """Every ``expr`` of the dashboard's targets, in panels and rows."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            found.append(node["expr"])
        for value in node.values():
            found += expressions(value)
    elif isinstance(node, list):
        for value in node:
            found += expressions(value)
    return found


def concrete(expr: str, window: str) -> str:
    variables = {**GRAFANA_VARIABLES, "$__rate_interval": window, "$__range": window}
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


@pytest.fixture
def prometheus(tmp_path):
    """Start Prometheus on a free port with its own storage; yields (its URL, a function that points it at a
    server)."""
    binary = tool("prometheus", PROMETHEUS, "Debian package prometheus", "/usr/bin/prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    procs: list[subprocess.Popen] = []

    def start(target: str) -> str:
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "steerserve", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}]}))
        log = (tmp_path / "prometheus.log").open("w")
        procs.append(subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                      stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert procs[0].poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "Prometheus did not become ready"
            time.sleep(0.2)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "success", (expr, r.text)
    return r.json()["data"]["result"]


def scraped(prom: str) -> None:
    """Wait until Prometheus has scraped the server successfully after now (so what happened before is in a sample
    of its own, however slow a loaded machine makes the scrapes)."""
    from datetime import datetime

    now = time.time()
    deadline = now + 60
    targets: list[dict] = []
    while time.time() < deadline:
        targets = httpx.get(prom + "/api/v1/targets").json()["data"]["activeTargets"]
        for target in targets:  # one (before Prometheus has discovered it: none yet)
            last = datetime.fromisoformat(target["lastScrape"].replace("Z", "+00:00")).timestamp()
            if last > now and target["health"] == "up":
                return
        time.sleep(0.2)
    raise AssertionError(f"no successful scrape within 60 s: {targets}")


def traffic(url: str, prom: str, model: str, lm) -> dict[str, int]:
    """A little of everything the dashboard shows, in rounds that Prometheus scrapes apart; returns what it
    provoked."""
    seen = {"queue_full": 0, "invalid": 0}
    with SteerClient(url) as client:
        client.upload_vector("dash-a", vec_values(lm, 1))
        inline = {"values": {"1": vec_values(lm, 2, [1])[1]}, "scale": 2.0}
        for round_ in range(3):
            for steering in (None, [{"name": "dash-a", "scale": 3.0, "normalize": True}], [inline]):
                body = {"model": model, "messages": [{"role": "user", "content": f"Hello {round_}"}],
                        "max_tokens": 6, "temperature": 0, "stream": round_ % 2 == 0}
                if steering is not None:
                    body["steering"] = {"vectors": steering}
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                    assert r.status_code == 200
                    r.read()
            bad = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "x", "steering": {
                "vectors": [{"name": "dash-a", "scale": 1.0, "layers": [99]}]}})
            seen["invalid"] += bad.status_code == 400
            job = client.build_vector(f"dash-built-{round_}", [e.__dict__ for e in SENTIMENT], method="caa")
            assert client.wait(job["id"], poll=0.05)["status"] == "succeeded"
            r = httpx.post(url + "/v1/attributions", json={"prompt": "The quick brown fox", "target": " jumps",
                                                          "method": "saliency"}, timeout=60)
            assert r.status_code == 200, r.text
            scraped(prom)  # each round's increments in a sample of their own: every rate sees them
        # a burst the one-slot, one-place queue cannot hold: some are refused with 503
        statuses: list[int] = []

        def one() -> None:
            statuses.append(httpx.post(url + "/v1/completions", json={
                "model": model, "prompt": "Numbers: 1 2 3", "max_tokens": 32, "ignore_eos": True},
                timeout=60).status_code)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seen["queue_full"] = statuses.count(503)
        assert set(statuses) <= {200, 503}
        scraped(prom)
    return seen


def test_every_dashboard_expression_returns_data_from_a_real_prometheus(prometheus, make_engine, tiny_lm, tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard["panels"])
    assert len(exprs) >= 20
    engine = make_engine(max_batch_size=1, max_queue_size=1)
    with live_server(engine, vector_dir=tmp_path / "vectors") as (url, _):
        prom = prometheus(url.removeprefix("http://"))
        t0 = time.monotonic()
        seen = traffic(url, prom, tiny_lm.name, tiny_lm)
        assert seen["queue_full"] >= 1 and seen["invalid"] == 3
        scraped(prom)
        window = f"{int(time.monotonic() - t0) + 10}s"
        empty, not_finite = [], []
        for expr in exprs:
            result = query(prom, concrete(expr, window))
            values = [float(s["value"][1]) for s in result]
            if not result:
                empty.append(expr)
            elif not any(math.isfinite(v) for v in values):
                not_finite.append((expr, values))
        scrapes = query(prom, f"count_over_time(up[{window}])"), query(prom, f"sum_over_time(up[{window}])")
        assert not empty and not not_finite, {"no data": empty, "no finite value": not_finite, "scrapes, up": scrapes}
        print(f"{len(exprs)} expressions returned data (rate window {window})")
        # the template variable's query: Grafana's label_values(metric, label)
        for var in dashboard["templating"]["list"]:
            definition = var.get("definition", "")
            m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", definition)
            if var["type"] == "query":
                assert m, definition
                r = httpx.get(prom + f"/api/v1/label/{m[2]}/values", params={"match[]": m[1]})
                assert r.json()["data"] == [tiny_lm.name]
        # the steering telemetry in particular: per vector, per layer
        change = query(prom, 'sum by (vector) (steerserve_steering_relative_change_count)')
        assert {s["metric"]["vector"] for s in change} == {"dash-a", "inline"}
        layers = query(prom, "sum by (layer) (steerserve_steered_tokens_total)")
        assert {s["metric"]["layer"] for s in layers} == {str(i) for i in range(tiny_lm.num_layers)}


def test_the_dashboard_uses_only_metrics_the_server_exports():
    """Every metric name in the dashboard is one the server's registry defines (no typo survives to production)."""
    from server.metrics import Metrics

    registry = Metrics("m").registry
    names = set()
    for metric in registry.collect():
        names.add(metric.name)
        names.update(s.name for s in metric.samples)
    names |= {f"{n}_total" for n in names} | {f"{n}_{suffix}" for n in names for suffix in ("bucket", "sum", "count")}
    used = set()
    for expr in expressions(json.loads(DASHBOARD.read_text())["panels"]):
        used |= set(re.findall(r"\b((?:steerserve|process|python)_[a-z_]+)\b", expr))
    assert used and used <= names, used - names
