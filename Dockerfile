# syntax=docker/dockerfile:1.7
# One image for the four services; the command picks the service (the entrypoint is `python -m`):
#   docker run infermesh:0.1.0 gateway | router | feature_service | model_service
#   docker run infermesh:0.1.0 demo.setup --out /demo          (the demo's init step)
#
# VARIANT=cpu (default): python:3.11-slim with CPU-only torch wheels.
# VARIANT=cuda: an NVIDIA CUDA base with CUDA torch wheels, for the model service on GPUs:
#   docker build --build-arg VARIANT=cuda -t infermesh:0.1.0-cuda .
# The torch version is the one pinned in constraints.txt; TORCH_INDEX_URL picks its build (cpu, cu128…).
# Demo data and models are not baked in: an init step writes them to a volume (see docker-compose.yml).

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04

FROM ${PYTHON_IMAGE} AS base-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}

# The CUDA images carry the CUDA user-space libraries but no Python 3.11: take it from deadsnakes.
FROM ${CUDA_IMAGE} AS base-cuda
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL} \
    DEBIAN_FRONTEND=noninteractive \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y --auto-remove gpg-agent software-properties-common \
 && rm -rf /var/lib/apt/lists/*

# base-cpu or base-cuda: a stage of this file, not an image to tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Build stage: a venv with the pinned dependencies, the generated gRPC stubs and the project.
FROM base AS builder
WORKDIR /src
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY constraints.txt pyproject.toml ./
# torch first, from the variant's index, at the version constraints.txt pins (2.13.0 matches 2.13.0+cpu).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "$(grep '^torch==' constraints.txt)"
# The other runtime dependencies, from pyproject.toml, before the sources: edits to code keep this layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt
COPY README.md ./
COPY protos/ protos/
COPY infermesh/ infermesh/
COPY gateway/ gateway/
COPY router/ router/
COPY feature_service/ feature_service/
COPY model_service/ model_service/
COPY demo/ demo/
COPY examples/ examples/
# The stubs are generated here from protos/ (the checked-in ones are kept out by .dockerignore).
RUN python -m grpc_tools.protoc -Iinfermesh/proto=protos --python_out=. --pyi_out=. --grpc_python_out=. protos/*.proto \
 && pip install --no-cache-dir --no-deps -c constraints.txt .

# Runtime stage: the venv and a health-check script, nothing else from the build; runs as uid 10001.
FROM base AS runtime
RUN groupadd --system --gid 10001 infermesh \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/infermesh --create-home --shell /usr/sbin/nologin infermesh \
 && install -d -o 10001 -g 10001 /demo
COPY --from=builder /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/grpc_health_check.py /usr/local/bin/grpc-health-check
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/infermesh
WORKDIR /home/infermesh
USER 10001:10001
# gRPC: gateway 8001 (and HTTP/REST 8000), router 8011, feature service 8021, model service 8031 (metrics ports are
# set by env).
EXPOSE 8000 8001 8011 8021 8031
ENTRYPOINT ["python", "-m"]
CMD ["gateway"]
