"""The deployment files agree with the server's shutdown: Kubernetes waits long enough for the drain, and routes
by readiness."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]


def test_kubernetes_grace_period_covers_the_drain():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain, delay = float(env["STEERSERVE_DRAIN_SECONDS"]), float(env["STEERSERVE_SHUTDOWN_DELAY_SECONDS"])
    ready = container["readinessProbe"]
    assert ready["httpGet"]["path"] == "/ready"
    # the probe must see /ready fail while the listener is still open
    assert ready["periodSeconds"] * ready.get("failureThreshold", 3) <= delay
    # the drain, the delay, and uvicorn's own close (5 s) fit in the grace period
    assert pod["terminationGracePeriodSeconds"] >= drain + delay + 5


def test_the_image_contains_every_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("steering", "server", "cli", "clients"):
        assert f"COPY {package} ./{package}" in dockerfile
