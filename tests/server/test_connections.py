"""Slow and idle clients cannot pin connections; open connections are bounded; SIGTERM drains as a load balancer
needs (``/ready`` 503 while the listener stays open; running streams finish or end with an error and [DONE])."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.live import live_server


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection within ``seconds`` (reading whatever it still sends)."""
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            if s.recv(4096) == b"":
                return True
    except TimeoutError:
        pass
    return False


@pytest.fixture
def fake(make_fake):
    return make_fake(max_running=4, max_waiting=8)


def test_headers_must_arrive_in_time_and_idle_connections_close(fake, tmp_path):
    with live_server(fake, vector_dir=tmp_path, header_timeout_seconds=0.5, keep_alive_seconds=1) as (url, _):
        silent = connect(url)
        t0 = time.monotonic()
        assert closed_within(silent, 5) and time.monotonic() - t0 < 3
        slow = connect(url)
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        assert closed_within(slow, 5)
        idle = connect(url)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in idle.recv(4096)
        t0 = time.monotonic()
        assert closed_within(idle, 5) and time.monotonic() - t0 < 3  # keep-alive of 1 s
        assert httpx.get(url + "/health").status_code == 200


def test_open_connections_are_bounded(fake, tmp_path):
    with live_server(fake, vector_dir=tmp_path, max_connections=3, header_timeout_seconds=30) as (url, _):
        held = [connect(url) for _ in range(3)]
        time.sleep(0.2)
        r = httpx.get(url + "/health")
        assert r.status_code == 503
        for s in held:
            s.close()
        time.sleep(0.3)
        assert httpx.get(url + "/health").status_code == 200


def stream_lines(url: str, body: dict, out: list) -> None:
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line:
                out.append(line)


def test_sigterm_drains_then_stops_what_is_still_running(make_fake, tmp_path):
    fake = make_fake(max_running=4, max_waiting=8, step_seconds=0.02)
    servers: list = []
    with live_server(fake, server_out=servers, vector_dir=tmp_path, drain_seconds=1.5,
                     shutdown_delay_seconds=0.5) as (url, app):
        short: list = []
        long: list = []
        body = {"model": "fake-model", "prompt": "Hello", "stream": True, "ignore_eos": True}
        threads = [threading.Thread(target=stream_lines, args=(url, {**body, "max_tokens": 20}, short)),
                   threading.Thread(target=stream_lines, args=(url, {**body, "max_tokens": 5000 // 20}, long))]
        for t in threads:
            t.start()
        while fake.stats().running < 2:
            time.sleep(0.01)
        servers[0].handle_exit(signal.SIGTERM, None)
        time.sleep(0.1)
        ready = httpx.get(url + "/ready")  # the listener is still open, and says it is draining
        assert ready.status_code == 503 and ready.json()["reason"] == "draining"
        refused = httpx.post(url + "/v1/completions", json={"model": "fake-model", "prompt": "x"})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        for t in threads:
            t.join(30)
    assert short[0] == 200 and short[-1] == "data: [DONE]"
    assert json.loads(short[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert long[0] == 200 and long[-1] == "data: [DONE]"
    error = json.loads(long[-2].removeprefix("data: "))["error"]
    assert error["code"] == 503 and "shutting down" in error["message"]
    assert app.state.steerserve.drained and fake.stats().idle
