"""Run the real app under uvicorn on 127.0.0.1 in a background thread (real HTTP, real sockets), and read its
metrics."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.run import build_server
from server.settings import ServerSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(engine=None, server_out: list | None = None, **settings):
    """Serve ``create_app(settings, engine)`` as production does (:func:`server.run.build_server`); yields (url, app).
    ``server_out`` receives the uvicorn server (to signal it)."""
    port = free_port()
    cfg = ServerSettings(**{"host": "127.0.0.1", "port": port, "log_level": "warning", **settings})
    app = create_app(cfg, backend=engine)
    server = build_server(app, cfg)
    if server_out is not None:
        server_out.append(server)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)


def vec_values(lm, seed, layers=None) -> dict[int, list[float]]:
    """A random vector's values as JSON lists, for request bodies."""
    g = torch.Generator().manual_seed(seed)
    return {l: torch.randn(lm.hidden_size, generator=g).tolist() for l in (layers or range(lm.num_layers))}


def metrics(url: str) -> dict[str, float]:
    """The server's /metrics samples, keyed by name and labels (without model_name)."""
    text = httpx.get(url + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + json.dumps({k: v for k, v in sorted(s.labels.items()) if k != "model_name"})
            out[key] = s.value
    return out


def m(values: dict, name: str, **labels) -> float:
    return values.get(name + json.dumps(dict(sorted(labels.items()))), 0.0)
