# syntax=docker/dockerfile:1
# The ext_proc service: Python, the extproc package and its runtime dependencies only.
# Envoy is not in this image: compose and Kubernetes run the official envoyproxy/envoy
# image beside it, in the same network namespace, because the processor listens on
# loopback only (its answers carry the API keys). Nothing here is ever published.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /src/
COPY extproc /src/extproc
# No extras: the [envoy] and [test] groups stay out of the image.
RUN python -m venv /opt/gateway && /opt/gateway/bin/pip install /src

FROM ${PYTHON_IMAGE}
# tini is PID 1 and forwards signals to the processor: a process that is PID 1 ignores a
# SIGTERM it has no handler for yet, so one sent during start-up (imports take seconds)
# would be lost. Kubernetes has no `--init`; compose and Kubernetes both get it from here.
RUN apt-get update && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/gateway /opt/gateway
ENV PATH=/opt/gateway/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# /run/gateway: Envoy's bootstrap and the listener/route/cluster files the processor
# rewrites on every reload; a volume shared with Envoy is mounted here (a new docker
# volume takes this folder's owner, so the non-root user can write to it).
RUN install -d -o 65532 -g 65532 -m 0755 /run/gateway
USER 65532:65532
WORKDIR /run/gateway
# The gateway YAML is mounted at /etc/gateway; its keys under /run/secrets.
ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m", "extproc"]
CMD ["serve", "/etc/gateway/gateway.yaml", "--xds-dir", "/run/gateway"]
# grpc.health.v1 on the processor's loopback port, read from the same YAML.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --start-interval=1s --retries=3 \
    CMD ["python", "-m", "extproc", "health", "/etc/gateway/gateway.yaml"]
