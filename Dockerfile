# yaie_jax serving image: CUDA runtime, non-root, `yaie serve` (images are not built in this repository's CI).
#   docker build -t yaie_jax .
#   docker run --gpus all -p 8000:8000 -v /path/to/model:/models/model:ro yaie_jax --model /models/model
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/yaie \
    PATH=/opt/yaie/bin:$PATH \
    YAIE_COMPILE_CACHE_DIR=/home/yaie/.cache/yaie_jax/xla

# the base image's distribution pins the versions (DL3008: apt pins would break on every Ubuntu point release)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/yaie \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin yaie

WORKDIR /src
COPY pyproject.toml README.md ./
COPY yaie_jax ./yaie_jax
COPY pallas_kernels ./pallas_kernels
COPY configs ./configs
# this checkout itself (DL3013 asks for pins; its dependencies' bounds are in pyproject.toml)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[cuda12,nvml]'

USER 10001
WORKDIR /home/yaie
EXPOSE 8000
# liveness: /health answers 200 while the engine loop runs (a model load and its compiles come first)
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# SIGTERM drains: /ready turns 503, in-flight requests get --shutdown-timeout-s, then the rest are ended cleanly
STOPSIGNAL SIGTERM
ENTRYPOINT ["yaie", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000", "--shutdown-timeout-s", "30"]
