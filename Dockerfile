# imagegen in one image: `docker run ... imagegen` serves the embedded demo model on port 5000;
# `docker run ... imagegen worker` is a cluster worker. README "Deploying" says how to run it.
#
# Build arguments:
#   TORCH_INDEX  empty: PyPI's torch (its Linux build is CUDA's, which also runs on a CPU);
#                or an index of CPU-only builds, e.g. https://download.pytorch.org/whl/cpu
#   GPU          1: also requirements-gpu.lock (bitsandbytes: nf4 quantization, CUDA only)
# Files the builder puts in docker/extras/ (git-ignored) are used at build time only and never
# reach the image: `*.whl` (e.g. a torch wheel already on the builder's disk) and `ca.crt` (the CA
# bundle pip needs behind a proxy that re-signs TLS). `make image-test` does both.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
ARG TORCH_INDEX=""
ARG GPU=""
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY requirements.lock requirements-gpu.lock constraints.txt /src/
COPY docker/ /src/docker/
COPY tools/pip_check.py /src/
RUN set -e; \
    if [ -f /src/docker/extras/ca.crt ]; then export PIP_CERT=/src/docker/extras/ca.crt; fi; \
    python3 -m venv /venv; \
    pip="/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check --find-links /src/docker/extras"; \
    $pip --require-hashes --no-deps -r /src/requirements.lock -r /src/docker/requirements-bookworm.txt; \
    if [ "$GPU" = 1 ]; then $pip --require-hashes --no-deps -r /src/requirements-gpu.lock; fi; \
    $pip -c /src/constraints.txt ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch; \
    /venv/bin/python /src/pip_check.py; \
    find /venv -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE}
# Debian's public CAs (HTTPS webhooks, object stores, the model hub), never the builder's bundle.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /data imagegen \
    && mkdir /data && chown imagegen:imagegen /data
COPY --from=build /venv /venv
COPY app.py config.py LICENSE /app/
COPY imagegen/ /app/imagegen/
COPY models/demo-shapes/ /app/models/demo-shapes/
COPY models/loras/ /app/models/loras/
COPY docker/entrypoint.sh /app/docker/entrypoint.sh
# Configuration by environment only; everything written lives under /data.
ENV PATH=/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    APP_ENV=production \
    DATA_DIR=/data \
    IMAGE_DIR=/data/images \
    LOG_DIR=/data/logs \
    LORA_DIR=/data/loras \
    HF_HOME=/data/cache
WORKDIR /app
USER imagegen
VOLUME /data
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"5000\")}/health/live', timeout=4)"
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["api"]
