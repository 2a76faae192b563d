# The triage node's image: one image for the node (SCP, assembler, dispatcher, web) and
# its Celery workers; the command picks the role (see compose.yaml).
#   docker build -t triage-node .                                   # CPU torch
#   docker build -t triage-node:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# Model bundles are never downloaded at run time: mount them (compose.yaml: ./models).
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the chosen index: a plain requirement would pull the default CUDA build
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY flows ./flows
COPY storage ./storage
COPY triage ./triage
COPY worker ./worker
RUN pip install .

# a fixed non-root user; /data holds the database (SQLite set-ups) and the blob store
RUN groupadd --system --gid 10001 triage \
    && useradd --system --uid 10001 --gid triage --home-dir /data --no-create-home triage \
    && mkdir -p /data /models && chown triage:triage /data
USER triage:triage
ENV TRIAGE_NODE__DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 11112 8080

HEALTHCHECK --interval=30s --timeout=10s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/api/health', timeout=5)"
CMD ["triage", "serve"]
